// bucket_ce: the SCE loss's bucketed cross-entropy (Mezentsev et al., "Scalable Cross-Entropy Loss").
//
// Inputs: hidden [N, d], table [C, d], targets [N], x_ids [B, bx] (the queries of each bucket), y_ids [B, by]
// (the items of each bucket). For bucket b and its query i (row n = x_ids[b, i]): logits of n against the
// bucket's items, the item equal to targets[n] masked, the positive logit <h_n, t_{targets[n]}> appended;
// l[b, i] = lse - pos. Per query, loss[n] = max over the (b, i) where n occurs (0 if n is in no bucket);
// arg[n] = the flat index b * bx + i of that max (the first one on ties; -1 if none), lse[n] its log-sum-exp.
//
// Backward: only the argmax occurrence carries gradient (the max's subgradient). Each bucket recomputes its
// logits for its argmax queries only; grad_hidden rows are written by one bucket each (no races); grad_table
// is accumulated per thread into a compact [U, d] buffer over the U distinct rows of y_ids, then added into
// the touched rows of the dense result. Only one bucket's [bx, d] / [by, d] gather is held per thread.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "../ce_common.h"

namespace scalerec {

// logits of one bucket's queries against its items, the positive masked with -inf
template <typename scalar_t>
static at::Tensor bucket_logits(const at::Tensor& xq, const at::Tensor& wb, const int64_t* tgt_rows,
                                const int64_t* yb) {
  auto s = at::mm(xq, wb.t()).contiguous();
  const int64_t rows = s.size(0), by = s.size(1);
  scalar_t* sp = s.data_ptr<scalar_t>();
  const scalar_t ninf = -std::numeric_limits<scalar_t>::infinity();
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < by; ++j)
      if (yb[j] == tgt_rows[i]) sp[i * by + j] = ninf;
  return s;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bucket_ce_cpu(const at::Tensor& hidden_, const at::Tensor& table_,
                                                             const at::Tensor& targets_, const at::Tensor& x_ids_,
                                                             const at::Tensor& y_ids_) {
  ce::check_bucket_ce(hidden_, table_, targets_, x_ids_, y_ids_);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  auto hidden = hidden_.contiguous(), table = table_.contiguous(), targets = targets_.contiguous();
  auto x_ids = x_ids_.contiguous(), y_ids = y_ids_.contiguous();
  const int64_t N = hidden.size(0), B = x_ids.size(0), bx = x_ids.size(1);
  auto pos = (hidden * table.index_select(0, targets)).sum(1);
  auto b_loss = at::empty({B, bx}, hidden.options());
  auto b_lse = at::empty({B, bx}, hidden.options());
  AT_DISPATCH_FLOATING_TYPES(hidden.scalar_type(), "bucket_ce_cpu", [&] {
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      at::AutoDispatchBelowADInplaceOrView below;
      std::vector<int64_t> tgt(bx);
      for (int64_t b = b0; b < b1; ++b) {
        auto xb = x_ids[b], yb = y_ids[b];
        const int64_t* xp = xb.data_ptr<int64_t>();
        const int64_t* tp = targets.data_ptr<int64_t>();
        for (int64_t i = 0; i < bx; ++i) tgt[i] = tp[xp[i]];
        auto s = bucket_logits<scalar_t>(hidden.index_select(0, xb), table.index_select(0, yb), tgt.data(),
                                         yb.data_ptr<int64_t>());
        auto pb = pos.index_select(0, xb);
        auto lse = at::logaddexp(at::logsumexp(s, {1}), pb);
        b_lse[b].copy_(lse);
        b_loss[b].copy_(lse - pb);
      }
    });
  });
  // max over the occurrences of each query (serial: B * bx scalars)
  auto loss = at::zeros({N}, hidden.options());
  auto lse = at::zeros({N}, hidden.options());
  auto arg = at::full({N}, -1, x_ids.options());
  AT_DISPATCH_FLOATING_TYPES(hidden.scalar_type(), "bucket_ce_cpu_max", [&] {
    const scalar_t* bl = b_loss.data_ptr<scalar_t>();
    const scalar_t* bs = b_lse.data_ptr<scalar_t>();
    const int64_t* xp = x_ids.data_ptr<int64_t>();
    scalar_t* lp = loss.data_ptr<scalar_t>();
    scalar_t* sp = lse.data_ptr<scalar_t>();
    int64_t* ap = arg.data_ptr<int64_t>();
    for (int64_t f = 0; f < B * bx; ++f) {
      const int64_t n = xp[f];
      if (ap[n] < 0 || bl[f] > lp[n]) {
        ap[n] = f;
        lp[n] = bl[f];
        sp[n] = bs[f];
      }
    }
  });
  return {loss, lse, arg};
}

