// CUDA implementation of blockwise_ce (see csrc/cpu/blockwise_ce.cpp for the semantics): the same online
// log-sum-exp over catalog tiles, each tile one cuBLAS GEMM plus fused ATen reductions on the stream; the
// backward recomputes each tile. Memory O(N · tile) for one tile of logits, never [N, C].
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <limits>

#include "../ce_common.h"

namespace scalerec {

std::tuple<at::Tensor, at::Tensor> blockwise_ce_cuda(const at::Tensor& hidden_, const at::Tensor& table_,
                                                     const at::Tensor& targets_, int64_t row_start, int64_t tile) {
  ce::check_blockwise_ce(hidden_, table_, targets_, row_start, tile);
  c10::cuda::CUDAGuard guard(hidden_.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  auto hidden = hidden_.contiguous(), table = table_.contiguous(), targets = targets_.contiguous();
  const int64_t N = hidden.size(0), C = table.size(0);
  auto lse = at::full({N}, -std::numeric_limits<double>::infinity(), hidden.options().dtype(at::kDouble));
  for (int64_t c0 = row_start; c0 < C; c0 += tile) {
    auto tt = table.narrow(0, c0, std::min(tile, C - c0));
    lse = at::logaddexp(lse, at::logsumexp(at::mm(hidden, tt.t()), {1}).to(at::kDouble));
  }
  auto pos = (hidden * table.index_select(0, targets)).sum(1).to(at::kDouble);
  return {(lse - pos).to(hidden.scalar_type()), lse.to(hidden.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor> blockwise_ce_backward_cuda(const at::Tensor& grad_loss_, const at::Tensor& hidden_,
                                                              const at::Tensor& table_, const at::Tensor& targets_,
                                                              const at::Tensor& lse_, int64_t row_start, int64_t tile) {
  ce::check_blockwise_ce(hidden_, table_, targets_, row_start, tile);
  c10::cuda::CUDAGuard guard(hidden_.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  auto hidden = hidden_.contiguous(), table = table_.contiguous(), targets = targets_.contiguous();
  auto g = grad_loss_.to(hidden.scalar_type()).contiguous();
  auto lse = lse_.to(hidden.scalar_type()).contiguous();
  const int64_t C = table.size(0);
  auto grad_hidden = at::zeros_like(hidden);
  auto grad_table = at::zeros_like(table);
  for (int64_t c0 = row_start; c0 < C; c0 += tile) {
    const int64_t cn = std::min(tile, C - c0);
    auto tt = table.narrow(0, c0, cn);
    auto p = at::mm(hidden, tt.t());
    p.sub_(lse.unsqueeze(1)).exp_().mul_(g.unsqueeze(1));
    grad_table.narrow(0, c0, cn).addmm_(p.t(), hidden);
    grad_hidden.addmm_(p, tt);
  }
  ce::add_positive_grad(grad_hidden, grad_table, hidden, table, targets, lse, g, /*positive_in_lse=*/false);
  return {grad_hidden, grad_table};
}

TORCH_LIBRARY_IMPL(scalerec, CUDA, m) {
  m.impl("blockwise_ce", &blockwise_ce_cuda);
  m.impl("blockwise_ce_backward", &blockwise_ce_backward_cuda);
}

}  // namespace scalerec
