// Shared by the CE-family ops (blockwise_ce, bucket_topk, bucket_ce, chunk_ce), CPU and CUDA alike:
// input validation with clear messages, and the device-generic pieces of their backward passes.
#pragma once

#include <torch/torch.h>

#include <vector>

namespace scalerec {
namespace ce {

// [hidden N x d] and [table C x d]: same d, same float dtype (float32/float64), same device
inline void check_pair(const char* op, const at::Tensor& hidden, const at::Tensor& table, const char* hname = "hidden") {
  TORCH_CHECK(hidden.dim() == 2, op, ": ", hname, " must be [N, d], got shape ", hidden.sizes());
  TORCH_CHECK(table.dim() == 2, op, ": table must be [C, d], got shape ", table.sizes());
  TORCH_CHECK(hidden.size(1) == table.size(1), op, ": ", hname, " has d=", hidden.size(1), " but table has d=",
              table.size(1));
  TORCH_CHECK(hidden.scalar_type() == table.scalar_type(), op, ": ", hname, " and table dtypes differ (",
              hidden.scalar_type(), " vs ", table.scalar_type(), ")");
  TORCH_CHECK(hidden.scalar_type() == at::kFloat || hidden.scalar_type() == at::kDouble, op, ": ", hname,
              "/table must be float32 or float64, got ", hidden.scalar_type());
  TORCH_CHECK(hidden.device() == table.device(), op, ": ", hname, " and table must be on one device, got ",
              hidden.device(), " and ", table.device());
}

// an int64 index tensor on `like`'s device
inline void check_index(const char* op, const at::Tensor& ids, const at::Tensor& like, const char* name) {
  TORCH_CHECK(ids.scalar_type() == at::kLong, op, ": ", name, " must be int64, got ", ids.scalar_type());
  TORCH_CHECK(ids.device() == like.device(), op, ": ", name, " must be on ", like.device(), ", got ", ids.device());
}

// every entry of ids in [lo, hi)
inline void check_range(const char* op, const at::Tensor& ids, int64_t lo, int64_t hi, const char* name) {
  if (ids.numel() == 0) return;
  const int64_t lo_v = ids.min().item<int64_t>(), hi_v = ids.max().item<int64_t>();
  TORCH_CHECK(lo_v >= lo && hi_v < hi, op, ": ", name, " must lie in [", lo, ", ", hi, "), got min ", lo_v, ", max ",
              hi_v);
}

inline void check_targets(const char* op, const at::Tensor& hidden, const at::Tensor& table, const at::Tensor& targets,
                          int64_t lo = 0) {
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == hidden.size(0), op, ": targets must be [N]=[", hidden.size(0),
              "], got shape ", targets.sizes());
  check_index(op, targets, hidden, "targets");
  check_range(op, targets, lo, table.size(0), "targets");
}

// the sum of the defined per-thread partial tensors (undefined if there is none)
inline at::Tensor sum_parts(std::vector<at::Tensor>& parts) {
  at::Tensor total;
  for (auto& p : parts) {
    if (!p.defined()) continue;
    if (!total.defined()) total = p;
    else total.add_(p);
  }
  return total;
}

// The positive's term of d(lse - pos)/d(hidden, table) with upstream gradient g [N]:
// d/d pos = exp(pos - lse) - 1 (the positive's softmax probability minus one), with
// `positive_in_lse` = false when the positive is not one of lse's terms (blockwise_ce sums over all classes,
// so the positive is already covered there and d/d pos = -1).
inline void add_positive_grad(at::Tensor& grad_hidden, at::Tensor& grad_table, const at::Tensor& hidden,
                              const at::Tensor& table, const at::Tensor& targets, const at::Tensor& lse,
                              const at::Tensor& g, bool positive_in_lse) {
  auto t_pos = table.index_select(0, targets);
  at::Tensor coef;
  if (positive_in_lse) {
    auto pos = (hidden * t_pos).sum(1);
    coef = (at::exp(pos - lse) - 1).mul_(g).unsqueeze(1);
  } else {
    coef = (-g).unsqueeze(1);
  }
  grad_hidden.add_(t_pos * coef);
  grad_table.index_add_(0, targets, hidden * coef);
}

}  // namespace ce
}  // namespace scalerec
