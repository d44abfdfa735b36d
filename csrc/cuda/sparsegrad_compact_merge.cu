// CUDA kernels of sparsegrad_compact_merge (contract in csrc/cpu/sparsegrad_compact_merge.cpp). No host sync:
//   1. one thread per key: its lower bound in idx (binary search), whether it is there already (`fresh` = 0) or new;
//   2. an inclusive prefix sum of `fresh` over the keys (ATen's cumsum): before[j] = new keys among keys[0, j];
//   3. one thread per slot of the merged buffers: a known entry i (or sentinel) moves to i + (new keys below it),
//      found by a binary search of idx[i] in the keys; a key j lands at lower_bound(j) + (new keys before j),
//      which is also its position for the Adam kernel. The C + n moved items fill [0, C + n) one to a place; the
//      n that fall beyond C must be sentinels (a device assert checks it: the caller keeps room for k new ones).
// Keys must be strictly ascending and below the sentinel (one backward's selection is); not checked on the device.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <limits>
#include <tuple>

#include "../sparsegrad_adam_entry.h"

namespace scalerec {

void check_compact_merge(const at::Tensor& idx, const at::Tensor& m, const at::Tensor& v, const at::Tensor& t,
                         const at::Tensor& keys);  // csrc/cpu/sparsegrad_compact_merge.cpp

namespace {

template <typename index_t>
__device__ __forceinline__ int64_t lower_bound(const index_t* a, int64_t n, index_t x) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = (lo + hi) >> 1;
    if (a[mid] < x) lo = mid + 1; else hi = mid;
  }
  return lo;
}

template <typename index_t>
__global__ void find_keys_kernel(const index_t* __restrict__ idx, int64_t C, const index_t* __restrict__ keys,
                                 int64_t k, int64_t* __restrict__ lb, int64_t* __restrict__ fresh) {
  const int64_t j = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (j >= k) return;
  const index_t key = keys[j];
  const int64_t p = lower_bound(idx, C, key);
  lb[j] = p;
  fresh[j] = (p < C && idx[p] == key) ? 0 : 1;
}

template <typename index_t, typename scalar_t, typename step_t>
__global__ void merge_kernel(const index_t* __restrict__ idx, const scalar_t* __restrict__ m,
                             const scalar_t* __restrict__ v, const step_t* __restrict__ t, int64_t C,
                             const index_t* __restrict__ keys, const int64_t* __restrict__ lb,
                             const int64_t* __restrict__ fresh, const int64_t* __restrict__ before, int64_t k,
                             index_t* __restrict__ idx2, scalar_t* __restrict__ m2, scalar_t* __restrict__ v2,
                             step_t* __restrict__ t2, int64_t* __restrict__ positions, index_t sent) {
  const int64_t s = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (s < C) {  // known entry (or sentinel) s
    const index_t x = idx[s];
    const int64_t below = lower_bound(keys, k, x);  // keys < x; the new ones among them shift x up
    const int64_t dest = s + (below > 0 ? before[below - 1] : 0);
    if (dest < C) {
      idx2[dest] = x; m2[dest] = m[s]; v2[dest] = v[s]; t2[dest] = t[s];
    } else {
      CUDA_KERNEL_ASSERT(x == sent && "sparsegrad_compact_merge: the entry set is full; make room first");
    }
  } else if (s < C + k) {  // key j
    const int64_t j = s - C;
    const int64_t dest = lb[j] + before[j] - fresh[j];
    positions[j] = dest;
    if (fresh[j]) {
      CUDA_KERNEL_ASSERT(dest < C && "sparsegrad_compact_merge: the entry set is full; make room first");
      if (dest < C) { idx2[dest] = keys[j]; m2[dest] = scalar_t(0); v2[dest] = scalar_t(0); t2[dest] = 0; }
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sparsegrad_compact_merge_cuda(
    const at::Tensor& idx_in, const at::Tensor& m_in, const at::Tensor& v_in, const at::Tensor& t_in,
    const at::Tensor& keys_in) {
  check_compact_merge(idx_in, m_in, v_in, t_in, keys_in);
  c10::cuda::CUDAGuard guard(idx_in.device());
  const at::Tensor idx = idx_in.contiguous(), m = m_in.contiguous(), v = v_in.contiguous(), t = t_in.contiguous();
  const at::Tensor keys = keys_in.contiguous();
  const int64_t C = idx.numel(), k = keys.numel();
  at::Tensor positions = at::empty({k}, keys.options().dtype(at::kLong));
  if (k == 0) return {idx.clone(), m.clone(), v.clone(), t.clone(), positions};
  at::Tensor idx2 = at::empty_like(idx), m2 = at::empty_like(m), v2 = at::empty_like(v), t2 = at::empty_like(t);
  at::Tensor lb = at::empty({k}, positions.options()), fresh = at::empty({k}, positions.options());
  const int threads = 256;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "sparsegrad_compact_merge_cuda", [&] {
    find_keys_kernel<index_t><<<(k + threads - 1) / threads, threads, 0, stream>>>(
        idx.data_ptr<index_t>(), C, keys.data_ptr<index_t>(), k, lb.data_ptr<int64_t>(), fresh.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const at::Tensor before = fresh.cumsum(0);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, m.scalar_type(), "sparsegrad_compact_merge_cuda_m", [&] {
      SCALEREC_DISPATCH_STEP_TYPE(t.scalar_type(), [&] {
        merge_kernel<index_t, scalar_t, step_t><<<(C + k + threads - 1) / threads, threads, 0, stream>>>(
            idx.data_ptr<index_t>(), m.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), t.data_ptr<step_t>(), C,
            keys.data_ptr<index_t>(), lb.data_ptr<int64_t>(), fresh.data_ptr<int64_t>(), before.data_ptr<int64_t>(),
            k, idx2.data_ptr<index_t>(), m2.data_ptr<scalar_t>(), v2.data_ptr<scalar_t>(), t2.data_ptr<step_t>(),
            positions.data_ptr<int64_t>(), std::numeric_limits<index_t>::max());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return {idx2, m2, v2, t2, positions};
}

TORCH_LIBRARY_IMPL(scalerec, CUDA, m) {
  m.impl("sparsegrad_compact_merge", &sparsegrad_compact_merge_cuda);
}

}  // namespace scalerec
