// CUDA implementation of chunk_ce (see csrc/cpu/chunk_ce.cpp for the semantics). Chunks of a round are processed
// in groups sized so that one group's [G, cx, W] logits stay around 2^24 entries: batched GEMMs against the
// chunk windows, the -log(count) duplicate correction from the per-round chunk maps, pads and the positive
// masked, an online log-sum-exp per query. The backward recomputes each group and scatters with index_add_.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <limits>

#include "../ce_common.h"

namespace scalerec {

namespace {

struct Plan {
  int64_t R, K, cx, W, n_extra;
  at::Tensor windows;  // [R, K, W] table rows of each chunk's window, -1 = padding
  at::Tensor qchunk;   // [R, N] chunk of each query per round, -1 if absent
  at::Tensor ichunk;   // [R, C] chunk of each table row per round, -1 if absent
};

at::Tensor chunk_map(const at::Tensor& chunks_r, int64_t size, const char* name, int64_t r) {
  // chunks_r [K, c] of row ids (-1 pads) -> [size] chunk index per row (-1 if absent)
  const int64_t K = chunks_r.size(0), c = chunks_r.size(1);
  auto flat = chunks_r.reshape({-1});
  auto valid = flat >= 0;
  auto rows = flat.masked_select(valid);
  auto k = at::arange(K, flat.options()).repeat_interleave(c).masked_select(valid);
  if (rows.numel()) {
    const int64_t most = at::bincount(rows, {}, size).max().item<int64_t>();
    TORCH_CHECK(most <= 1, "chunk_ce: a row occurs twice in round ", r, " of ", name);
  }
  return at::full({size}, -1, flat.options()).index_put_({rows}, k);
}

Plan make_plan(const at::Tensor& hidden, const at::Tensor& table, const at::Tensor& targets, const at::Tensor& x_chunks,
               const at::Tensor& y_chunks, int64_t n_extra) {
  ce::check_chunk_ce(hidden, table, targets, x_chunks, y_chunks, n_extra);
  Plan p;
  p.R = x_chunks.size(0);
  p.K = x_chunks.size(1);
  p.cx = x_chunks.size(2);
  p.n_extra = n_extra;
  const int64_t cy = y_chunks.size(2);
  p.W = (2 * n_extra + 1) * cy;
  auto pad = at::full({p.R, n_extra, cy}, -1, y_chunks.options());
  p.windows = at::cat({pad, y_chunks, pad}, 1).unfold(1, 2 * n_extra + 1, 1).permute({0, 1, 3, 2}).reshape(
      {p.R, p.K, p.W});
  std::vector<at::Tensor> q, i;
  for (int64_t r = 0; r < p.R; ++r) {
    q.push_back(chunk_map(x_chunks[r], hidden.size(0), "x_chunks", r));
    i.push_back(chunk_map(y_chunks[r], table.size(0), "y_chunks", r));
  }
  p.qchunk = at::stack(q);
  p.ichunk = at::stack(i);
  return p;
}

// logits [gn, cx, W] of chunks [k0, k0 + gn) of round r, corrected and masked; fills the gathers
at::Tensor group_logits(const Plan& p, const at::Tensor& hidden, const at::Tensor& table, const at::Tensor& targets,
                        const at::Tensor& xq, const at::Tensor& wq, at::Tensor& xs, at::Tensor& ws) {
  const int64_t gn = xq.size(0), d = hidden.size(1);
  auto xc = xq.clamp_min(0), wc = wq.clamp_min(0);
  xs = hidden.index_select(0, xc.reshape({-1})).view({gn, p.cx, d});
  ws = table.index_select(0, wc.reshape({-1})).view({gn, p.W, d});
  auto s = at::bmm(xs, ws.transpose(1, 2));
  if (p.R > 1) {
    auto count = at::zeros({gn, p.cx, p.W}, s.options());
    for (int64_t rr = 0; rr < p.R; ++rr) {
      auto a = p.qchunk[rr].index_select(0, xc.reshape({-1})).view({gn, p.cx, 1});
      auto b = p.ichunk[rr].index_select(0, wc.reshape({-1})).view({gn, 1, p.W});
      count.add_(((a >= 0) & (b >= 0) & ((a - b).abs() <= p.n_extra)).to(s.scalar_type()));
    }
    s.sub_(count.clamp_min_(1).log_());
  }
  auto masked = (wq < 0).unsqueeze(1) | (targets.index_select(0, xc.reshape({-1})).view({gn, p.cx, 1}) == wq.unsqueeze(1));
  return s.masked_fill_(masked, -std::numeric_limits<double>::infinity());
}

int64_t chunk_group(const Plan& p) {
  return std::max<int64_t>(1, std::min<int64_t>(p.K, (int64_t(1) << 24) / std::max<int64_t>(1, p.cx * p.W)));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> chunk_ce_cuda(const at::Tensor& hidden_, const at::Tensor& table_,
                                                 const at::Tensor& targets_, const at::Tensor& x_chunks_,
                                                 const at::Tensor& y_chunks_, int64_t n_extra) {
  c10::cuda::CUDAGuard guard(hidden_.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  auto hidden = hidden_.contiguous(), table = table_.contiguous(), targets = targets_.contiguous();
  auto x_chunks = x_chunks_.contiguous(), y_chunks = y_chunks_.contiguous();
  const Plan p = make_plan(hidden, table, targets, x_chunks, y_chunks, n_extra);
  const int64_t N = hidden.size(0), G = chunk_group(p);
  auto lse_neg = at::full({N}, -std::numeric_limits<double>::infinity(), hidden.options().dtype(at::kDouble));
  at::Tensor xs, ws;
  for (int64_t r = 0; r < p.R; ++r)
    for (int64_t k0 = 0; k0 < p.K; k0 += G) {
      const int64_t gn = std::min(G, p.K - k0);
      auto xq = x_chunks[r].narrow(0, k0, gn), wq = p.windows[r].narrow(0, k0, gn);
      auto part = at::logsumexp(group_logits(p, hidden, table, targets, xq, wq, xs, ws), {2}).to(at::kDouble);
      auto valid = xq >= 0;
      auto rows = xq.masked_select(valid);  // a query is in one chunk per round: no duplicate rows
      lse_neg.index_put_({rows}, at::logaddexp(lse_neg.index_select(0, rows), part.masked_select(valid)));
    }
  auto pos = (hidden * table.index_select(0, targets)).sum(1).to(at::kDouble);
  auto lse = at::logaddexp(lse_neg, pos);
  return {(lse - pos).to(hidden.scalar_type()), lse.to(hidden.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor> chunk_ce_backward_cuda(const at::Tensor& grad_loss_, const at::Tensor& hidden_,
                                                          const at::Tensor& table_, const at::Tensor& targets_,
                                                          const at::Tensor& x_chunks_, const at::Tensor& y_chunks_,
                                                          int64_t n_extra, const at::Tensor& lse_) {
  c10::cuda::CUDAGuard guard(hidden_.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  auto hidden = hidden_.contiguous(), table = table_.contiguous(), targets = targets_.contiguous();
  auto x_chunks = x_chunks_.contiguous(), y_chunks = y_chunks_.contiguous();
  const Plan p = make_plan(hidden, table, targets, x_chunks, y_chunks, n_extra);
  auto g = grad_loss_.to(hidden.scalar_type()).contiguous();
  auto lse = lse_.to(hidden.scalar_type()).contiguous();
  const int64_t d = hidden.size(1), G = chunk_group(p);
  auto grad_hidden = at::zeros_like(hidden);
  auto grad_table = at::zeros_like(table);
  at::Tensor xs, ws;
  for (int64_t r = 0; r < p.R; ++r)
    for (int64_t k0 = 0; k0 < p.K; k0 += G) {
      const int64_t gn = std::min(G, p.K - k0);
      auto xq = x_chunks[r].narrow(0, k0, gn), wq = p.windows[r].narrow(0, k0, gn);
      auto xc = xq.clamp_min(0).reshape({-1});
      auto w = (g.index_select(0, xc) * (xq.reshape({-1}) >= 0).to(g.scalar_type())).view({gn, p.cx, 1});
      auto prob = group_logits(p, hidden, table, targets, xq, wq, xs, ws);
      prob.sub_(lse.index_select(0, xc).view({gn, p.cx, 1})).exp_().mul_(w).masked_fill_(w == 0, 0);
      grad_hidden.index_add_(0, xc, at::bmm(prob, ws).view({-1, d}));
      grad_table.index_add_(0, wq.clamp_min(0).reshape({-1}), at::bmm(prob.transpose(1, 2), xs).view({-1, d}));
    }
  ce::add_positive_grad(grad_hidden, grad_table, hidden, table, targets, lse, g, /*positive_in_lse=*/true);
  return {grad_hidden, grad_table};
}

TORCH_LIBRARY_IMPL(scalerec, CUDA, m) {
  m.impl("chunk_ce", &chunk_ce_cuda);
  m.impl("chunk_ce_backward", &chunk_ce_backward_cuda);
}

}  // namespace scalerec
