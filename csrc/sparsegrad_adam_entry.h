// One selected entry's lazy-Adam update, shared by the CPU loop (csrc/cpu/sparsegrad_adam_entries.cpp) and the CUDA
// kernel (csrc/cuda/sparsegrad_adam_entries.cu), so the arithmetic that the CPU tests check is the GPU's too, up to
// nvcc's --use_fast_math (approximate division and sqrt, denormals flushed: ~1e-7 relative; the CUDA tests compare
// at rtol 1e-5).
//   t += 1 (saturating at the step type's maximum);  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;
//   returns delta = -lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
// `acc_t` is the arithmetic type (float for float/half/bfloat16 state, double for double); the bias corrections
// are computed in double and rounded to acc_t. `step_t` is int32_t or int16_t: a count that stops at 32767 gives
// the same rounded corrections as the true count whenever 1 - b^32767 already rounds to 1 in acc_t (b2 <= ~0.9994
// in float; scalerec.ops.sparse_grad.step_count_dtype decides), so 16-bit counts are then exact.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace scalerec {

template <typename step_t>
C10_HOST_DEVICE inline step_t saturating_increment(step_t t) {
  constexpr step_t top = step_t(~(uint64_t(1) << (8 * sizeof(step_t) - 1)));  // the signed type's maximum
  return t < top ? step_t(t + 1) : t;
}

template <typename acc_t, typename step_t>
C10_HOST_DEVICE inline acc_t lazy_adam_entry(acc_t& m, acc_t& v, step_t& t, acc_t g, double lr, double beta1,
                                             double beta2, double eps) {
  t = saturating_increment(t);
  m = m * static_cast<acc_t>(beta1) + static_cast<acc_t>(1 - beta1) * g;
  v = v * static_cast<acc_t>(beta2) + static_cast<acc_t>(1 - beta2) * g * g;
  const double bc1 = 1.0 - ::pow(beta1, static_cast<double>(t));
  const double bc2 = 1.0 - ::pow(beta2, static_cast<double>(t));
  const acc_t den = ::sqrt(v / static_cast<acc_t>(bc2)) + static_cast<acc_t>(eps);
  return (m / static_cast<acc_t>(bc1)) * static_cast<acc_t>(-lr) / den;
}

// The same at place `p` of a flat state (m, v of type scalar_t, int32 or int16 step counts), read and written
// back in scalar_t; returns the entry's change.
template <typename scalar_t, typename acc_t, typename step_t>
C10_HOST_DEVICE inline scalar_t lazy_adam_at(scalar_t* m, scalar_t* v, step_t* t, int64_t p, scalar_t g, double lr,
                                             double beta1, double beta2, double eps) {
  acc_t mm = static_cast<acc_t>(m[p]), vv = static_cast<acc_t>(v[p]);
  step_t tt = t[p];
  const acc_t d = lazy_adam_entry<acc_t, step_t>(mm, vv, tt, static_cast<acc_t>(g), lr, beta1, beta2, eps);
  m[p] = static_cast<scalar_t>(mm);
  v[p] = static_cast<scalar_t>(vv);
  t[p] = tt;
  return static_cast<scalar_t>(d);
}

}  // namespace scalerec

// Runs the lambda `...` with `step_t` bound to the C type of a step-count tensor's dtype (int32 or int16).
#define SCALEREC_DISPATCH_STEP_TYPE(TYPE, ...)                                              \
  [&] {                                                                                      \
    if ((TYPE) == at::kShort) {                                                              \
      using step_t = int16_t;                                                                \
      return __VA_ARGS__();                                                                  \
    }                                                                                        \
    TORCH_CHECK((TYPE) == at::kInt, "sparsegrad: step counts must be int32 or int16, got ", (TYPE)); \
    using step_t = int32_t;                                                                  \
    return __VA_ARGS__();                                                                    \
  }()
