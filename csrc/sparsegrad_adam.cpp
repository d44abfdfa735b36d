// SparseGrad's lazy-Adam step over all the rotated weights of an optimizer group, as ONE operator call.
//
// sparsegrad_lazy_adam_(weights[], exp_avg[], exp_avg_sq[], steps[], positions[], indices[], values[],
//                       u_out?[], u_in?[], lr, beta1, beta2, eps) -> ()
//   For each weight i, with k_i selected entries (flat indices `indices[i]` into the weight, gradient `values[i]`)
//   whose Adam state sits at `positions[i]` of the flat state tensors (the same as `indices[i]` for dense moments,
//   the entries' places in a compact entry set otherwise):
//     t = steps[pos] + 1;  m = b1 m[pos] + (1 - b1) g;  v = b2 v[pos] + (1 - b2) g^2   (written back at pos)
//     delta = -lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)                      (per-entry step counts)
//     weights[i] += U_out D U_inᵀ  with D.flat[indices] = delta  (scalerec::sparsegrad_rotated_update_),
//                   or weights[i].flat[indices] += delta when the weight has no rotations (MeProp).
//   The element-wise lines are one kernel per weight (scalerec::sparsegrad_adam_entries_, CPU and CUDA); the
//   reference is the Python loop of scalerec.ops.sparse_grad.sparsegrad_lazy_adam_reference (torch._foreach_*
//   over the weights), equal to rounding.
//
// Why an operator: on a GPU the step is bound by host overhead (H100, 2026-11-27: the optimizer step spanned 9.9 ms
// of the GPU timeline for 12 layers, its kernels a small part of it, against 1.1 ms for LoRA's whole AdamW step).
// Here a weight costs 5 kernel launches (the Adam kernel, then zeros, index_add, two GEMMs in the rotated update)
// instead of ~29 issued from Python. The loop itself is device-generic (registered once, CompositeExplicitAutograd).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <optional>

namespace scalerec {

namespace {

void rotated_update(const at::Tensor& weight, const at::Tensor& u_out, const at::Tensor& u_in,
                    const at::Tensor& indices, const at::Tensor& delta) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("scalerec::sparsegrad_rotated_update_", "")
                       .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const at::Tensor&)>();
  op.call(weight, u_out, u_in, indices, delta);
}

at::Tensor adam_entries(const at::Tensor& m, const at::Tensor& v, const at::Tensor& t, const at::Tensor& pos,
                        const at::Tensor& g, double lr, double beta1, double beta2, double eps) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("scalerec::sparsegrad_adam_entries_", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, double, double, double, double)>();
  return op.call(m, v, t, pos, g, lr, beta1, beta2, eps);
}

}  // namespace

// The argument lists' lengths (also used by the CUDA implementation, csrc/cuda/sparsegrad_lazy_adam.cu).
void check_lazy_adam_lists(at::TensorList weights, at::TensorList exp_avg, at::TensorList exp_avg_sq,
                           at::TensorList steps, at::TensorList positions, at::TensorList indices,
                           at::TensorList values, const c10::List<std::optional<at::Tensor>>& u_out,
                           const c10::List<std::optional<at::Tensor>>& u_in) {
  const size_t n = weights.size();
  TORCH_CHECK(exp_avg.size() == n && exp_avg_sq.size() == n && steps.size() == n && positions.size() == n &&
                  indices.size() == n && values.size() == n && u_out.size() == n && u_in.size() == n,
              "sparsegrad_lazy_adam_: every list must have one entry per weight (", n, ")");
}

void sparsegrad_lazy_adam_(at::TensorList weights, at::TensorList exp_avg, at::TensorList exp_avg_sq,
                           at::TensorList steps, at::TensorList positions, at::TensorList indices,
                           at::TensorList values, const c10::List<std::optional<at::Tensor>>& u_out,
                           const c10::List<std::optional<at::Tensor>>& u_in, double lr, double beta1, double beta2,
                           double eps) {
  check_lazy_adam_lists(weights, exp_avg, exp_avg_sq, steps, positions, indices, values, u_out, u_in);
  const size_t n = weights.size();
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& w = weights[i];
    const at::Tensor& pos = positions[i];
    const at::Tensor& g = values[i];
    TORCH_CHECK(pos.dim() == 1 && indices[i].dim() == 1 && g.dim() == 1 && pos.numel() == g.numel() &&
                    indices[i].numel() == g.numel(),
                "sparsegrad_lazy_adam_: weight ", i, ": positions, indices and values must be 1-D of one length");
    const std::optional<at::Tensor> uo = u_out.get(i), ui = u_in.get(i);
    TORCH_CHECK(uo.has_value() == ui.has_value(),
                "sparsegrad_lazy_adam_: weight ", i, ": give both rotations or neither");
    if (g.numel() == 0) continue;
    // the element-wise part in one kernel: moments and step counts updated in place at `pos`, the change returned
    const at::Tensor delta = adam_entries(exp_avg[i], exp_avg_sq[i], steps[i], pos, g, lr, beta1, beta2, eps);
    if (uo.has_value()) {
      rotated_update(w, *uo, *ui, indices[i], delta.to(w.scalar_type()));
    } else {
      w.view({-1}).index_add_(0, indices[i], delta.to(w.scalar_type()));
    }
  }
}

TORCH_LIBRARY_FRAGMENT(scalerec, m) {
  m.def("sparsegrad_lazy_adam_(Tensor(a!)[] weights, Tensor(b!)[] exp_avg, Tensor(c!)[] exp_avg_sq, "
        "Tensor(d!)[] steps, Tensor[] positions, Tensor[] indices, Tensor[] values, Tensor?[] u_out, "
        "Tensor?[] u_in, float lr, float beta1, float beta2, float eps) -> ()");
}

TORCH_LIBRARY_IMPL(scalerec, CompositeExplicitAutograd, m) {
  m.impl("sparsegrad_lazy_adam_", &sparsegrad_lazy_adam_);
}

}  // namespace scalerec
