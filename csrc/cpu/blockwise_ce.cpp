// blockwise_ce: the exact full-catalog softmax cross-entropy without the [N, C] logits (the idea of Cut
// Cross-Entropy). Classes are the table rows [row_start, C) (row_start = 1 skips the padding row 0).
//
//   forward : per query n, lse[n] = log sum_c exp(<h_n, t_c>) by an online log-sum-exp over catalog tiles;
//             loss[n] = lse[n] - <h_n, t_{y_n}>. Memory: one [query block, tile] logits buffer per thread.
//   backward: recomputes every tile's logits, p = exp(s - lse) * g, and accumulates
//             grad_table[tile] += p^T h (each thread owns whole catalog tiles: no write races) and
//             grad_hidden += p t (one [N, d] buffer per thread, summed at the end); the positive's -1 term
//             is added serially. Memory O(N + C) besides the gradients themselves.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "../ce_common.h"

namespace scalerec {

static constexpr int64_t kQueryBlock = 256;

std::tuple<at::Tensor, at::Tensor> blockwise_ce_cpu(const at::Tensor& hidden_, const at::Tensor& table_,
                                                    const at::Tensor& targets_, int64_t row_start, int64_t tile) {
  ce::check_blockwise_ce(hidden_, table_, targets_, row_start, tile);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  auto hidden = hidden_.contiguous(), table = table_.contiguous(), targets = targets_.contiguous();
  const int64_t N = hidden.size(0), C = table.size(0);
  // running log-sum-exp per query, kept in float64 whatever the input dtype
  auto lse = at::full({N}, -std::numeric_limits<double>::infinity(), hidden.options().dtype(at::kDouble));
  auto classes = table.narrow(0, row_start, C - row_start);
  const int64_t n_blocks = (N + kQueryBlock - 1) / kQueryBlock;
  // Each task owns a block of queries and streams the whole catalog: no write conflicts on lse.
  at::parallel_for(0, n_blocks, 1, [&](int64_t b0, int64_t b1) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // worker threads do not inherit the caller's TLS
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t q0 = b * kQueryBlock, qn = std::min(kQueryBlock, N - q0);
      auto hq = hidden.narrow(0, q0, qn);
      auto run = lse.narrow(0, q0, qn);
      for (int64_t c0 = 0; c0 < classes.size(0); c0 += tile) {
        auto tt = classes.narrow(0, c0, std::min(tile, classes.size(0) - c0));
        auto tile_lse = at::logsumexp(at::mm(hq, tt.t()), {1}).to(at::kDouble);
        run.copy_(at::logaddexp(run, tile_lse));
      }
    }
  });
  auto pos = (hidden * table.index_select(0, targets)).sum(1).to(at::kDouble);
  auto loss = (lse - pos).to(hidden.scalar_type());
  return {loss, lse.to(hidden.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor> blockwise_ce_backward_cpu(const at::Tensor& grad_loss_, const at::Tensor& hidden_,
                                                             const at::Tensor& table_, const at::Tensor& targets_,
                                                             const at::Tensor& lse_, int64_t row_start, int64_t tile) {
  ce::check_blockwise_ce(hidden_, table_, targets_, row_start, tile);
  TORCH_CHECK(grad_loss_.dim() == 1 && grad_loss_.size(0) == hidden_.size(0),
              "blockwise_ce_backward: grad must be [N], got shape ", grad_loss_.sizes());
  TORCH_CHECK(lse_.dim() == 1 && lse_.size(0) == hidden_.size(0), "blockwise_ce_backward: lse must be [N], got shape ",
              lse_.sizes());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  auto hidden = hidden_.contiguous(), table = table_.contiguous(), targets = targets_.contiguous();
  auto g = grad_loss_.to(hidden.scalar_type()).contiguous();
  auto lse = lse_.to(hidden.scalar_type()).contiguous();
  const int64_t N = hidden.size(0), C = table.size(0), d = hidden.size(1);
  auto grad_table = at::zeros_like(table);
  auto classes = table.narrow(0, row_start, C - row_start);
  auto grad_classes = grad_table.narrow(0, row_start, C - row_start);
  const int64_t n_tiles = (classes.size(0) + tile - 1) / tile;
  const int n_threads = std::max(1, at::get_num_threads());
  std::vector<at::Tensor> grad_h_parts(n_threads);
  at::parallel_for(0, n_tiles, 1, [&](int64_t t0, int64_t t1) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto& gh = grad_h_parts[at::get_thread_num()];
    if (!gh.defined()) gh = at::zeros({N, d}, hidden.options());
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t c0 = t * tile, cn = std::min(tile, classes.size(0) - c0);
      auto tt = classes.narrow(0, c0, cn);
      auto gt = grad_classes.narrow(0, c0, cn);
      for (int64_t q0 = 0; q0 < N; q0 += kQueryBlock) {
        const int64_t qn = std::min(kQueryBlock, N - q0);
        auto hq = hidden.narrow(0, q0, qn);
        // p = softmax probabilities of this tile, already scaled by the upstream gradient
        auto p = at::mm(hq, tt.t());
        p.sub_(lse.narrow(0, q0, qn).unsqueeze(1)).exp_().mul_(g.narrow(0, q0, qn).unsqueeze(1));
        gt.addmm_(p.t(), hq);
        gh.narrow(0, q0, qn).addmm_(p, tt);
      }
    }
  });
  at::Tensor grad_hidden = ce::sum_parts(grad_h_parts);
  if (!grad_hidden.defined()) grad_hidden = at::zeros_like(hidden);
  ce::add_positive_grad(grad_hidden, grad_table, hidden, table, targets, lse, g, /*positive_in_lse=*/false);
  return {grad_hidden, grad_table};
}

TORCH_LIBRARY_FRAGMENT(scalerec, m) {
  m.def("blockwise_ce(Tensor hidden, Tensor table, Tensor targets, int row_start, int tile) -> (Tensor, Tensor)");
  m.def(
      "blockwise_ce_backward(Tensor grad_loss, Tensor hidden, Tensor table, Tensor targets, Tensor lse, "
      "int row_start, int tile) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(scalerec, CPU, m) {
  m.impl("blockwise_ce", &blockwise_ce_cpu);
  m.impl("blockwise_ce_backward", &blockwise_ce_backward_cpu);
}

}  // namespace scalerec
