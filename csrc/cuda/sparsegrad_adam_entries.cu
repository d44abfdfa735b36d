// CUDA kernel of sparsegrad_adam_entries_ (contract in csrc/cpu/sparsegrad_adam_entries.cpp): one thread per
// selected entry, the arithmetic of csrc/sparsegrad_adam_entry.h (the CPU kernel's, which the CPU tests check).
// No host sync: positions are range-checked on the device (CUDA_KERNEL_ASSERT), not with a .item() on the host.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>
#include <torch/torch.h>

#include "../sparsegrad_adam_entry.h"

namespace scalerec {

void check_adam_entries(const at::Tensor& m, const at::Tensor& v, const at::Tensor& t, const at::Tensor& pos,
                        const at::Tensor& g);  // csrc/cpu/sparsegrad_adam_entries.cpp

namespace {

template <typename scalar_t, typename step_t>
__global__ void adam_entries_kernel(scalar_t* __restrict__ m, scalar_t* __restrict__ v, step_t* __restrict__ t,
                                    const int64_t* __restrict__ pos, const scalar_t* __restrict__ g,
                                    scalar_t* __restrict__ delta, int64_t k, int64_t S, double lr, double beta1,
                                    double beta2, double eps) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t j = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (j >= k) return;
  const int64_t p = pos[j];
  CUDA_KERNEL_ASSERT(p >= 0 && p < S);
  delta[j] = lazy_adam_at<scalar_t, acc_t, step_t>(m, v, t, p, g[j], lr, beta1, beta2, eps);
}

}  // namespace

at::Tensor sparsegrad_adam_entries_cuda(const at::Tensor& m, const at::Tensor& v, const at::Tensor& t,
                                        const at::Tensor& positions, const at::Tensor& values, double lr,
                                        double beta1, double beta2, double eps) {
  check_adam_entries(m, v, t, positions, values);
  c10::cuda::CUDAGuard guard(m.device());
  const at::Tensor pos = positions.to(at::kLong).contiguous();
  const at::Tensor g = values.contiguous();
  at::Tensor delta = at::empty_like(g);
  const int64_t k = g.numel();
  if (k == 0) return delta;
  const int threads = 256;
  const int64_t blocks = (k + threads - 1) / threads;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "sparsegrad_adam_entries_cuda", [&] {
    SCALEREC_DISPATCH_STEP_TYPE(t.scalar_type(), [&] {
      adam_entries_kernel<scalar_t, step_t><<<blocks, threads, 0, stream>>>(
          m.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), t.data_ptr<step_t>(), pos.data_ptr<int64_t>(),
          g.data_ptr<scalar_t>(), delta.data_ptr<scalar_t>(), k, m.numel(), lr, beta1, beta2, eps);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return delta;
}

TORCH_LIBRARY_IMPL(scalerec, CUDA, m) {
  m.impl("sparsegrad_adam_entries_", &sparsegrad_adam_entries_cuda);
}

}  // namespace scalerec