std::tuple<at::Tensor, at::Tensor> bucket_ce_backward_cpu(const at::Tensor& grad_loss_, const at::Tensor& hidden_,
                                                          const at::Tensor& table_, const at::Tensor& targets_,
                                                          const at::Tensor& x_ids_, const at::Tensor& y_ids_,
                                                          const at::Tensor& lse_, const at::Tensor& arg_) {
  ce::check_bucket_ce(hidden_, table_, targets_, x_ids_, y_ids_);
  const int64_t N = hidden_.size(0);
  TORCH_CHECK(grad_loss_.dim() == 1 && grad_loss_.size(0) == N && lse_.dim() == 1 && lse_.size(0) == N &&
                  arg_.dim() == 1 && arg_.size(0) == N,
              "bucket_ce_backward: grad, lse and arg must be [N]=[", N, "]");
  TORCH_CHECK(arg_.scalar_type() == at::kLong, "bucket_ce_backward: arg must be int64");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  auto hidden = hidden_.contiguous(), table = table_.contiguous(), targets = targets_.contiguous();
  auto x_ids = x_ids_.contiguous(), y_ids = y_ids_.contiguous(), arg = arg_.contiguous();
  auto lse = lse_.to(hidden.scalar_type()).contiguous();
  // queries in no bucket carry no loss and get no gradient
  auto g = grad_loss_.to(hidden.scalar_type()).masked_fill(arg < 0, 0).contiguous();
  const int64_t d = hidden.size(1), B = x_ids.size(0), bx = x_ids.size(1), by = y_ids.size(1);
  auto grad_hidden = at::zeros_like(hidden);
  auto grad_table = at::zeros_like(table);
  // compact row space of the touched table rows: y_ids[b, j] -> inv[b, j] in [0, U)
  auto uniq_inv = at::_unique(y_ids.reshape({-1}), /*sorted=*/true, /*return_inverse=*/true);
  auto uniq = std::get<0>(uniq_inv);
  auto inv = std::get<1>(uniq_inv).reshape({B, by});
  const int n_threads = std::max(1, at::get_num_threads());
  std::vector<at::Tensor> compact(n_threads);
  AT_DISPATCH_FLOATING_TYPES(hidden.scalar_type(), "bucket_ce_backward_cpu", [&] {
    const int64_t* ap = arg.data_ptr<int64_t>();
    const int64_t* xp_all = x_ids.data_ptr<int64_t>();
    const int64_t* tp = targets.data_ptr<int64_t>();
    scalar_t* ghp = grad_hidden.data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      at::AutoDispatchBelowADInplaceOrView below;
      auto& buf = compact[at::get_thread_num()];
      if (!buf.defined()) buf = at::zeros({uniq.size(0), d}, hidden.options());
      std::vector<int64_t> sel, tgt;
      for (int64_t b = b0; b < b1; ++b) {
        sel.clear();
        tgt.clear();
        for (int64_t i = 0; i < bx; ++i) {
          const int64_t f = b * bx + i, n = xp_all[f];
          if (ap[n] == f) {
            sel.push_back(n);
            tgt.push_back(tp[n]);
          }
        }
        if (sel.empty()) continue;
        auto rows = at::from_blob(sel.data(), {(int64_t)sel.size()}, at::kLong);
        auto yb = y_ids[b];
        auto xq = hidden.index_select(0, rows);
        auto wb = table.index_select(0, yb);
        auto p = bucket_logits<scalar_t>(xq, wb, tgt.data(), yb.data_ptr<int64_t>());
        p.sub_(lse.index_select(0, rows).unsqueeze(1)).exp_().mul_(g.index_select(0, rows).unsqueeze(1));
        auto gh = at::mm(p, wb).contiguous();  // each selected row belongs to this bucket only
        const scalar_t* ghs = gh.data_ptr<scalar_t>();
        for (size_t r = 0; r < sel.size(); ++r) {
          scalar_t* dst = ghp + sel[r] * d;
          for (int64_t j = 0; j < d; ++j) dst[j] += ghs[r * d + j];
        }
        buf.index_add_(0, inv[b], at::mm(p.t(), xq));
      }
    });
  });
  at::Tensor total = ce::sum_parts(compact);
  if (total.defined()) grad_table.index_add_(0, uniq, total);
  ce::add_positive_grad(grad_hidden, grad_table, hidden, table, targets, lse, g, /*positive_in_lse=*/true);
  return {grad_hidden, grad_table};
}

TORCH_LIBRARY_FRAGMENT(scalerec, m) {
  m.def("bucket_ce(Tensor hidden, Tensor table, Tensor targets, Tensor x_ids, Tensor y_ids) -> (Tensor, Tensor, Tensor)");
  m.def(
      "bucket_ce_backward(Tensor grad_loss, Tensor hidden, Tensor table, Tensor targets, Tensor x_ids, "
      "Tensor y_ids, Tensor lse, Tensor arg) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(scalerec, CPU, m) {
  m.impl("bucket_ce", &bucket_ce_cpu);
  m.impl("bucket_ce_backward", &bucket_ce_backward_cpu);
}

}  // namespace scalerec
