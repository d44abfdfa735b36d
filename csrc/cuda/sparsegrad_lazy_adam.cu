// CUDA implementation of sparsegrad_lazy_adam_ (contract and the device-generic loop: csrc/sparsegrad_adam.cpp; this
// registration overrides that loop for CUDA tensors). Same arithmetic (csrc/sparsegrad_adam_entry.h), fewer launches
// on a host-bound path. SparseGrad shares U_out, U_in within a layer type, so the rotated weights that share their
// bases are updated together, L at a time:
//   per weight l: one kernel runs the Adam arithmetic of its k entries and adds each change into the l-th column
//                 block of one zero matrix D = [D_1 | ... | D_L]  ([O, L*I]);
//   per group:    R = U_out D  (one GEMM);
//   per weight l: W_l += R_l U_in^T  (one GEMM; R_l = the l-th column block of R, read in place).
// That is 2 launches a weight and 2 a group (MiniLM's 12 MLP linears in 2 groups: 28) instead of 5 a weight (60: the
// Adam kernel, then zeros, index_add and two GEMMs in sparsegrad_rotated_update_). A weight without rotations
// (MeProp) gets its changes added in the same kernel: 1 launch instead of 2. A group's D and R take 2 L O I
// elements; L is capped so that D stays within SCALEREC_SPARSEGRAD_GROUP_MB (default 32) MiB, one weight at least.
// No host sync. Indices may repeat (atomic adds; a coalesced gradient's do not). SCALEREC_SPARSEGRAD_LAZY_ADAM=generic
// switches to the per-weight loop, for comparison in one lease.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/Atomic.cuh>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <map>
#include <optional>
#include <tuple>
#include <vector>

#include "../sparsegrad_adam_entry.h"

