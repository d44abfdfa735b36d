// sparsegrad_compact_merge(words [W] int64, exp_avg [C], exp_avg_sq [C], steps [C] int32 or int16, keys [k], n)
//     -> (words' [W], exp_avg' [C], exp_avg_sq' [C], steps' [C], positions [k] int64, count [] int64)
//   The compact lazy-Adam state of one SparseGrad weight (n entries) keeps its moments for the entries selected so
//   far only. Which entries those are is a bitmap: bit (id & 63) of words[id >> 6] is set iff entry `id` is in the
//   set (W = ceil(n / 64) words; bits at or beyond n stay clear). Their state sits in slots [0, count) of the
//   buffers, in ascending id order, so an entry's slot is its rank in the bitmap; slots [count, C) are zero room.
//   One bit per weight entry (0.125 bytes) replaces a sorted array of int32 ids (4 bytes per selected entry): at
//   MiniLM's 24 % of entries selected after 300 steps that is 0.9 MiB in place of 6.5 MiB.
//   This op merges one step's selection `keys` (flat ids, strictly ascending, in [0, n)) into the set: entries seen
//   before keep their state, new ones enter with zero moments and step count 0, `positions[j]` is the slot of
//   `keys[j]` in the merged buffers (what sparsegrad_lazy_adam_ takes) and `count` the merged set's size (a device
//   tensor: the optimizer reads it only when its host-side bound of the size runs out of room). The capacity C does
//   not change, so the caller leaves room for k new entries; running out is an error here, a device assert on CUDA.
//   Reference: scalerec.ops.sparse_grad.sparsegrad_compact_merge_reference (the bitmap unpacked to a mask).
#include <ATen/Dispatch.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <cstring>
#include <tuple>

#include "../sparsegrad_adam_entry.h"

