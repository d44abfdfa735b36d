// sparsegrad_adam_entries_(exp_avg [S], exp_avg_sq [S], steps [S] int32/int16, positions [k] int64, values [k])
//     -> delta [k]
//   The element-wise part of SparseGrad's lazy-Adam step for one weight, in one pass: at each selected entry's
//   place `positions[j]` in the flat state, the moments and the per-entry step count are updated in place from the
//   gradient `values[j]`, and the entry's change `delta[j]` is returned (csrc/sparsegrad_adam_entry.h has the
//   formula). Replaces ~24 ATen calls (gathers, Adam arithmetic, write-backs; ~24 kernel launches on a GPU) by one.
//   Positions must be distinct (one step's selection is). Reference: scalerec.ops.sparse_grad.
//   sparsegrad_adam_entries_reference.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/torch.h>

#include "../sparsegrad_adam_entry.h"

namespace scalerec {

void check_adam_entries(const at::Tensor& m, const at::Tensor& v, const at::Tensor& t, const at::Tensor& pos,
                        const at::Tensor& g) {
  TORCH_CHECK(m.dim() == 1 && v.dim() == 1 && t.dim() == 1 && m.numel() == v.numel() && m.numel() == t.numel(),
              "sparsegrad_adam_entries_: exp_avg, exp_avg_sq and steps must be flat, of one length");
  TORCH_CHECK(m.is_contiguous() && v.is_contiguous() && t.is_contiguous(),
              "sparsegrad_adam_entries_: the state tensors must be contiguous");
  TORCH_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kShort,
              "sparsegrad_adam_entries_: steps must be int32 or int16, got ", t.scalar_type());
  TORCH_CHECK(pos.dim() == 1 && g.dim() == 1 && pos.numel() == g.numel(),
              "sparsegrad_adam_entries_: positions and values must be 1-D of one length");
  TORCH_CHECK(m.scalar_type() == v.scalar_type() && m.scalar_type() == g.scalar_type(),
              "sparsegrad_adam_entries_: exp_avg, exp_avg_sq and values must share a dtype");
  TORCH_CHECK(m.device() == v.device() && m.device() == t.device() && m.device() == pos.device() &&
                  m.device() == g.device(),
              "sparsegrad_adam_entries_: all tensors must be on one device");
}

at::Tensor sparsegrad_adam_entries_cpu(const at::Tensor& m, const at::Tensor& v, const at::Tensor& t,
                                       const at::Tensor& positions, const at::Tensor& values, double lr,
                                       double beta1, double beta2, double eps) {
  check_adam_entries(m, v, t, positions, values);
  const at::Tensor pos = positions.to(at::kLong).contiguous();
  const at::Tensor g = values.contiguous();
  at::Tensor delta = at::empty_like(g);
  const int64_t k = g.numel(), S = m.numel();
  if (k == 0) return delta;
  const int64_t lo = pos.min().item<int64_t>(), hi = pos.max().item<int64_t>();
  TORCH_CHECK(lo >= 0 && hi < S, "sparsegrad_adam_entries_: positions must be in [0, ", S, "), got [", lo, ", ", hi,
              "]");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "sparsegrad_adam_entries_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* mp = m.data_ptr<scalar_t>();
    scalar_t* vp = v.data_ptr<scalar_t>();
    const int64_t* pp = pos.data_ptr<int64_t>();
    const scalar_t* gp = g.data_ptr<scalar_t>();
    scalar_t* dp = delta.data_ptr<scalar_t>();
    SCALEREC_DISPATCH_STEP_TYPE(t.scalar_type(), [&] {
      step_t* tp = t.data_ptr<step_t>();
      at::parallel_for(0, k, 4096, [&](int64_t b, int64_t e) {
        for (int64_t j = b; j < e; ++j) {
          dp[j] = lazy_adam_at<scalar_t, acc_t, step_t>(mp, vp, tp, pp[j], gp[j], lr, beta1, beta2, eps);
        }
      });
    });
  });
  return delta;
}

TORCH_LIBRARY_FRAGMENT(scalerec, m) {
  m.def("sparsegrad_adam_entries_(Tensor(a!) exp_avg, Tensor(b!) exp_avg_sq, Tensor(c!) steps, Tensor positions, "
        "Tensor values, float lr, float beta1, float beta2, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(scalerec, CPU, m) {
  m.impl("sparsegrad_adam_entries_", &sparsegrad_adam_entries_cpu);
}

}  // namespace scalerec
