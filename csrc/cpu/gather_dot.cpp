// gather_dot(x [N,d], table [C,d], idx [N,K]) -> [N,K]: out[n,k] = <x[n], table[idx[n,k]]>.
// Backward: grad_x dense; grad_table by scatter-add. Neither direction materialises the [N,K,d] gather.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <algorithm>
#include <vector>

namespace scalerec {

static void check_inputs(const at::Tensor& x, const at::Tensor& table, const at::Tensor& idx) {
  TORCH_CHECK(x.dim() == 2, "gather_dot: x must be [N, d], got shape ", x.sizes());
  TORCH_CHECK(table.dim() == 2, "gather_dot: table must be [C, d], got shape ", table.sizes());
  TORCH_CHECK(idx.dim() == 2, "gather_dot: idx must be [N, K], got shape ", idx.sizes());
  TORCH_CHECK(x.size(1) == table.size(1), "gather_dot: x has d=", x.size(1), " but table has d=", table.size(1));
  TORCH_CHECK(idx.size(0) == x.size(0), "gather_dot: idx has N=", idx.size(0), " but x has N=", x.size(0));
  TORCH_CHECK(x.scalar_type() == table.scalar_type(), "gather_dot: x and table dtypes differ (", x.scalar_type(),
              " vs ", table.scalar_type(), ")");
  TORCH_CHECK(idx.scalar_type() == at::kLong, "gather_dot: idx must be int64, got ", idx.scalar_type());
  TORCH_CHECK(x.device() == table.device() && x.device() == idx.device(), "gather_dot: all inputs must be on one device");
}

static void check_range(const at::Tensor& idx, int64_t C) {
  if (idx.numel() == 0) return;
  const int64_t lo = idx.min().item<int64_t>();
  const int64_t hi = idx.max().item<int64_t>();
  TORCH_CHECK(lo >= 0 && hi < C, "gather_dot: idx out of range [0, ", C, "): min ", lo, ", max ", hi);
}

at::Tensor gather_dot_cpu(const at::Tensor& x_, const at::Tensor& table_, const at::Tensor& idx_) {
  check_inputs(x_, table_, idx_);
  check_range(idx_, table_.size(0));
  auto x = x_.contiguous();
  auto table = table_.contiguous();
  auto idx = idx_.contiguous();
  const int64_t N = x.size(0), d = x.size(1), K = idx.size(1);
  auto out = at::empty({N, K}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gather_dot_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* tp = table.data_ptr<scalar_t>();
    const int64_t* ip = idx.data_ptr<int64_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const scalar_t* xn = xp + n * d;
        for (int64_t k = 0; k < K; ++k) {
          const scalar_t* row = tp + ip[n * K + k] * d;
          scalar_t acc = 0;
          for (int64_t j = 0; j < d; ++j) acc += xn[j] * row[j];
          op[n * K + k] = acc;
        }
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> gather_dot_backward_cpu(const at::Tensor& grad_, const at::Tensor& x_,
                                                           const at::Tensor& table_, const at::Tensor& idx_) {
  check_inputs(x_, table_, idx_);
  TORCH_CHECK(grad_.sizes() == idx_.sizes(), "gather_dot_backward: grad must have idx's shape");
  auto grad = grad_.contiguous().to(x_.scalar_type());
  auto x = x_.contiguous();
  auto table = table_.contiguous();
  auto idx = idx_.contiguous();
  const int64_t N = x.size(0), d = x.size(1), K = idx.size(1), C = table.size(0);
  auto grad_x = at::zeros_like(x);
  auto grad_table = at::zeros_like(table);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gather_dot_backward_cpu", [&] {
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* tp = table.data_ptr<scalar_t>();
    const int64_t* ip = idx.data_ptr<int64_t>();
    scalar_t* gxp = grad_x.data_ptr<scalar_t>();
    scalar_t* gtp = grad_table.data_ptr<scalar_t>();
    // grad_x[n] = sum_k g[n,k] * table[idx[n,k]]  (rows of grad_x are independent)
    at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        scalar_t* gxn = gxp + n * d;
        for (int64_t k = 0; k < K; ++k) {
          const scalar_t g = gp[n * K + k];
          const scalar_t* row = tp + ip[n * K + k] * d;
          for (int64_t j = 0; j < d; ++j) gxn[j] += g * row[j];
        }
      }
    });
    // grad_table[c] += g[n,k] * x[n] for idx[n,k] == c. Each thread owns a contiguous range of table rows
    // and scans all (n,k) pairs, so the scatter-add has no write races and needs no atomics.
    const int64_t NK = N * K;
    at::parallel_for(0, C, std::max<int64_t>(1, C / std::max(1, at::get_num_threads())), [&](int64_t lo, int64_t hi) {
      for (int64_t p = 0; p < NK; ++p) {
        const int64_t c = ip[p];
        if (c < lo || c >= hi) continue;
        const scalar_t g = gp[p];
        const scalar_t* xn = xp + (p / K) * d;
        scalar_t* gt = gtp + c * d;
        for (int64_t j = 0; j < d; ++j) gt[j] += g * xn[j];
      }
    });
  });
  return {grad_x, grad_table};
}

TORCH_LIBRARY_FRAGMENT(scalerec, m) {
  m.def("gather_dot(Tensor x, Tensor table, Tensor idx) -> Tensor");
  m.def("gather_dot_backward(Tensor grad, Tensor x, Tensor table, Tensor idx) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(scalerec, CPU, m) {
  m.impl("gather_dot", &gather_dot_cpu);
  m.impl("gather_dot_backward", &gather_dot_backward_cpu);
}

}  // namespace scalerec
