// chunk_ce: the RECE loss's chunked cross-entropy (Gusak et al., "RECE: Reduced Cross-Entropy Loss").
//
// Inputs: hidden [N, d], table [C, d], targets [N], x_chunks [R, K, cx] (per round, the query rows sorted by
// bucket and cut into K equal chunks; -1 pads), y_chunks [R, K, cy] (the same for table rows), n_extra.
// In round r, the queries of chunk i are scored against the items of chunks i-n_extra .. i+n_extra. A query's
// candidates over all rounds may repeat: each occurrence's logit is reduced by log(count), so an item counts
// once in the softmax however often it was drawn. The positive is masked among the candidates and appended.
// loss[n] = lse[n] - <h_n, t_{targets[n]}>.
//
// Forward: rounds in sequence, chunks in parallel (a query is in one chunk per round), an online log-sum-exp
// per query. Backward: recomputes each chunk's logits; chunks i and i + 2 n_extra + 1 have disjoint item
// windows, so the chunks of one residue class mod (2 n_extra + 1) run in parallel without write races on
// grad_table (and on grad_hidden, as their queries differ). One chunk's gathers at a time per thread.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../ce_common.h"

namespace scalerec {

namespace {

struct ChunkPlan {
  int64_t R, K, cx, cy, N, C, n_extra;
  at::Tensor qchunk;  // [R, N] int64: chunk of query n in round r, -1 if absent
  at::Tensor ichunk;  // [R, C] int32: chunk of row c in round r, -1 if absent
};

ChunkPlan make_plan(const at::Tensor& hidden, const at::Tensor& table, const at::Tensor& targets,
                    const at::Tensor& x_chunks, const at::Tensor& y_chunks, int64_t n_extra) {
  ce::check_chunk_ce(hidden, table, targets, x_chunks, y_chunks, n_extra);
  ChunkPlan p;
  p.R = x_chunks.size(0);
  p.K = x_chunks.size(1);
  p.cx = x_chunks.size(2);
  p.cy = y_chunks.size(2);
  p.N = hidden.size(0);
  p.C = table.size(0);
  p.n_extra = n_extra;
  p.qchunk = at::full({p.R, p.N}, -1, x_chunks.options());
  p.ichunk = at::full({p.R, p.C}, -1, x_chunks.options().dtype(at::kInt));
  const int64_t* xp = x_chunks.data_ptr<int64_t>();
  const int64_t* yp = y_chunks.data_ptr<int64_t>();
  int64_t* qc = p.qchunk.data_ptr<int64_t>();
  int32_t* ic = p.ichunk.data_ptr<int32_t>();
  for (int64_t r = 0; r < p.R; ++r)
    for (int64_t k = 0; k < p.K; ++k) {
      for (int64_t j = 0; j < p.cx; ++j) {
        const int64_t n = xp[(r * p.K + k) * p.cx + j];
        if (n < 0) continue;
        TORCH_CHECK(qc[r * p.N + n] < 0, "chunk_ce: query row ", n, " occurs twice in round ", r, " of x_chunks");
        qc[r * p.N + n] = k;
      }
      for (int64_t j = 0; j < p.cy; ++j) {
        const int64_t c = yp[(r * p.K + k) * p.cy + j];
        if (c < 0) continue;
        TORCH_CHECK(ic[r * p.C + c] < 0, "chunk_ce: table row ", c, " occurs twice in round ", r, " of y_chunks");
        ic[r * p.C + c] = (int32_t)k;
      }
    }
  return p;
}

// The logits of chunk k of round r against its window, duplicates corrected, positive and pads masked.
// Fills q_rows (the chunk's query rows) and w_rows (the window's table rows, only those in [row_lo, row_hi));
// returns [q, w].
template <typename scalar_t>
at::Tensor chunk_logits(const ChunkPlan& p, const at::Tensor& hidden, const at::Tensor& table,
                        const int64_t* targets, const int64_t* x_chunks, const int64_t* y_chunks, int64_t r, int64_t k,
                        std::vector<int64_t>& q_rows, std::vector<int64_t>& w_rows, at::Tensor& xq, at::Tensor& ww,
                        int64_t row_lo = 0, int64_t row_hi = std::numeric_limits<int64_t>::max()) {
  q_rows.clear();
  w_rows.clear();
  const int64_t* xs = x_chunks + (r * p.K + k) * p.cx;
  for (int64_t j = 0; j < p.cx; ++j)
    if (xs[j] >= 0) q_rows.push_back(xs[j]);
  const int64_t k0 = std::max<int64_t>(0, k - p.n_extra), k1 = std::min<int64_t>(p.K - 1, k + p.n_extra);
  for (int64_t kk = k0; kk <= k1; ++kk) {
    const int64_t* ys = y_chunks + (r * p.K + kk) * p.cy;
    for (int64_t j = 0; j < p.cy; ++j)
      if (ys[j] >= row_lo && ys[j] < row_hi) w_rows.push_back(ys[j]);  // pads (-1) fall below any row_lo >= 0
  }
  const int64_t nq = q_rows.size(), nw = w_rows.size();
  if (nq == 0) return at::Tensor();
  xq = hidden.index_select(0, at::from_blob(q_rows.data(), {nq}, at::kLong));
  ww = table.index_select(0, at::from_blob(w_rows.data(), {nw}, at::kLong));
  auto s = at::mm(xq, ww.t()).contiguous();
  scalar_t* sp = s.data_ptr<scalar_t>();
  const scalar_t ninf = -std::numeric_limits<scalar_t>::infinity();
  const int64_t* qc = p.qchunk.data_ptr<int64_t>();
  const int32_t* ic = p.ichunk.data_ptr<int32_t>();
  for (int64_t i = 0; i < nq; ++i) {
    const int64_t n = q_rows[i], y = targets[n];
    scalar_t* row = sp + i * nw;
    for (int64_t j = 0; j < nw; ++j) {
      const int64_t c = w_rows[j];
      if (c == y) {
        row[j] = ninf;
        continue;
      }
      if (p.R > 1) {  // the number of rounds whose window brings item c to query n
        int64_t count = 0;
        for (int64_t rr = 0; rr < p.R; ++rr) {
          const int64_t a = qc[rr * p.N + n], b = ic[rr * p.C + c];
          if (a >= 0 && b >= 0 && std::abs(a - b) <= p.n_extra) ++count;
        }
        row[j] -= std::log((scalar_t)count);
      }
    }
  }
  return s;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> chunk_ce_cpu(const at::Tensor& hidden_, const at::Tensor& table_,
                                                const at::Tensor& targets_, const at::Tensor& x_chunks_,
                                                const at::Tensor& y_chunks_, int64_t n_extra) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  auto hidden = hidden_.contiguous(), table = table_.contiguous(), targets = targets_.contiguous();
  auto x_chunks = x_chunks_.contiguous(), y_chunks = y_chunks_.contiguous();
  const ChunkPlan p = make_plan(hidden, table, targets, x_chunks, y_chunks, n_extra);
  auto lse_neg = at::full({p.N}, -std::numeric_limits<double>::infinity(), hidden.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(hidden.scalar_type(), "chunk_ce_cpu", [&] {
    const int64_t* tp = targets.data_ptr<int64_t>();
    const int64_t* xp = x_chunks.data_ptr<int64_t>();
    const int64_t* yp = y_chunks.data_ptr<int64_t>();
    double* lp = lse_neg.data_ptr<double>();
    for (int64_t r = 0; r < p.R; ++r) {
      at::parallel_for(0, p.K, 1, [&](int64_t k0, int64_t k1) {
        at::AutoDispatchBelowADInplaceOrView below;
        std::vector<int64_t> q_rows, w_rows;
        at::Tensor xq, ww;
        for (int64_t k = k0; k < k1; ++k) {
          auto s = chunk_logits<scalar_t>(p, hidden, table, tp, xp, yp, r, k, q_rows, w_rows, xq, ww);
          if (!s.defined()) continue;
          auto part = at::logsumexp(s, {1}).to(at::kDouble).contiguous();
          const double* pp = part.data_ptr<double>();
          for (size_t i = 0; i < q_rows.size(); ++i) {
            double& acc = lp[q_rows[i]];
            const double m = std::max(acc, pp[i]);
            if (m != -std::numeric_limits<double>::infinity())
              acc = m + std::log(std::exp(acc - m) + std::exp(pp[i] - m));
          }
        }
      });
    }
  });
  auto pos = (hidden * table.index_select(0, targets)).sum(1).to(at::kDouble);
  auto lse = at::logaddexp(lse_neg, pos);
  return {(lse - pos).to(hidden.scalar_type()), lse.to(hidden.scalar_type())};
}

// The backward restricted to the table rows [row_lo, row_hi): grad_hidden gets the terms of those rows only and
// grad_rows [row_hi - row_lo, d] their gradient. The probabilities come from the saved lse, so the terms of one
// row never depend on the values of the others: summed over a partition of the rows, the passes give exactly
// the full backward (and a caller may update the rows of one pass before running the next).
std::tuple<at::Tensor, at::Tensor> chunk_ce_backward_rows_cpu(const at::Tensor& grad_loss_, const at::Tensor& hidden_,
                                                              const at::Tensor& table_, const at::Tensor& targets_,
                                                              const at::Tensor& x_chunks_, const at::Tensor& y_chunks_,
                                                              int64_t n_extra, const at::Tensor& lse_, int64_t row_lo,
                                                              int64_t row_hi) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  auto hidden = hidden_.contiguous(), table = table_.contiguous(), targets = targets_.contiguous();
  auto x_chunks = x_chunks_.contiguous(), y_chunks = y_chunks_.contiguous();
  const ChunkPlan p = make_plan(hidden, table, targets, x_chunks, y_chunks, n_extra);
  TORCH_CHECK(grad_loss_.dim() == 1 && grad_loss_.size(0) == p.N && lse_.dim() == 1 && lse_.size(0) == p.N,
              "chunk_ce_backward: grad and lse must be [N]=[", p.N, "]");
  TORCH_CHECK(0 <= row_lo && row_lo <= row_hi && row_hi <= p.C, "chunk_ce_backward_rows: the row range [", row_lo,
              ", ", row_hi, ") must lie in [0, C=", p.C, "]");
  auto g = grad_loss_.to(hidden.scalar_type()).contiguous();
  auto lse = lse_.to(hidden.scalar_type()).contiguous();
  const int64_t d = hidden.size(1), period = 2 * n_extra + 1;
  auto grad_hidden = at::zeros_like(hidden);
  auto grad_rows = at::zeros({row_hi - row_lo, d}, table.options());
  AT_DISPATCH_FLOATING_TYPES(hidden.scalar_type(), "chunk_ce_backward_cpu", [&] {
    const int64_t* tp = targets.data_ptr<int64_t>();
    const int64_t* xp = x_chunks.data_ptr<int64_t>();
    const int64_t* yp = y_chunks.data_ptr<int64_t>();
    scalar_t* ghp = grad_hidden.data_ptr<scalar_t>();
    scalar_t* gtp = grad_rows.data_ptr<scalar_t>();
    for (int64_t r = 0; r < p.R; ++r)
      for (int64_t phase = 0; phase < period; ++phase) {
        const int64_t n_here = (p.K - phase + period - 1) / period;  // chunks phase, phase + period, ...
        at::parallel_for(0, n_here, 1, [&](int64_t c0, int64_t c1) {
          at::AutoDispatchBelowADInplaceOrView below;
          std::vector<int64_t> q_rows, w_rows;
          at::Tensor xq, ww;
          for (int64_t c = c0; c < c1; ++c) {
            const int64_t k = phase + c * period;
            auto prob =
                chunk_logits<scalar_t>(p, hidden, table, tp, xp, yp, r, k, q_rows, w_rows, xq, ww, row_lo, row_hi);
            if (!prob.defined() || w_rows.empty()) continue;
            auto rows = at::from_blob(q_rows.data(), {(int64_t)q_rows.size()}, at::kLong);
            prob.sub_(lse.index_select(0, rows).unsqueeze(1)).exp_().mul_(g.index_select(0, rows).unsqueeze(1));
            auto gh = at::mm(prob, ww).contiguous();        // [q, d]
            auto gw = at::mm(prob.t(), xq).contiguous();    // [w, d]
            const scalar_t* ghs = gh.data_ptr<scalar_t>();
            const scalar_t* gws = gw.data_ptr<scalar_t>();
            for (size_t i = 0; i < q_rows.size(); ++i) {
              scalar_t* dst = ghp + q_rows[i] * d;
              for (int64_t j = 0; j < d; ++j) dst[j] += ghs[i * d + j];
            }
            for (size_t i = 0; i < w_rows.size(); ++i) {
              scalar_t* dst = gtp + (w_rows[i] - row_lo) * d;
              for (int64_t j = 0; j < d; ++j) dst[j] += gws[i * d + j];
            }
          }
        });
      }
  });
  // the positive's own term, for the queries whose target lies in the range (each target is in exactly one range)
  if (row_lo == 0 && row_hi == p.C) {
    ce::add_positive_grad(grad_hidden, grad_rows, hidden, table, targets, lse, g, /*positive_in_lse=*/true);
  } else {
    auto sel = at::nonzero((targets >= row_lo).logical_and_(targets < row_hi)).squeeze(1);
    if (sel.numel() > 0) {
      auto gh_sel = at::zeros({sel.size(0), d}, hidden.options());
      ce::add_positive_grad(gh_sel, grad_rows, hidden.index_select(0, sel), table.narrow(0, row_lo, row_hi - row_lo),
                            targets.index_select(0, sel) - row_lo, lse.index_select(0, sel), g.index_select(0, sel),
                            /*positive_in_lse=*/true);
      grad_hidden.index_add_(0, sel, gh_sel);
    }
  }
  return {grad_hidden, grad_rows};
}

std::tuple<at::Tensor, at::Tensor> chunk_ce_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& hidden,
                                                         const at::Tensor& table, const at::Tensor& targets,
                                                         const at::Tensor& x_chunks, const at::Tensor& y_chunks,
                                                         int64_t n_extra, const at::Tensor& lse) {
  return chunk_ce_backward_rows_cpu(grad_loss, hidden, table, targets, x_chunks, y_chunks, n_extra, lse, 0,
                                    table.size(0));
}

TORCH_LIBRARY_FRAGMENT(scalerec, m) {
  m.def(
      "chunk_ce(Tensor hidden, Tensor table, Tensor targets, Tensor x_chunks, Tensor y_chunks, int n_extra) "
      "-> (Tensor, Tensor)");
  m.def(
      "chunk_ce_backward(Tensor grad_loss, Tensor hidden, Tensor table, Tensor targets, Tensor x_chunks, "
      "Tensor y_chunks, int n_extra, Tensor lse) -> (Tensor, Tensor)");
  m.def(
      "chunk_ce_backward_rows(Tensor grad_loss, Tensor hidden, Tensor table, Tensor targets, Tensor x_chunks, "
      "Tensor y_chunks, int n_extra, Tensor lse, int row_start, int row_end) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(scalerec, CPU, m) {
  m.impl("chunk_ce", &chunk_ce_cpu);
  m.impl("chunk_ce_backward", &chunk_ce_backward_cpu);
  m.impl("chunk_ce_backward_rows", &chunk_ce_backward_rows_cpu);
}

}  // namespace scalerec
