// partial_lse: the log-sum-exp of every query over all rows of one table shard, and its backward from the
// global log-sum-exp — the pieces of an exact softmax CE whose catalog is row-sharded over W ranks.
//
//   partial_lse(hidden [N, d], shard [n, d], tile) -> lse [N]   lse[i] = log sum_j exp(<h_i, s_j>)  (-inf if n = 0)
//   partial_lse_backward(grad [N], hidden, shard, lse [N], tile) -> (grad_hidden [N, d], grad_shard [n, d])
//       with p_ij = exp(<h_i, s_j> - lse_i) * grad_i:  grad_hidden = p @ shard,  grad_shard = p^T @ hidden
//
// The shard may be stored in bfloat16 while hidden is float32: each tile of `tile` rows is converted on the
// fly, so no float32 copy of the shard exists. Memory: one [N, tile] score block. Written with ATen ops only
// (at::mm per tile, itself multi-threaded), so the same kernel serves CPU and CUDA tensors.
#include <torch/library.h>
#include <torch/torch.h>

#include <limits>

namespace scalerec {

namespace {

void check_partial(const char* op, const at::Tensor& hidden, const at::Tensor& shard, int64_t tile) {
  TORCH_CHECK(hidden.dim() == 2, op, ": hidden must be [N, d], got shape ", hidden.sizes());
  TORCH_CHECK(shard.dim() == 2, op, ": shard must be [n, d], got shape ", shard.sizes());
  TORCH_CHECK(hidden.size(1) == shard.size(1), op, ": hidden has d=", hidden.size(1), " but shard has d=",
              shard.size(1));
  TORCH_CHECK(hidden.scalar_type() == at::kFloat || hidden.scalar_type() == at::kDouble, op,
              ": hidden must be float32 or float64, got ", hidden.scalar_type());
  TORCH_CHECK(shard.scalar_type() == hidden.scalar_type() ||
                  (shard.scalar_type() == at::kBFloat16 && hidden.scalar_type() == at::kFloat),
              op, ": shard must have hidden's dtype (or bfloat16 with float32 hidden), got ", shard.scalar_type(),
              " and ", hidden.scalar_type());
  TORCH_CHECK(hidden.device() == shard.device(), op, ": hidden and shard must be on one device, got ",
              hidden.device(), " and ", shard.device());
  TORCH_CHECK(tile > 0, op, ": tile must be positive, got ", tile);
}

}  // namespace

at::Tensor partial_lse(const at::Tensor& hidden, const at::Tensor& shard, int64_t tile) {
  check_partial("partial_lse", hidden, shard, tile);
  const int64_t N = hidden.size(0), n = shard.size(0);
  auto lse = at::full({N}, -std::numeric_limits<double>::infinity(), hidden.options());
  for (int64_t c0 = 0; c0 < n; c0 += tile) {
    auto rows = shard.narrow(0, c0, std::min(tile, n - c0)).to(hidden.scalar_type());
    lse = at::logaddexp(lse, at::logsumexp(at::mm(hidden, rows.t()), {1}));
  }
  return lse;
}

std::tuple<at::Tensor, at::Tensor> partial_lse_backward(const at::Tensor& grad, const at::Tensor& hidden,
                                                        const at::Tensor& shard, const at::Tensor& lse, int64_t tile) {
  check_partial("partial_lse_backward", hidden, shard, tile);
  const int64_t N = hidden.size(0), n = shard.size(0);
  TORCH_CHECK(grad.dim() == 1 && grad.size(0) == N, "partial_lse_backward: grad must be [N]=[", N, "], got shape ",
              grad.sizes());
  TORCH_CHECK(lse.dim() == 1 && lse.size(0) == N, "partial_lse_backward: lse must be [N]=[", N, "], got shape ",
              lse.sizes());
  auto g = grad.to(hidden.scalar_type()).unsqueeze(1);
  auto l = lse.to(hidden.scalar_type()).unsqueeze(1);
  auto grad_hidden = at::zeros_like(hidden);
  auto grad_shard = at::empty({n, hidden.size(1)}, hidden.options());
  for (int64_t c0 = 0; c0 < n; c0 += tile) {
    const int64_t cn = std::min(tile, n - c0);
    auto rows = shard.narrow(0, c0, cn).to(hidden.scalar_type());
    auto p = at::mm(hidden, rows.t()).sub_(l).exp_().mul_(g);  // [N, cn]
    grad_hidden.addmm_(p, rows);
    grad_shard.narrow(0, c0, cn).copy_(at::mm(p.t(), hidden));
  }
  return {grad_hidden, grad_shard};
}

TORCH_LIBRARY_FRAGMENT(scalerec, m) {
  m.def("partial_lse(Tensor hidden, Tensor shard, int tile) -> Tensor");
  m.def("partial_lse_backward(Tensor grad, Tensor hidden, Tensor shard, Tensor lse, int tile) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(scalerec, CompositeExplicitAutograd, m) {
  m.impl("partial_lse", &partial_lse);
  m.impl("partial_lse_backward", &partial_lse_backward);
}

}  // namespace scalerec
