// CUDA kernels of gather_dot (compiled only when torch has CUDA and a toolkit is present).
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <torch/torch.h>

namespace scalerec {

template <typename scalar_t>
__global__ void gather_dot_fwd_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ table,
                                      const int64_t* __restrict__ idx, scalar_t* __restrict__ out, int64_t N,
                                      int64_t K, int64_t d) {
  // one warp per (n, k) pair
  const int64_t warp = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (warp >= N * K) return;
  const int64_t n = warp / K;
  const scalar_t* xn = x + n * d;
  const scalar_t* row = table + idx[warp] * d;
  scalar_t acc = 0;
  for (int64_t j = lane; j < d; j += 32) acc += xn[j] * row[j];
  for (int off = 16; off > 0; off /= 2) acc += __shfl_down_sync(0xffffffff, acc, off);
  if (lane == 0) out[warp] = acc;
}

template <typename scalar_t>
__global__ void gather_dot_bwd_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ x,
                                      const scalar_t* __restrict__ table, const int64_t* __restrict__ idx,
                                      scalar_t* __restrict__ gx, scalar_t* __restrict__ gt, int64_t N, int64_t K,
                                      int64_t d) {
  const int64_t warp = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (warp >= N * K) return;
  const int64_t n = warp / K;
  const scalar_t gv = g[warp];
  const int64_t c = idx[warp];
  for (int64_t j = lane; j < d; j += 32) {
    atomicAdd(gx + n * d + j, gv * table[c * d + j]);
    atomicAdd(gt + c * d + j, gv * x[n * d + j]);
  }
}

at::Tensor gather_dot_cuda(const at::Tensor& x_, const at::Tensor& table_, const at::Tensor& idx_) {
  TORCH_CHECK(x_.dim() == 2 && table_.dim() == 2 && idx_.dim() == 2, "gather_dot: expected 2-D x, table, idx");
  TORCH_CHECK(x_.size(1) == table_.size(1) && idx_.size(0) == x_.size(0), "gather_dot: shape mismatch");
  TORCH_CHECK(idx_.scalar_type() == at::kLong, "gather_dot: idx must be int64");
  c10::cuda::CUDAGuard guard(x_.device());
  auto x = x_.contiguous(), table = table_.contiguous(), idx = idx_.contiguous();
  const int64_t N = x.size(0), d = x.size(1), K = idx.size(1);
  auto out = at::empty({N, K}, x.options());
  if (N * K == 0) return out;
  const int threads = 256;
  const int64_t blocks = (N * K * 32 + threads - 1) / threads;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gather_dot_cuda", [&] {
    gather_dot_fwd_kernel<scalar_t><<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        x.data_ptr<scalar_t>(), table.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), N, K, d);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> gather_dot_backward_cuda(const at::Tensor& grad_, const at::Tensor& x_,
                                                            const at::Tensor& table_, const at::Tensor& idx_) {
  c10::cuda::CUDAGuard guard(x_.device());
  auto grad = grad_.contiguous().to(x_.scalar_type());
  auto x = x_.contiguous(), table = table_.contiguous(), idx = idx_.contiguous();
  const int64_t N = x.size(0), d = x.size(1), K = idx.size(1);
  auto gx = at::zeros_like(x), gt = at::zeros_like(table);
  if (N * K == 0) return {gx, gt};
  const int threads = 256;
  const int64_t blocks = (N * K * 32 + threads - 1) / threads;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gather_dot_backward_cuda", [&] {
    gather_dot_bwd_kernel<scalar_t><<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        grad.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), table.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(),
        gx.data_ptr<scalar_t>(), gt.data_ptr<scalar_t>(), N, K, d);
  });
  return {gx, gt};
}

TORCH_LIBRARY_IMPL(scalerec, CUDA, m) {
  m.impl("gather_dot", &gather_dot_cuda);
  m.impl("gather_dot_backward", &gather_dot_backward_cuda);
}

}  // namespace scalerec
