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

// ---- per-op input validation (shared by the CPU and CUDA kernels)

inline void check_blockwise_ce(const at::Tensor& hidden, const at::Tensor& table, const at::Tensor& targets,
                               int64_t row_start, int64_t tile) {
  check_pair("blockwise_ce", hidden, table);
  TORCH_CHECK(row_start >= 0 && row_start < table.size(0), "blockwise_ce: row_start must lie in [0, C=",
              table.size(0), "), got ", row_start);
  TORCH_CHECK(tile > 0, "blockwise_ce: tile must be positive, got ", tile);
  check_targets("blockwise_ce", hidden, table, targets, row_start);
}

// allow_bf16_table: a bfloat16 table with float32 directions (the CPU kernel converts each tile on the fly)
inline void check_bucket_topk(const at::Tensor& dirs, const at::Tensor& table, int64_t k, int64_t row_start,
                              int64_t tile, bool allow_bf16_table = false) {
  if (allow_bf16_table && table.scalar_type() == at::kBFloat16 && dirs.scalar_type() == at::kFloat) {
    check_pair("bucket_topk", dirs, table.narrow(0, 0, 0).to(at::kFloat), "directions");
  } else {
    check_pair("bucket_topk", dirs, table, "directions");
  }
  TORCH_CHECK(row_start >= 0 && row_start <= table.size(0), "bucket_topk: row_start must lie in [0, C=",
              table.size(0), "], got ", row_start);
  TORCH_CHECK(k >= 1 && k <= table.size(0) - row_start, "bucket_topk: k must lie in [1, ", table.size(0) - row_start,
              "] (the rows from row_start=", row_start, "), got ", k);
  TORCH_CHECK(tile > 0, "bucket_topk: tile must be positive, got ", tile);
}

inline void check_bucket_ce(const at::Tensor& hidden, const at::Tensor& table, const at::Tensor& targets,
                            const at::Tensor& x_ids, const at::Tensor& y_ids) {
  check_pair("bucket_ce", hidden, table);
  check_targets("bucket_ce", hidden, table, targets);
  TORCH_CHECK(x_ids.dim() == 2 && y_ids.dim() == 2 && x_ids.size(0) == y_ids.size(0),
              "bucket_ce: x_ids must be [B, bx] and y_ids [B, by] with the same B, got ", x_ids.sizes(), " and ",
              y_ids.sizes());
  check_index("bucket_ce", x_ids, hidden, "x_ids");
  check_index("bucket_ce", y_ids, hidden, "y_ids");
  check_range("bucket_ce", x_ids, 0, hidden.size(0), "x_ids (query rows)");
  check_range("bucket_ce", y_ids, 0, table.size(0), "y_ids (table rows)");
}

inline void check_chunk_ce(const at::Tensor& hidden, const at::Tensor& table, const at::Tensor& targets,
                           const at::Tensor& x_chunks, const at::Tensor& y_chunks, int64_t n_extra) {
  check_pair("chunk_ce", hidden, table);
  check_targets("chunk_ce", hidden, table, targets);
  TORCH_CHECK(x_chunks.dim() == 3 && y_chunks.dim() == 3 && x_chunks.size(0) == y_chunks.size(0) &&
                  x_chunks.size(1) == y_chunks.size(1),
              "chunk_ce: x_chunks must be [R, K, cx] and y_chunks [R, K, cy] with the same R and K, got ",
              x_chunks.sizes(), " and ", y_chunks.sizes());
  check_index("chunk_ce", x_chunks, hidden, "x_chunks");
  check_index("chunk_ce", y_chunks, hidden, "y_chunks");
  check_range("chunk_ce", x_chunks, -1, hidden.size(0), "x_chunks (query rows, -1 = padding)");
  check_range("chunk_ce", y_chunks, -1, table.size(0), "y_chunks (table rows, -1 = padding)");
  TORCH_CHECK(n_extra >= 0, "chunk_ce: n_extra_chunks must be >= 0, got ", n_extra);
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
