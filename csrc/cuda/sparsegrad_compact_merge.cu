// CUDA kernels of sparsegrad_compact_merge (contract in csrc/cpu/sparsegrad_compact_merge.cpp). No host sync:
//   1. one thread per word: the merged word (the old one with the bits of its keys, a run of the sorted keys found
//      by binary search) and the popcounts of the old and the merged word, into one [2, W] tensor;
//   2. an inclusive prefix sum of both rows (ATen's cumsum, one call): a word's first old and new slots;
//   3. one kernel over W + C + k threads: thread w < W moves word w's known entries to their new slots (ascending
//      bit order) and zeroes its new ones; the next C threads zero the room after the merged set; the last k write
//      each key's slot (its word's first new slot + the new word's bits below it). The merged size is the new
//      prefix sum's last element (thread 0 writes it to `count`); a device assert checks that it fits the capacity
//      (the caller keeps room).
// Keys must be strictly ascending and in [0, n) (one backward's selection is); not checked on the device.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <tuple>

#include "../sparsegrad_adam_entry.h"

namespace scalerec {

void check_compact_merge(const at::Tensor& words, const at::Tensor& m, const at::Tensor& v, const at::Tensor& t,
                         const at::Tensor& keys, int64_t n);  // csrc/cpu/sparsegrad_compact_merge.cpp

namespace {

template <typename index_t>
__device__ __forceinline__ int64_t lower_bound(const index_t* a, int64_t n, int64_t x) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = (lo + hi) >> 1;
    if (static_cast<int64_t>(a[mid]) < x) lo = mid + 1; else hi = mid;
  }
  return lo;
}

// one thread per word: the word's keys (a run of the sorted keys, found by binary search) set their bits in the
// merged word; the popcounts of the old and the merged word go to counts[0][w] and counts[1][w]
template <typename index_t>
__global__ void bits_kernel(const unsigned long long* __restrict__ before, int64_t W, const index_t* __restrict__ keys,
                            int64_t k, unsigned long long* __restrict__ after, int64_t* __restrict__ counts) {
  const int64_t w = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (w >= W) return;
  const unsigned long long o = before[w];
  unsigned long long x = o;
  for (int64_t j = lower_bound(keys, k, w * 64); j < k && static_cast<int64_t>(keys[j]) < (w + 1) * 64; ++j)
    x |= 1ULL << (static_cast<int64_t>(keys[j]) & 63);
  after[w] = x;
  counts[w] = __popcll(o);
  counts[W + w] = __popcll(x);
}

template <typename index_t, typename scalar_t, typename step_t>
__global__ void move_kernel(const unsigned long long* __restrict__ before, const unsigned long long* __restrict__ after,
                            const int64_t* __restrict__ ends, int64_t W, const scalar_t* __restrict__ m,
                            const scalar_t* __restrict__ v, const step_t* __restrict__ t, int64_t C,
                            const index_t* __restrict__ keys, int64_t k, scalar_t* __restrict__ m2,
                            scalar_t* __restrict__ v2, step_t* __restrict__ t2, int64_t* __restrict__ positions,
                            int64_t* __restrict__ count) {
  const int64_t s = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  const int64_t* old_end = ends;      // inclusive prefix sums of the old words' popcounts
  const int64_t* new_end = ends + W;  // ... and of the new words'
  const int64_t total = W > 0 ? new_end[W - 1] : 0;
  if (s == 0) *count = total;
  if (s < W) {
    const unsigned long long o = before[s];
    unsigned long long rest = after[s];
    int64_t i = old_end[s] - __popcll(o), dst = new_end[s] - __popcll(rest);
    CUDA_KERNEL_ASSERT(new_end[s] <= C && "sparsegrad_compact_merge: the entry set is full; make room first");
    for (; rest != 0 && dst < C; rest &= rest - 1, ++dst) {
      const int b = __ffsll(static_cast<long long>(rest)) - 1;
      if (o >> b & 1ULL) {
        m2[dst] = m[i]; v2[dst] = v[i]; t2[dst] = t[i]; ++i;
      } else {
        m2[dst] = scalar_t(0); v2[dst] = scalar_t(0); t2[dst] = 0;
      }
    }
  } else if (s < W + C) {  // room after the merged set
    const int64_t r = s - W;
    if (r >= total) { m2[r] = scalar_t(0); v2[r] = scalar_t(0); t2[r] = 0; }
  } else if (s < W + C + k) {
    const int64_t j = s - W - C;
    const int64_t key = keys[j], w = key >> 6;
    const unsigned long long x = after[w];
    positions[j] = new_end[w] - __popcll(x) + __popcll(x & ((1ULL << (key & 63)) - 1ULL));
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sparsegrad_compact_merge_cuda(
    const at::Tensor& words_in, const at::Tensor& m_in, const at::Tensor& v_in, const at::Tensor& t_in,
    const at::Tensor& keys_in, int64_t n) {
  check_compact_merge(words_in, m_in, v_in, t_in, keys_in, n);
  c10::cuda::CUDAGuard guard(words_in.device());
  const at::Tensor words = words_in.contiguous(), m = m_in.contiguous(), v = v_in.contiguous(), t = t_in.contiguous();
  const at::Tensor keys = keys_in.contiguous();
  const int64_t W = words.numel(), C = m.numel(), k = keys.numel();
  at::Tensor words2 = at::empty_like(words);
  at::Tensor positions = at::empty({k}, keys.options().dtype(at::kLong));
  at::Tensor m2 = at::empty_like(m), v2 = at::empty_like(v), t2 = at::empty_like(t);
  if (W == 0) return {words2, m2.zero_(), v2.zero_(), t2.zero_(), positions, at::zeros({}, positions.options())};
  const int threads = 256;
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto* before = reinterpret_cast<const unsigned long long*>(words.data_ptr<int64_t>());
  auto* after = reinterpret_cast<unsigned long long*>(words2.data_ptr<int64_t>());
  at::Tensor counts = at::empty({2, W}, positions.options()), count = at::empty({}, positions.options());
  AT_DISPATCH_INDEX_TYPES(keys.scalar_type(), "sparsegrad_compact_merge_cuda", [&] {
    bits_kernel<index_t><<<(W + threads - 1) / threads, threads, 0, stream>>>(before, W, keys.data_ptr<index_t>(), k,
                                                                             after, counts.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const at::Tensor ends = counts.cumsum(1);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, m.scalar_type(), "sparsegrad_compact_merge_cuda_m", [&] {
      SCALEREC_DISPATCH_STEP_TYPE(t.scalar_type(), [&] {
        move_kernel<index_t, scalar_t, step_t><<<(W + C + k + threads - 1) / threads, threads, 0, stream>>>(
            before, after, ends.data_ptr<int64_t>(), W, m.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
            t.data_ptr<step_t>(), C, keys.data_ptr<index_t>(), k, m2.data_ptr<scalar_t>(), v2.data_ptr<scalar_t>(),
            t2.data_ptr<step_t>(), positions.data_ptr<int64_t>(), count.data_ptr<int64_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return {words2, m2, v2, t2, positions, count};
}

TORCH_LIBRARY_IMPL(scalerec, CUDA, m) {
  m.impl("sparsegrad_compact_merge", &sparsegrad_compact_merge_cuda);
}

}  // namespace scalerec
