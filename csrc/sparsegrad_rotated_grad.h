// The rotated weight gradient of a SparseGrad linear layer, G~ = U_out^T (grad_out^T x) U_in  ([O, I]), shared by
// the CPU and CUDA top-k ops (csrc/cpu/sparsegrad.cpp, csrc/cuda/sparsegrad.cu): the products go through at::mm,
// so the same code runs on either device.
//
// Four orders give the same matrix; the cheapest in multiply-adds is taken, with N rows of grad_out / x:
//   direct          (grad_out^T x), then U_out^T . and . U_in      N*O*I + O*O*I + O*I*I
//   inputs first    (grad_out U_out)^T (x U_in)                    N*O*O + N*I*I + N*O*I
//   x first         U_out^T (grad_out^T (x U_in))                  N*I*I + N*O*I + O*O*I
//   grad_out first  ((grad_out U_out)^T x) U_in                    N*O*O + N*O*I + O*I*I
// A rotated side costs N * side^2 when the rows go through it and the other side * side^2 when the [O, I] product
// does, so each side is rotated where it is cheaper: the rows when N is below the other side's width. With MiniLM's
// MLP (O, I = 1536, 384 or 384, 1536) and the ~440 non-padding rows of a 32-sentence SST-2 batch, the small side
// goes through the rows: ~12 % fewer multiply-adds than the direct order. Without a rotation its terms are 0.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace scalerec {

inline at::Tensor sparsegrad_rotated_weight_grad(const at::Tensor& g, const at::Tensor& x,
                                                 const std::optional<at::Tensor>& u_out,
                                                 const std::optional<at::Tensor>& u_in) {
  const int64_t N = g.size(0), O = g.size(1), I = x.size(1);
  // U_out: through the rows N*O*O, through the product I*O*O; U_in: N*I*I against O*I*I (ties: the product)
  const bool out_first = u_out.has_value() && N < I;
  const bool in_first = u_in.has_value() && N < O;
  const at::Tensor gr = out_first ? at::mm(g, *u_out) : g;   // [N, O]
  const at::Tensor xr = in_first ? at::mm(x, *u_in) : x;     // [N, I]
  at::Tensor G = at::mm(gr.t(), xr);                         // [O, I]
  if (u_out.has_value() && !out_first) G = at::mm(u_out->t(), G);
  if (u_in.has_value() && !in_first) G = at::mm(G, *u_in);
  return G;
}

}  // namespace scalerec
