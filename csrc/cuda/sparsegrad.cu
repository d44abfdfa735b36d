// CUDA kernels of the SparseGrad ops (compiled only when torch has CUDA and a toolkit is present).
// Same contracts as csrc/cpu/sparsegrad.cpp:
//   sparsegrad_topk_grad(grad_out, x, u_out?, u_in?, k) -> (flat indices ascending [k], values [k])
//   sparsegrad_rotated_update_(weight, u_out, u_in, indices, delta): weight += U_out D U_in^T, D sparse.
// The dense products go to cuBLAS through at::mm; the selection uses at::topk on the magnitudes (radix select
// on the GPU); the sparse-by-dense update scatters the k deltas into a dense zero matrix and multiplies it through
// both bases (no host sync: see sparsegrad_rotated_update_cuda).
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <optional>

namespace scalerec {

namespace {

at::Tensor rotated_weight_grad_cuda(const at::Tensor& g, const at::Tensor& x, const std::optional<at::Tensor>& u_out,
                                    const std::optional<at::Tensor>& u_in) {
  const int64_t N = g.size(0), O = g.size(1), I = x.size(1);
  const double direct = double(N) * O * I + (u_out ? double(O) * O * I : 0.0) + (u_in ? double(O) * I * I : 0.0);
  const double rotated_first = double(N) * O * I + (u_out ? double(N) * O * O : 0.0) + (u_in ? double(N) * I * I : 0.0);
  if (direct <= rotated_first) {
    at::Tensor G = at::mm(g.t(), x);
    if (u_out) G = at::mm(u_out->t(), G);
    if (u_in) G = at::mm(G, *u_in);
    return G;
  }
  const at::Tensor gr = u_out ? at::mm(g, *u_out) : g;
  const at::Tensor xr = u_in ? at::mm(x, *u_in) : x;
  return at::mm(gr.t(), xr);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> sparsegrad_topk_grad_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                                                             const std::optional<at::Tensor>& u_out_,
                                                             const std::optional<at::Tensor>& u_in_, int64_t k) {
  TORCH_CHECK(grad_out.dim() == 2 && x.dim() == 2 && grad_out.size(0) == x.size(0),
              "sparsegrad_topk_grad: expected grad_out [N, O] and x [N, I]");
  const int64_t O = grad_out.size(1), I = x.size(1);
  TORCH_CHECK(k >= 1 && k <= O * I, "sparsegrad_topk_grad: k must be in [1, ", O * I, "], got ", k);
  TORCH_CHECK(!u_out_ || (u_out_->size(0) == O && u_out_->size(1) == O), "sparsegrad: u_out must be [O, O]");
  TORCH_CHECK(!u_in_ || (u_in_->size(0) == I && u_in_->size(1) == I), "sparsegrad: u_in must be [I, I]");
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor G = rotated_weight_grad_cuda(grad_out, x, u_out_, u_in_).reshape(-1);
  auto top = at::topk(G.abs().to(at::kFloat), k, /*dim=*/0, /*largest=*/true, /*sorted=*/false);
  at::Tensor idx = std::get<0>(std::get<1>(top).sort());  // ascending -> coalesced COO order
  return {idx, G.index_select(0, idx)};
}

void sparsegrad_rotated_update_cuda(const at::Tensor& weight, const at::Tensor& u_out, const at::Tensor& u_in,
                                    const at::Tensor& indices_, const at::Tensor& delta_) {
  TORCH_CHECK(weight.dim() == 2, "sparsegrad_rotated_update_: weight must be [O, I]");
  const int64_t O = weight.size(0), I = weight.size(1);
  TORCH_CHECK(u_out.size(0) == O && u_out.size(1) == O && u_in.size(0) == I && u_in.size(1) == I,
              "sparsegrad_rotated_update_: rotations must be [O, O] and [I, I]");
  TORCH_CHECK(indices_.dim() == 1 && indices_.sizes() == delta_.sizes(),
              "sparsegrad_rotated_update_: indices and delta must be 1-D of one length");
  const int64_t k = indices_.size(0);
  if (k == 0) return;
  c10::cuda::CUDAGuard guard(weight.device());
  // Dense on the GPU: D is scattered into a zero [O, I] matrix and multiplied through both bases (two GEMMs,
  // ~2.3 GFLOP for a 1536 x 384 MLP linear: tens of microseconds on a datacenter GPU). The compact form (only the
  // touched rows of D, as on the CPU) needs their count on the host, i.e. a device-to-host sync per layer and
  // step, which stalled the whole step on an H200 (SparseGrad at 0.40x LoRA's steps/s there).
  auto D = at::zeros({O, I}, weight.options());
  D.view({-1}).index_add_(0, indices_.contiguous(), delta_.to(weight.scalar_type()).contiguous());
  // weight += U_out (D U_in^T)
  weight.addmm_(u_out, at::mm(D, u_in.t()));  // in-place methods are const on at::Tensor
}

TORCH_LIBRARY_IMPL(scalerec, CUDA, m) {
  m.impl("sparsegrad_topk_grad", &sparsegrad_topk_grad_cuda);
  m.impl("sparsegrad_rotated_update_", &sparsegrad_rotated_update_cuda);
}

}  // namespace scalerec
