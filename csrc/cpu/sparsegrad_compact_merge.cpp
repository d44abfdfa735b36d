// sparsegrad_compact_merge(idx [C], exp_avg [C], exp_avg_sq [C], steps [C] int32 or int16, keys [k])
//     -> (idx' [C], exp_avg' [C], exp_avg_sq' [C], steps' [C], positions [k] int64)
//   The compact lazy-Adam state of one SparseGrad weight keeps its moments for the entries selected so far only:
//   `idx` holds their flat ids sorted ascending in a buffer of fixed capacity C, padded at the end with the
//   sentinel max(dtype) (whose moments and step counts are 0). This op merges one step's selection `keys` (flat
//   ids, strictly ascending, < the sentinel) into that set: entries seen before keep their state, new ones enter
//   with zero moments and step count 0, everything stays sorted, and `positions[j]` is the place of `keys[j]` in
//   the merged buffers (what sparsegrad_lazy_adam_ takes). The capacity does not change, so the caller must leave
//   room for k new entries (SparseGradOptimizer checks an upper bound of the count on the host and reads the
//   exact count only when that bound runs out of room: no host sync per step on a GPU). The CPU kernel is a
//   two-pointer merge; running out of room is an error here and a device assert on CUDA.
//   Reference: scalerec.ops.sparse_grad.sparsegrad_compact_merge_reference (a sort of idx ++ new keys).
#include <ATen/Dispatch.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <limits>
#include <tuple>

#include "../sparsegrad_adam_entry.h"