namespace scalerec {

void check_compact_merge(const at::Tensor& words, const at::Tensor& m, const at::Tensor& v, const at::Tensor& t,
                         const at::Tensor& keys, int64_t n) {
  TORCH_CHECK(words.dim() == 1 && m.dim() == 1 && v.dim() == 1 && t.dim() == 1 && keys.dim() == 1,
              "sparsegrad_compact_merge: all tensors must be 1-D");
  TORCH_CHECK(n >= 0, "sparsegrad_compact_merge: n (the weight's entry count) must be >= 0, got ", n);
  TORCH_CHECK(words.scalar_type() == at::kLong, "sparsegrad_compact_merge: words must be int64, got ",
              words.scalar_type());
  TORCH_CHECK(words.numel() == (n + 63) / 64, "sparsegrad_compact_merge: words must hold ceil(n / 64) = ",
              (n + 63) / 64, " words for n = ", n, ", got ", words.numel());
  TORCH_CHECK(m.numel() == v.numel() && m.numel() == t.numel(),
              "sparsegrad_compact_merge: exp_avg, exp_avg_sq and steps must have one length, got ", m.numel(), ", ",
              v.numel(), ", ", t.numel());
  TORCH_CHECK(keys.scalar_type() == at::kInt || keys.scalar_type() == at::kLong,
              "sparsegrad_compact_merge: keys must be int32 or int64, got ", keys.scalar_type());
  TORCH_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kShort,
              "sparsegrad_compact_merge: steps must be int32 or int16, got ", t.scalar_type());
  TORCH_CHECK(m.scalar_type() == v.scalar_type(), "sparsegrad_compact_merge: exp_avg and exp_avg_sq must share a dtype");
  TORCH_CHECK(words.device() == m.device() && words.device() == v.device() && words.device() == t.device() &&
                  words.device() == keys.device(),
              "sparsegrad_compact_merge: all tensors must be on one device");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sparsegrad_compact_merge_cpu(
    const at::Tensor& words_in, const at::Tensor& m_in, const at::Tensor& v_in, const at::Tensor& t_in,
    const at::Tensor& keys_in, int64_t n) {
  check_compact_merge(words_in, m_in, v_in, t_in, keys_in, n);
  const at::Tensor words = words_in.contiguous(), m = m_in.contiguous(), v = v_in.contiguous(), t = t_in.contiguous();
  const at::Tensor keys = keys_in.to(at::kLong).contiguous();
  const int64_t W = words.numel(), C = m.numel(), k = keys.numel();
  at::Tensor words2 = words.clone(), m2 = at::empty_like(m), v2 = at::empty_like(v), t2 = at::empty_like(t);
  at::Tensor positions = at::empty({k}, keys.options());
  const uint64_t* ow = reinterpret_cast<const uint64_t*>(words.data_ptr<int64_t>());
  uint64_t* nw = reinterpret_cast<uint64_t*>(words2.data_ptr<int64_t>());
  const int64_t* kp = keys.data_ptr<int64_t>();
  int64_t* pp = positions.data_ptr<int64_t>();
  if (W > 0 && n % 64 != 0)
    TORCH_CHECK((ow[W - 1] >> (n % 64)) == 0, "sparsegrad_compact_merge: words has bits set at or beyond n = ", n);
  for (int64_t j = 0; j < k; ++j) {
    TORCH_CHECK(kp[j] >= 0 && kp[j] < n, "sparsegrad_compact_merge: keys must be in [0, ", n, "), got ", kp[j],
                " at ", j);
    TORCH_CHECK(j == 0 || kp[j] > kp[j - 1], "sparsegrad_compact_merge: keys must be strictly ascending, got ",
                kp[j - 1], " then ", kp[j], " at ", j);
    nw[kp[j] >> 6] |= uint64_t(1) << (kp[j] & 63);
  }
  int64_t count = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, m.scalar_type(), "sparsegrad_compact_merge_cpu", [&] {
    SCALEREC_DISPATCH_STEP_TYPE(t.scalar_type(), [&] {
      const scalar_t* mp = m.data_ptr<scalar_t>();
      const scalar_t* vp = v.data_ptr<scalar_t>();
      const step_t* tp = t.data_ptr<step_t>();
      scalar_t* mq = m2.data_ptr<scalar_t>();
      scalar_t* vq = v2.data_ptr<scalar_t>();
      step_t* tq = t2.data_ptr<step_t>();
      int64_t i = 0, o = 0, j = 0;  // old slot, new slot, next key
      for (int64_t w = 0; w < W; ++w) {
        const uint64_t before = ow[w], after = nw[w];
        if (after == 0) continue;
        const int64_t cnt = __builtin_popcountll(after);
        TORCH_CHECK(o + cnt <= C, "sparsegrad_compact_merge: the entry set is full (capacity ", C, "); make room first");
        if (before == after) {  // no new entry in this word: its slots move as one block
          TORCH_CHECK(i + cnt <= C, "sparsegrad_compact_merge: words holds more entries than the buffers (", C, ")");
          std::memcpy(mq + o, mp + i, cnt * sizeof(scalar_t));
          std::memcpy(vq + o, vp + i, cnt * sizeof(scalar_t));
          std::memcpy(tq + o, tp + i, cnt * sizeof(step_t));
          for (; j < k && (kp[j] >> 6) == w; ++j) pp[j] = o + __builtin_popcountll(after & ((uint64_t(1) << (kp[j] & 63)) - 1));
          i += cnt;
          o += cnt;
          continue;
        }
        for (uint64_t rest = after; rest != 0; rest &= rest - 1, ++o) {
          const int b = __builtin_ctzll(rest);
          if (before >> b & 1) {
            TORCH_CHECK(i < C, "sparsegrad_compact_merge: words holds more entries than the buffers (", C, ")");
            mq[o] = mp[i]; vq[o] = vp[i]; tq[o] = tp[i]; ++i;
          } else {
            mq[o] = scalar_t(0); vq[o] = scalar_t(0); tq[o] = 0;
          }
          if (j < k && kp[j] == w * 64 + b) pp[j++] = o;
        }
      }
      for (int64_t r = o; r < C; ++r) { mq[r] = scalar_t(0); vq[r] = scalar_t(0); tq[r] = 0; }
      count = o;
    });
  });
  return {words2, m2, v2, t2, positions, at::scalar_tensor(count, keys.options())};
}

TORCH_LIBRARY_FRAGMENT(scalerec, m) {
  m.def("sparsegrad_compact_merge(Tensor words, Tensor exp_avg, Tensor exp_avg_sq, Tensor steps, Tensor keys, "
        "int n) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(scalerec, CPU, m) {
  m.impl("sparsegrad_compact_merge", &sparsegrad_compact_merge_cpu);
}

}  // namespace scalerec
