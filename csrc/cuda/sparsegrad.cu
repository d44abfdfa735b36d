// CUDA kernels of the SparseGrad ops (compiled only when torch has CUDA and a toolkit is present).
// Same contracts as csrc/cpu/sparsegrad.cpp:
//   sparsegrad_topk_grad(grad_out, x, u_out?, u_in?, k) -> (flat indices ascending [k], values [k])
//   sparsegrad_rotated_update_(weight, u_out, u_in, indices, delta): weight += U_out D U_in^T, D sparse.
// The dense products go to cuBLAS through at::mm; the selection uses at::topk on the magnitudes (radix select
// on the GPU); the sparse-by-dense update scatters the k deltas into the compact rows (or columns) that hold
// them with one kernel, then does one GEMM over those rows only.
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

// out[slot[line(p)] * L + pos(p)] = delta[p], where an entry p of the [O, I] matrix lies on line r (by rows) or
// c (by columns) at position c or r. Entries are distinct, so the stores never collide.
template <typename scalar_t>
__global__ void scatter_lines_kernel(const int64_t* __restrict__ idx, const scalar_t* __restrict__ delta,
                                     const int64_t* __restrict__ slot, int64_t k, int64_t I, bool by_rows,
                                     scalar_t* __restrict__ out, int64_t L) {
  const int64_t p = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (p >= k) return;
  const int64_t r = idx[p] / I, c = idx[p] % I;
  const int64_t line = by_rows ? r : c, pos = by_rows ? c : r;
  out[slot[line] * L + pos] = delta[p];
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
  auto indices = indices_.contiguous();
  auto delta = delta_.to(weight.scalar_type()).contiguous();
  auto rows = std::get<0>(at::_unique(at::floor_divide(indices, I), /*sorted=*/true));
  auto cols = std::get<0>(at::_unique(at::remainder(indices, I), /*sorted=*/true));
  const bool by_rows = rows.numel() <= cols.numel();
  const at::Tensor& lines = by_rows ? rows : cols;
  const int64_t S = lines.numel(), L = by_rows ? I : O, n_lines = by_rows ? O : I;
  auto slot = at::full({n_lines}, -1, indices.options());
  slot.index_put_({lines}, at::arange(S, indices.options()));
  auto D = at::zeros({S, L}, weight.options());  // the touched rows (or columns) of the sparse matrix
  const int threads = 256;
  const int64_t blocks = (k + threads - 1) / threads;
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "sparsegrad_rotated_update_cuda", [&] {
    scatter_lines_kernel<scalar_t><<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        indices.data_ptr<int64_t>(), delta.data_ptr<scalar_t>(), slot.data_ptr<int64_t>(), k, I, by_rows,
        D.data_ptr<scalar_t>(), L);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (by_rows) {
    // weight += U_out[:, R] (D_R U_in^T)
    auto T = at::mm(D, u_in.t());
    weight.addmm_(u_out.index_select(1, lines), T);  // in-place methods are const on at::Tensor
  } else {
    // weight^T += U_in[:, C] (D_C U_out^T)
    auto T = at::mm(D, u_out.t());
    auto wt = weight.t();
    wt.addmm_(u_in.index_select(1, lines), T);
  }
}

TORCH_LIBRARY_IMPL(scalerec, CUDA, m) {
  m.impl("sparsegrad_topk_grad", &sparsegrad_topk_grad_cuda);
  m.impl("sparsegrad_rotated_update_", &sparsegrad_rotated_update_cuda);
}

}  // namespace scalerec