namespace scalerec {

void check_compact_merge(const at::Tensor& idx, const at::Tensor& m, const at::Tensor& v, const at::Tensor& t,
                         const at::Tensor& keys) {
  TORCH_CHECK(idx.dim() == 1 && m.dim() == 1 && v.dim() == 1 && t.dim() == 1 && keys.dim() == 1,
              "sparsegrad_compact_merge: all tensors must be 1-D");
  TORCH_CHECK(m.numel() == idx.numel() && v.numel() == idx.numel() && t.numel() == idx.numel(),
              "sparsegrad_compact_merge: idx, exp_avg, exp_avg_sq and steps must have one length, got ", idx.numel(),
              ", ", m.numel(), ", ", v.numel(), ", ", t.numel());
  TORCH_CHECK(idx.scalar_type() == at::kInt || idx.scalar_type() == at::kLong,
              "sparsegrad_compact_merge: idx must be int32 or int64, got ", idx.scalar_type());
  TORCH_CHECK(keys.scalar_type() == idx.scalar_type(), "sparsegrad_compact_merge: keys must have idx's dtype (",
              idx.scalar_type(), "), got ", keys.scalar_type());
  TORCH_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kShort,
              "sparsegrad_compact_merge: steps must be int32 or int16, got ", t.scalar_type());
  TORCH_CHECK(m.scalar_type() == v.scalar_type(), "sparsegrad_compact_merge: exp_avg and exp_avg_sq must share a dtype");
  TORCH_CHECK(idx.device() == m.device() && idx.device() == v.device() && idx.device() == t.device() &&
                  idx.device() == keys.device(),
              "sparsegrad_compact_merge: all tensors must be on one device");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sparsegrad_compact_merge_cpu(
    const at::Tensor& idx_in, const at::Tensor& m_in, const at::Tensor& v_in, const at::Tensor& t_in,
    const at::Tensor& keys_in) {
  check_compact_merge(idx_in, m_in, v_in, t_in, keys_in);
  const at::Tensor idx = idx_in.contiguous(), m = m_in.contiguous(), v = v_in.contiguous(), t = t_in.contiguous();
  const at::Tensor keys = keys_in.contiguous();
  const int64_t C = idx.numel(), k = keys.numel();
  at::Tensor idx2 = at::empty_like(idx), m2 = at::empty_like(m), v2 = at::empty_like(v), t2 = at::empty_like(t);
  at::Tensor positions = at::empty({k}, keys.options().dtype(at::kLong));
  AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "sparsegrad_compact_merge_cpu", [&] {
    const index_t sent = std::numeric_limits<index_t>::max();
    const index_t* ip = idx.data_ptr<index_t>();
    const index_t* kp = keys.data_ptr<index_t>();
    index_t* op = idx2.data_ptr<index_t>();
    int64_t* pp = positions.data_ptr<int64_t>();
    for (int64_t j = 0; j < k; ++j) {
      TORCH_CHECK(kp[j] >= 0 && kp[j] < sent, "sparsegrad_compact_merge: keys must be in [0, ", sent, "), got ",
                  kp[j], " at ", j);
      TORCH_CHECK(j == 0 || kp[j] > kp[j - 1],
                  "sparsegrad_compact_merge: keys must be strictly ascending, got ", kp[j - 1], " then ", kp[j],
                  " at ", j);
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, m.scalar_type(), "sparsegrad_compact_merge_cpu_m", [&] {
      SCALEREC_DISPATCH_STEP_TYPE(t.scalar_type(), [&] {
        const step_t* tp = t.data_ptr<step_t>();
        step_t* tq = t2.data_ptr<step_t>();
        const scalar_t* mp = m.data_ptr<scalar_t>();
        const scalar_t* vp = v.data_ptr<scalar_t>();
        scalar_t* mq = m2.data_ptr<scalar_t>();
        scalar_t* vq = v2.data_ptr<scalar_t>();
        int64_t i = 0, j = 0, o = 0;
        // the known entries are ip[0, count); the rest of the buffer is sentinels
        while (i < C && ip[i] != sent) {
          TORCH_CHECK(i == 0 || ip[i] > ip[i - 1], "sparsegrad_compact_merge: idx must be strictly ascending (then "
                      "sentinels), got ", ip[i - 1], " then ", ip[i], " at ", i);
          if (j < k && kp[j] < ip[i]) {  // a new entry
            TORCH_CHECK(o < C, "sparsegrad_compact_merge: the entry set is full (capacity ", C, "); make room first");
            op[o] = kp[j]; mq[o] = scalar_t(0); vq[o] = scalar_t(0); tq[o] = 0; pp[j] = o; ++j; ++o;
            continue;
          }
          TORCH_CHECK(o < C, "sparsegrad_compact_merge: the entry set is full (capacity ", C, "); make room first");
          if (j < k && kp[j] == ip[i]) { pp[j] = o; ++j; }
          op[o] = ip[i]; mq[o] = mp[i]; vq[o] = vp[i]; tq[o] = tp[i]; ++i; ++o;
        }
        for (int64_t r = i; r < C; ++r)
          TORCH_CHECK(ip[r] == sent, "sparsegrad_compact_merge: idx must hold sentinels only after its entries (at ", r,
                      ": ", ip[r], ")");
        for (; j < k; ++j, ++o) {  // new entries beyond the last known one
          TORCH_CHECK(o < C, "sparsegrad_compact_merge: the entry set is full (capacity ", C, ", ", k - j,
                      " more new entries); make room first");
          op[o] = kp[j]; mq[o] = scalar_t(0); vq[o] = scalar_t(0); tq[o] = 0; pp[j] = o;
        }
        for (; o < C; ++o) { op[o] = sent; mq[o] = scalar_t(0); vq[o] = scalar_t(0); tq[o] = 0; }
      });
    });
  });
  return {idx2, m2, v2, t2, positions};
}

TORCH_LIBRARY_FRAGMENT(scalerec, m) {
  m.def("sparsegrad_compact_merge(Tensor idx, Tensor exp_avg, Tensor exp_avg_sq, Tensor steps, Tensor keys) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(scalerec, CPU, m) {
  m.impl("sparsegrad_compact_merge", &sparsegrad_compact_merge_cpu);
}

}  // namespace scalerec
