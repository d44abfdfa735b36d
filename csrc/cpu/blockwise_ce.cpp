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

namespace scalerec {

static void blockwise_ce_check(const at::Tensor& hidden, const at::Tensor& table, const at::Tensor& targets,
                               int64_t row_start, int64_t tile) {
  TORCH_CHECK(hidden.dim() == 2, "blockwise_ce: hidden must be [N, d], got shape ", hidden.sizes());
  TORCH_CHECK(table.dim() == 2, "blockwise_ce: table must be [C, d], got shape ", table.sizes());
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == hidden.size(0), "blockwise_ce: targets must be [N]=[",
              hidden.size(0), "], got shape ", targets.sizes());
  TORCH_CHECK(hidden.size(1) == table.size(1), "blockwise_ce: hidden has d=", hidden.size(1), " but table has d=",
              table.size(1));
  TORCH_CHECK(hidden.scalar_type() == table.scalar_type(), "blockwise_ce: hidden and table dtypes differ (",
              hidden.scalar_type(), " vs ", table.scalar_type(), ")");
  TORCH_CHECK(hidden.scalar_type() == at::kFloat || hidden.scalar_type() == at::kDouble,
              "blockwise_ce: hidden/table must be float32 or float64, got ", hidden.scalar_type());
  TORCH_CHECK(targets.scalar_type() == at::kLong, "blockwise_ce: targets must be int64, got ", targets.scalar_type());
  TORCH_CHECK(hidden.device() == table.device() && hidden.device() == targets.device(),
              "blockwise_ce: hidden, table and targets must be on one device");
  TORCH_CHECK(row_start >= 0 && row_start < table.size(0), "blockwise_ce: row_start must lie in [0, C=",
              table.size(0), "), got ", row_start);
  TORCH_CHECK(tile > 0, "blockwise_ce: tile must be positive, got ", tile);
  if (targets.numel()) {
    const int64_t lo = targets.min().item<int64_t>(), hi = targets.max().item<int64_t>();
    TORCH_CHECK(lo >= row_start && hi < table.size(0), "blockwise_ce: targets must lie in [", row_start, ", ",
                table.size(0), "), got min ", lo, ", max ", hi);
  }
}

static constexpr int64_t kQueryBlock = 256;

std::tuple<at::Tensor, at::Tensor> blockwise_ce_cpu(const at::Tensor& hidden_, const at::Tensor& table_,
                                                    const at::Tensor& targets_, int64_t row_start, int64_t tile) {
  blockwise_ce_check(hidden_, table_, targets_, row_start, tile);
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
  blockwise_ce_check(hidden_, table_, targets_, row_start, tile);
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
  at::Tensor grad_hidden;
  for (auto& part : grad_h_parts) {
    if (!part.defined()) continue;
    if (!grad_hidden.defined()) grad_hidden = part;
    else grad_hidden.add_(part);
  }
  if (!grad_hidden.defined()) grad_hidden = at::zeros_like(hidden);
  // the positive's term of d(lse - pos): -g t_y for the query and -g h for the target row
  grad_hidden.sub_(table.index_select(0, targets) * g.unsqueeze(1));
  grad_table.index_add_(0, targets, hidden * g.unsqueeze(1), -1);
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