namespace scalerec {

void check_adam_entries(const at::Tensor& m, const at::Tensor& v, const at::Tensor& t, const at::Tensor& pos,
                        const at::Tensor& g);  // csrc/cpu/sparsegrad_adam_entries.cpp
void sparsegrad_lazy_adam_(at::TensorList weights, at::TensorList exp_avg, at::TensorList exp_avg_sq,
                           at::TensorList steps, at::TensorList positions, at::TensorList indices,
                           at::TensorList values, const c10::List<std::optional<at::Tensor>>& u_out,
                           const c10::List<std::optional<at::Tensor>>& u_in, double lr, double beta1, double beta2,
                           double eps);  // csrc/sparsegrad_adam.cpp: the device-generic loop
void check_lazy_adam_lists(at::TensorList weights, at::TensorList exp_avg, at::TensorList exp_avg_sq,
                           at::TensorList steps, at::TensorList positions, at::TensorList indices,
                           at::TensorList values, const c10::List<std::optional<at::Tensor>>& u_out,
                           const c10::List<std::optional<at::Tensor>>& u_in);  // csrc/sparsegrad_adam.cpp

namespace {

// entry e = r * cols + c of a weight goes to target[r * row_stride + col_offset + c]
template <typename scalar_t, typename step_t>
__global__ void adam_scatter_kernel(scalar_t* __restrict__ m, scalar_t* __restrict__ v, step_t* __restrict__ t,
                                    const int64_t* __restrict__ pos, const int64_t* __restrict__ idx,
                                    const scalar_t* __restrict__ g, scalar_t* __restrict__ target, int64_t k,
                                    int64_t S, int64_t n, int64_t cols, int64_t row_stride, int64_t col_offset,
                                    double lr, double beta1, double beta2, double eps) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t j = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (j >= k) return;
  const int64_t p = pos[j], e = idx[j];
  CUDA_KERNEL_ASSERT(p >= 0 && p < S);
  CUDA_KERNEL_ASSERT(e >= 0 && e < n);
  const scalar_t d = lazy_adam_at<scalar_t, acc_t, step_t>(m, v, t, p, g[j], lr, beta1, beta2, eps);
  gpuAtomicAdd(target + (e / cols) * row_stride + col_offset + (e % cols), d);
}

void adam_scatter(const at::Tensor& m, const at::Tensor& v, const at::Tensor& t, const at::Tensor& positions,
                  const at::Tensor& indices, const at::Tensor& values, const at::Tensor& target, int64_t cols,
                  int64_t row_stride, int64_t col_offset, int64_t n, double lr, double beta1, double beta2,
                  double eps) {
  check_adam_entries(m, v, t, positions, values);
  TORCH_CHECK(target.scalar_type() == values.scalar_type() && target.is_contiguous(),
              "sparsegrad_lazy_adam_ (CUDA): internal error: scatter target");
  const at::Tensor pos = positions.to(at::kLong).contiguous();
  const at::Tensor idx = indices.to(at::kLong).contiguous();
  const at::Tensor g = values.contiguous();
  const int64_t k = g.numel();
  const int threads = 256;
  const int64_t blocks = (k + threads - 1) / threads;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "sparsegrad_lazy_adam_cuda", [&] {
    SCALEREC_DISPATCH_STEP_TYPE(t.scalar_type(), [&] {
      adam_scatter_kernel<scalar_t, step_t><<<blocks, threads, 0, stream>>>(
          m.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), t.data_ptr<step_t>(), pos.data_ptr<int64_t>(),
          idx.data_ptr<int64_t>(), g.data_ptr<scalar_t>(), target.data_ptr<scalar_t>(), k, m.numel(), n, cols,
          row_stride, col_offset, lr, beta1, beta2, eps);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

int64_t group_bytes_cap() {
  const char* s = std::getenv("SCALEREC_SPARSEGRAD_GROUP_MB");
  if (s == nullptr || s[0] == '\0') return int64_t(32) << 20;
  char* end = nullptr;
  const double mb = std::strtod(s, &end);
  TORCH_CHECK(end != s && *end == '\0' && mb >= 0, "SCALEREC_SPARSEGRAD_GROUP_MB must be a number of MiB >= 0, got '",
              s, "'");
  return static_cast<int64_t>(mb * double(1 << 20));
}

// SCALEREC_SPARSEGRAD_LAZY_ADAM=generic runs the device-generic per-weight loop instead (for comparison)
bool use_generic_loop() {
  const char* s = std::getenv("SCALEREC_SPARSEGRAD_LAZY_ADAM");
  if (s == nullptr || s[0] == '\0' || std::strcmp(s, "grouped") == 0) return false;
  TORCH_CHECK(std::strcmp(s, "generic") == 0, "SCALEREC_SPARSEGRAD_LAZY_ADAM must be 'grouped' (the default) or "
              "'generic', got '", s, "'");
  return true;
}

}  // namespace

void sparsegrad_lazy_adam_cuda(at::TensorList weights, at::TensorList exp_avg, at::TensorList exp_avg_sq,
                               at::TensorList steps, at::TensorList positions, at::TensorList indices,
                               at::TensorList values, const c10::List<std::optional<at::Tensor>>& u_out,
                               const c10::List<std::optional<at::Tensor>>& u_in, double lr, double beta1, double beta2,
                               double eps) {
  check_lazy_adam_lists(weights, exp_avg, exp_avg_sq, steps, positions, indices, values, u_out, u_in);
  const size_t n = weights.size();
  if (n == 0) return;
  if (use_generic_loop()) {
    sparsegrad_lazy_adam_(weights, exp_avg, exp_avg_sq, steps, positions, indices, values, u_out, u_in, lr, beta1,
                          beta2, eps);
    return;
  }
  c10::cuda::CUDAGuard guard(weights[0].device());
  // Every check before the first launch, so that a bad argument leaves all the weights and moments as they were.
  const int64_t cap = group_bytes_cap();
  std::vector<size_t> generic, meprop;
  // the rotated weights by their bases (storage, strides), shape and dtype, in order of first appearance
  using Key = std::tuple<const void*, const void*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int>;
  std::map<Key, size_t> slot;
  std::vector<std::vector<size_t>> groups;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& w = weights[i];
    const at::Tensor& g = values[i];
    TORCH_CHECK(w.dim() == 2, "sparsegrad_lazy_adam_: weight ", i, " must be 2-D");
    TORCH_CHECK(positions[i].dim() == 1 && indices[i].dim() == 1 && g.dim() == 1 &&
                    positions[i].numel() == g.numel() && indices[i].numel() == g.numel(),
                "sparsegrad_lazy_adam_: weight ", i, ": positions, indices and values must be 1-D of one length");
    const std::optional<at::Tensor> uo = u_out.get(i), ui = u_in.get(i);  // c10::List::get returns a copy
    TORCH_CHECK(uo.has_value() == ui.has_value(),
                "sparsegrad_lazy_adam_: weight ", i, ": give both rotations or neither");
    if (g.numel() == 0) continue;
    const int64_t O = w.size(0), I = w.size(1);
    TORCH_CHECK(!uo.has_value() || (uo->dim() == 2 && uo->size(0) == O && uo->size(1) == O && ui->dim() == 2 &&
                                    ui->size(0) == I && ui->size(1) == I),
                "sparsegrad_lazy_adam_: weight ", i, ": rotations must be [O, O] and [I, I]");
    if (g.scalar_type() != w.scalar_type() || !w.is_contiguous()) {  // rare: the generic loop (casts, strides)
      generic.push_back(i);
      continue;
    }
    if (!uo.has_value()) {  // MeProp: the changes go straight into the weight
      meprop.push_back(i);
      continue;
    }
    TORCH_CHECK(uo->scalar_type() == w.scalar_type() && ui->scalar_type() == w.scalar_type(),
                "sparsegrad_lazy_adam_: weight ", i, ": rotation dtypes differ from the weight's");
    const Key key{uo->data_ptr(), ui->data_ptr(), uo->stride(0), uo->stride(1), ui->stride(0), ui->stride(1), O, I,
                  static_cast<int>(w.scalar_type())};
    auto it = slot.find(key);
    if (it == slot.end()) {
      it = slot.emplace(key, groups.size()).first;
      groups.emplace_back();
    }
    groups[it->second].push_back(i);
  }
  for (const size_t i : generic) {
    c10::List<std::optional<at::Tensor>> uo1, ui1;
    uo1.push_back(u_out.get(i));
    ui1.push_back(u_in.get(i));
    sparsegrad_lazy_adam_({weights[i]}, {exp_avg[i]}, {exp_avg_sq[i]}, {steps[i]}, {positions[i]}, {indices[i]},
                          {values[i]}, uo1, ui1, lr, beta1, beta2, eps);
  }
  for (const size_t i : meprop) {
    const int64_t O = weights[i].size(0), I = weights[i].size(1);
    adam_scatter(exp_avg[i], exp_avg_sq[i], steps[i], positions[i], indices[i], values[i], weights[i], I, I, 0, O * I,
                 lr, beta1, beta2, eps);
  }
  for (const auto& members : groups) {
    const at::Tensor& w0 = weights[members[0]];
    const int64_t O = w0.size(0), I = w0.size(1);
    // by value: c10::List<std::optional<Tensor>>::get returns a temporary, and a reference into it would dangle
    const at::Tensor uo = *u_out.get(members[0]);
    const at::Tensor ui = *u_in.get(members[0]);
    const int64_t per = std::max<int64_t>(1, cap / std::max<int64_t>(1, O * I * int64_t(w0.element_size())));
    for (size_t b = 0; b < members.size(); b += per) {
      const int64_t L = std::min<int64_t>(per, int64_t(members.size() - b));
      at::Tensor D = at::zeros({O, L * I}, w0.options());
      for (int64_t l = 0; l < L; ++l) {
        const size_t i = members[b + l];
        adam_scatter(exp_avg[i], exp_avg_sq[i], steps[i], positions[i], indices[i], values[i], D, I, L * I, l * I,
                     O * I, lr, beta1, beta2, eps);
      }
      const at::Tensor R = at::mm(uo, D);  // [O, L*I]: U_out D_l in column block l
      const at::Tensor uiT = ui.t();
      for (int64_t l = 0; l < L; ++l) {
        const at::Tensor& w = weights[members[b + l]];
        w.addmm_(R.narrow(1, l * I, I), uiT);  // W_l += (U_out D_l) U_in^T; in-place methods are const
      }
    }
  }
}

TORCH_LIBRARY_IMPL(scalerec, CUDA, m) {
  m.impl("sparsegrad_lazy_adam_", &sparsegrad_lazy_adam_cuda);
}

}  // namespace scalerec
