// CUDA implementation of bucket_topk (see csrc/cpu/bucket_topk.cpp): the table is streamed in tiles; each
// tile's [B, tile] scores are merged with the running [B, k] top-k by one torch.topk over [B, k + tile].
// Ties are not ordered by row id here (torch.topk on CUDA is not stable); the final list is sorted by score.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <limits>

#include "../ce_common.h"

namespace scalerec {

std::tuple<at::Tensor, at::Tensor> bucket_topk_cuda(const at::Tensor& dirs_, const at::Tensor& table_, int64_t k,
                                                    int64_t row_start, int64_t tile) {
  ce::check_bucket_topk(dirs_, table_, k, row_start, tile);
  c10::cuda::CUDAGuard guard(dirs_.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  auto dirs = dirs_.contiguous(), table = table_.contiguous();
  const int64_t B = dirs.size(0), C = table.size(0);
  auto values = at::full({B, 0}, 0, dirs.options());
  auto indices = at::full({B, 0}, 0, dirs.options().dtype(at::kLong));
  for (int64_t c0 = row_start; c0 < C; c0 += tile) {
    const int64_t cn = std::min(tile, C - c0);
    auto scores = at::mm(dirs, table.narrow(0, c0, cn).t());
    auto ids = at::arange(c0, c0 + cn, indices.options()).unsqueeze(0).expand({B, cn});
    auto all_v = at::cat({values, scores}, 1);
    auto all_i = at::cat({indices, ids}, 1);
    auto top = at::topk(all_v, std::min<int64_t>(k, all_v.size(1)), 1, /*largest=*/true, /*sorted=*/true);
    values = std::get<0>(top);
    indices = all_i.gather(1, std::get<1>(top));
  }
  return {values, indices};
}

TORCH_LIBRARY_IMPL(scalerec, CUDA, m) { m.impl("bucket_topk", &bucket_topk_cuda); }

}  // namespace scalerec
