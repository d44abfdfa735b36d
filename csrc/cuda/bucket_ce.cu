// CUDA implementation of bucket_ce (see csrc/cpu/bucket_ce.cpp for the semantics). Buckets are processed in
// groups sized so that one group's [G, bx, by] logits stay around 2^24 entries (one "tile"): batched GEMMs,
// the positive masked, the max over a query's buckets by scatter_reduce (the first bucket on ties). The backward
// recomputes each group's logits, weights only each query's argmax occurrence, and scatters with index_add_
// (atomic adds) into grad_hidden and the touched rows of grad_table.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <limits>

#include "../ce_common.h"

namespace scalerec {

static int64_t bucket_group(int64_t B, int64_t bx, int64_t by) {
  return std::max<int64_t>(1, std::min<int64_t>(B, (int64_t(1) << 24) / std::max<int64_t>(1, bx * by)));
}

// logits of buckets [g0, g0 + gn): [gn, bx, by], the positive masked with -inf; also returns the gathers
static at::Tensor group_logits(const at::Tensor& hidden, const at::Tensor& table, const at::Tensor& targets,
                               const at::Tensor& xg, const at::Tensor& yg, at::Tensor& xs, at::Tensor& ws) {
  const int64_t gn = xg.size(0), bx = xg.size(1), by = yg.size(1), d = hidden.size(1);
  xs = hidden.index_select(0, xg.reshape({-1})).view({gn, bx, d});
  ws = table.index_select(0, yg.reshape({-1})).view({gn, by, d});
  auto s = at::bmm(xs, ws.transpose(1, 2));
  auto positive = targets.index_select(0, xg.reshape({-1})).view({gn, bx, 1}) == yg.unsqueeze(1);
  return s.masked_fill_(positive, -std::numeric_limits<double>::infinity());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bucket_ce_cuda(const at::Tensor& hidden_, const at::Tensor& table_,
                                                              const at::Tensor& targets_, const at::Tensor& x_ids_,
                                                              const at::Tensor& y_ids_) {
  ce::check_bucket_ce(hidden_, table_, targets_, x_ids_, y_ids_);
  c10::cuda::CUDAGuard guard(hidden_.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  auto hidden = hidden_.contiguous(), table = table_.contiguous(), targets = targets_.contiguous();
  auto x_ids = x_ids_.contiguous(), y_ids = y_ids_.contiguous();
  const int64_t N = hidden.size(0), B = x_ids.size(0), bx = x_ids.size(1), by = y_ids.size(1);
  auto pos = (hidden * table.index_select(0, targets)).sum(1);
  auto b_loss = at::empty({B, bx}, hidden.options());
  auto b_lse = at::empty({B, bx}, hidden.options());
  const int64_t G = bucket_group(B, bx, by);
  at::Tensor xs, ws;
  for (int64_t g0 = 0; g0 < B; g0 += G) {
    const int64_t gn = std::min(G, B - g0);
    auto xg = x_ids.narrow(0, g0, gn), yg = y_ids.narrow(0, g0, gn);
    auto s = group_logits(hidden, table, targets, xg, yg, xs, ws);
    auto pb = pos.index_select(0, xg.reshape({-1})).view({gn, bx});
    auto lse = at::logaddexp(at::logsumexp(s, {2}), pb);
    b_lse.narrow(0, g0, gn).copy_(lse);
    b_loss.narrow(0, g0, gn).copy_(lse - pb);
  }
  auto flat_x = x_ids.reshape({-1});
  auto bl = b_loss.reshape({-1});
  auto loss = at::zeros({N}, hidden.options()).scatter_reduce(0, flat_x, bl, "amax", /*include_self=*/false);
  const int64_t F = B * bx;
  auto f = at::arange(F, x_ids.options());
  auto cand = at::where(bl == loss.index_select(0, flat_x), f, at::full_like(f, F));
  auto arg = at::full({N}, F, x_ids.options()).scatter_reduce(0, flat_x, cand, "amin", /*include_self=*/true);
  auto covered = arg < F;
  arg = at::where(covered, arg, at::full_like(arg, -1));
  auto lse = at::where(covered, b_lse.reshape({-1}).index_select(0, arg.clamp_min(0)), at::zeros_like(loss));
  return {loss, lse, arg};
}

std::tuple<at::Tensor, at::Tensor> bucket_ce_backward_cuda(const at::Tensor& grad_loss_, const at::Tensor& hidden_,
                                                           const at::Tensor& table_, const at::Tensor& targets_,
                                                           const at::Tensor& x_ids_, const at::Tensor& y_ids_,
                                                           const at::Tensor& lse_, const at::Tensor& arg_) {
  ce::check_bucket_ce(hidden_, table_, targets_, x_ids_, y_ids_);
  c10::cuda::CUDAGuard guard(hidden_.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  auto hidden = hidden_.contiguous(), table = table_.contiguous(), targets = targets_.contiguous();
  auto x_ids = x_ids_.contiguous(), y_ids = y_ids_.contiguous(), arg = arg_.contiguous();
  auto lse = lse_.to(hidden.scalar_type()).contiguous();
  auto g = grad_loss_.to(hidden.scalar_type()).masked_fill(arg < 0, 0).contiguous();
  const int64_t d = hidden.size(1), B = x_ids.size(0), bx = x_ids.size(1), by = y_ids.size(1);
  auto grad_hidden = at::zeros_like(hidden);
  auto grad_table = at::zeros_like(table);
  const int64_t G = bucket_group(B, bx, by);
  at::Tensor xs, ws;
  for (int64_t g0 = 0; g0 < B; g0 += G) {
    const int64_t gn = std::min(G, B - g0);
    auto xg = x_ids.narrow(0, g0, gn), yg = y_ids.narrow(0, g0, gn);
    auto flat = xg.reshape({-1});
    // only each query's argmax occurrence carries gradient
    auto f = at::arange(g0 * bx, (g0 + gn) * bx, x_ids.options());
    auto w = (g.index_select(0, flat) * (arg.index_select(0, flat) == f).to(g.scalar_type())).view({gn, bx, 1});
    auto p = group_logits(hidden, table, targets, xg, yg, xs, ws);
    p.sub_(lse.index_select(0, flat).view({gn, bx, 1})).exp_().mul_(w).masked_fill_(w == 0, 0);
    grad_hidden.index_add_(0, flat, at::bmm(p, ws).view({-1, d}));
    grad_table.index_add_(0, yg.reshape({-1}), at::bmm(p.transpose(1, 2), xs).view({-1, d}));
  }
  ce::add_positive_grad(grad_hidden, grad_table, hidden, table, targets, lse, g, /*positive_in_lse=*/true);
  return {grad_hidden, grad_table};
}

TORCH_LIBRARY_IMPL(scalerec, CUDA, m) {
  m.impl("bucket_ce", &bucket_ce_cuda);
  m.impl("bucket_ce_backward", &bucket_ce_backward_cuda);
}

}  // namespace scalerec
