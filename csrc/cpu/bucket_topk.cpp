// bucket_topk(directions [B, d], table [C, d], k, row_start, tile) -> (values [B, k], indices [B, k]):
// for each direction, the k rows of table[row_start:] with the largest inner product, sorted by decreasing
// score (ties: smaller row id first). The table may be bfloat16 with float32 directions (converted per tile). The table is streamed in tiles of `tile` rows: each task keeps a running
// min-heap of size k per direction and scores one [B, tile] block at a time, so [B, C] is never held.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <algorithm>
#include <mutex>
#include <utility>
#include <vector>

#include "../ce_common.h"

namespace scalerec {

namespace {

template <typename scalar_t>
struct Cand {
  scalar_t val;
  int64_t idx;
};

// "a ranks before b": larger score first, then smaller row id
template <typename scalar_t>
inline bool ranks_before(const Cand<scalar_t>& a, const Cand<scalar_t>& b) {
  return a.val > b.val || (a.val == b.val && a.idx < b.idx);
}

template <typename scalar_t>
struct TopK {
  // heap ordered so that the worst kept candidate is on top (std heaps put the "largest" first, and
  // ranks_before makes a better candidate "smaller")
  std::vector<Cand<scalar_t>> heap;
  int64_t k;
  explicit TopK(int64_t k_) : k(k_) { heap.reserve(k_); }
  inline void offer(scalar_t v, int64_t i) {
    Cand<scalar_t> c{v, i};
    if ((int64_t)heap.size() < k) {
      heap.push_back(c);
      std::push_heap(heap.begin(), heap.end(), ranks_before<scalar_t>);
    } else if (ranks_before(c, heap.front())) {
      std::pop_heap(heap.begin(), heap.end(), ranks_before<scalar_t>);
      heap.back() = c;
      std::push_heap(heap.begin(), heap.end(), ranks_before<scalar_t>);
    }
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor> bucket_topk_cpu(const at::Tensor& dirs_, const at::Tensor& table_, int64_t k,
                                                   int64_t row_start, int64_t tile) {
  ce::check_bucket_topk(dirs_, table_, k, row_start, tile, /*allow_bf16_table=*/true);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  auto dirs = dirs_.contiguous(), table = table_.contiguous();
  const int64_t B = dirs.size(0), C = table.size(0);
  auto values = at::empty({B, k}, dirs.options());
  auto indices = at::empty({B, k}, dirs.options().dtype(at::kLong));
  if (B == 0) return {values, indices};
  const int64_t n_tiles = (C - row_start + tile - 1) / tile;
  AT_DISPATCH_FLOATING_TYPES(dirs.scalar_type(), "bucket_topk_cpu", [&] {
    using Heaps = std::vector<TopK<scalar_t>>;
    std::vector<Heaps> partial;  // one set of B heaps per task
    std::mutex mu;
    at::parallel_for(0, n_tiles, 1, [&](int64_t t0, int64_t t1) {
      at::AutoDispatchBelowADInplaceOrView below;
      Heaps heaps(B, TopK<scalar_t>(k));
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t c0 = row_start + t * tile, cn = std::min(tile, C - c0);
        // [B, cn]: one tile (a bfloat16 table is converted tile by tile, never as a whole)
        auto scores = at::mm(dirs, table.narrow(0, c0, cn).to(dirs.scalar_type()).t()).contiguous();
        const scalar_t* sp = scores.data_ptr<scalar_t>();
        for (int64_t b = 0; b < B; ++b) {
          auto& h = heaps[b];
          const scalar_t* row = sp + b * cn;
          int64_t j = 0;
          for (; j < cn && (int64_t)h.heap.size() < k; ++j) h.offer(row[j], c0 + j);
          if (j == cn) continue;
          // Heap full: within a task rows arrive in increasing id order, so a score equal to the worst kept one
          // never ranks before it, and a strict comparison against the threshold suffices.
          // Most scores lose: test a block of kBlock at once (a branch-free OR of comparisons, which the compiler
          // vectorises) and walk it one by one only when some score beats the threshold.
          constexpr int64_t kBlock = 32;
          scalar_t thr = h.heap.front().val;
          for (; j + kBlock <= cn; j += kBlock) {
            int any = 0;  // an int, not a bool: GCC vectorises the int OR-reduction, not the bool one
            for (int64_t u = 0; u < kBlock; ++u) any |= (row[j + u] > thr) ? 1 : 0;
            if (!any) continue;
            for (int64_t u = j; u < j + kBlock; ++u) {
              if (row[u] > thr) {
                h.offer(row[u], c0 + u);
                thr = h.heap.front().val;
              }
            }
          }
          for (; j < cn; ++j) {
            if (row[j] > thr) {
              h.offer(row[j], c0 + j);
              thr = h.heap.front().val;
            }
          }
        }
      }
      std::lock_guard<std::mutex> lock(mu);
      partial.push_back(std::move(heaps));
    });
    scalar_t* vp = values.data_ptr<scalar_t>();
    int64_t* ip = indices.data_ptr<int64_t>();
    at::parallel_for(0, B, 16, [&](int64_t b0, int64_t b1) {
      std::vector<Cand<scalar_t>> all;
      for (int64_t b = b0; b < b1; ++b) {
        all.clear();
        for (auto& heaps : partial) all.insert(all.end(), heaps[b].heap.begin(), heaps[b].heap.end());
        std::partial_sort(all.begin(), all.begin() + k, all.end(), ranks_before<scalar_t>);
        for (int64_t j = 0; j < k; ++j) {
          vp[b * k + j] = all[j].val;
          ip[b * k + j] = all[j].idx;
        }
      }
    });
  });
  return {values, indices};
}

TORCH_LIBRARY_FRAGMENT(scalerec, m) {
  m.def("bucket_topk(Tensor directions, Tensor table, int k, int row_start, int tile) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(scalerec, CPU, m) { m.impl("bucket_topk", &bucket_topk_cpu); }

}  // namespace scalerec
