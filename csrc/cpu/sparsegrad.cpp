// SparseGrad kernels (CPU).
//
// sparsegrad_topk_grad(grad_out [N,O], x [N,I], u_out [O,O]?, u_in [I,I]?, k) -> (indices [k] int64, values [k])
//   The weight gradient of y = x W^T + b, rotated into the SparseGrad basis, G~ = U_out^T (grad_out^T x) U_in,
//   reduced to its k entries of largest magnitude. `indices` are flat row-major positions in the [O, I] matrix,
//   sorted ascending (so they form a coalesced COO index); `values` are the gradient entries there. Without
//   u_out / u_in the rotation is the identity on that side (MeProp: top-k in the original basis). Each rotation
//   goes through the N rows or through the [O, I] product, whichever is cheaper (csrc/sparsegrad_rotated_grad.h).
//   Selection is O(O*I): one nth_element over the magnitudes at or above a bound taken from a sample (over all of
//   them when the sample's bound lets fewer than k through), and one scan, never a full sort. float32, float64 and
//   bfloat16 (the GEMMs then run in bfloat16 with float accumulation; faster only on some CPUs, e.g. with AMX:
//   scalerec.peft.config.fast_grad_dtype times it; the selection compares in float).
//
// sparsegrad_rotated_update_(weight [O,I], u_out [O,O], u_in [I,I], indices [k], delta [k]) -> ()
//   In place: weight += U_out D U_in^T, where D is the sparse [O, I] matrix with D.flat[indices] = delta.
//   A sparse-by-dense product: D U_in^T only touches the |R| rows of D that hold an entry (k*I work), then one
//   dense GEMM [O,|R|] x [|R|,I]; or the transposed route through the |C| touched columns when |C| < |R|.
//   Cost O*I*min(|R|,|C|) + k*max(O,I), against O*I*(O+I) for re-forming U_out W~ U_in^T.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <utility>
#include <vector>

#include "../sparsegrad_rotated_grad.h"

namespace scalerec {

namespace {

void check_rotation(const std::optional<at::Tensor>& u, int64_t n, const char* name, const at::Tensor& like) {
  if (!u.has_value()) return;
  TORCH_CHECK(u->dim() == 2 && u->size(0) == n && u->size(1) == n, "sparsegrad: ", name, " must be [", n, ", ", n,
              "], got shape ", u->sizes());
  TORCH_CHECK(u->scalar_type() == like.scalar_type(), "sparsegrad: ", name, " dtype ", u->scalar_type(),
              " differs from the input dtype ", like.scalar_type());
  TORCH_CHECK(u->device() == like.device(), "sparsegrad: ", name, " is on another device");
}

// "a ranks above b" for magnitudes, NaN above everything (torch.topk's order, and the CUDA kernel's): a strict weak
// order even with NaNs, which nth_element needs (with a plain `>` a NaN breaks it: undefined behaviour).
template <typename acc_t>
inline bool above(acc_t a, acc_t b) {
  return std::isnan(a) ? !std::isnan(b) : a > b;
}

// Top-k of |v| (exact; ties at the threshold taken in index order; NaNs rank first). Large inputs: a stratified sample of the
// magnitudes gives a bound `lo` expected to let ~2k entries through; one pass collects those (in index order)
// and only they are partially sorted and scanned. If fewer than k entries reach the bound, the full path runs
// (nth_element over all n magnitudes and a scan of all n).
template <typename scalar_t>
void topk_abs(const scalar_t* v, int64_t n, int64_t k, int64_t* out_idx, scalar_t* out_val) {
  using acc_t = at::opmath_type<scalar_t>;  // float for bfloat16
  constexpr int64_t kSample = 8192;
  std::vector<int64_t> cand;  // fast path: the entries with |v| >= lo, ascending
  std::vector<acc_t> mag;
  bool fast = false;
  if (n >= 8 * kSample && 8 * k <= n) {
    // one entry from each of kSample equal strata, at a hashed offset within it: a fixed stride would alias with
    // the matrix's width (stride 72 over 384 columns samples 16 of them), and a rotated gradient's magnitudes depend
    // on the column; that biased bound failed the fast path in every MiniLM up-projection
    const int64_t stride = n / kSample;
    std::vector<acc_t> smp(kSample);
    for (int64_t i = 0; i < kSample; ++i) {
      const uint64_t h = (uint64_t(i) + 1) * 0x9E3779B97F4A7C15ull;
      smp[i] = std::abs(static_cast<acc_t>(v[i * stride + int64_t((h >> 33) % uint64_t(stride))]));
    }
    const int64_t q = std::min<int64_t>(kSample - 1, (2 * k * kSample) / n + 32);
    std::nth_element(smp.begin(), smp.begin() + q, smp.end(), above<acc_t>);
    const acc_t lo = smp[q];
    cand.reserve(4 * k);
    mag.reserve(4 * k);
    for (int64_t i = 0; i < n; ++i) {
      const acc_t a = std::abs(static_cast<acc_t>(v[i]));
      if (!above(lo, a)) {
        cand.push_back(i);
        mag.push_back(a);
      }
    }
    fast = (int64_t)cand.size() >= k;
  }
  if (!fast) {
    mag.resize(n);
    at::parallel_for(0, n, 1 << 14, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) mag[i] = std::abs(static_cast<acc_t>(v[i]));
    });
  }
  // 1) threshold = the k-th largest |v|; after nth_element every magnitude strictly above it is in mag[0, k-1)
  std::nth_element(mag.begin(), mag.begin() + (k - 1), mag.end(), above<acc_t>);
  const acc_t thr = mag[k - 1];
  int64_t n_above = 0;
  for (int64_t i = 0; i < k; ++i) n_above += above(mag[i], thr);
  // 2) every entry above the threshold is taken; the rest of the k are ties at the threshold, in index order
  int64_t ties = k - n_above;
  int64_t pos = 0;
  const int64_t m = fast ? (int64_t)cand.size() : n;
  for (int64_t j = 0; j < m && pos < k; ++j) {
    const int64_t i = fast ? cand[j] : j;
    const acc_t a = std::abs(static_cast<acc_t>(v[i]));
    const bool up = above(a, thr);
    if (up || (ties > 0 && !above(thr, a))) {
      if (!up) --ties;
      out_idx[pos] = i;
      out_val[pos] = v[i];
      ++pos;
    }
  }
  TORCH_CHECK(pos == k, "sparsegrad: internal error in top-k selection (", pos, " of ", k, ")");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> sparsegrad_topk_grad_cpu(const at::Tensor& grad_out_, const at::Tensor& x_,
                                                            const std::optional<at::Tensor>& u_out_,
                                                            const std::optional<at::Tensor>& u_in_, int64_t k) {
  TORCH_CHECK(grad_out_.dim() == 2, "sparsegrad_topk_grad: grad_out must be [N, O], got shape ", grad_out_.sizes());
  TORCH_CHECK(x_.dim() == 2, "sparsegrad_topk_grad: x must be [N, I], got shape ", x_.sizes());
  TORCH_CHECK(grad_out_.size(0) == x_.size(0), "sparsegrad_topk_grad: grad_out has N=", grad_out_.size(0),
              " but x has N=", x_.size(0));
  TORCH_CHECK(grad_out_.scalar_type() == x_.scalar_type(), "sparsegrad_topk_grad: grad_out and x dtypes differ");
  const int64_t O = grad_out_.size(1), I = x_.size(1);
  check_rotation(u_out_, O, "u_out", x_);
  check_rotation(u_in_, I, "u_in", x_);
  TORCH_CHECK(k >= 1 && k <= O * I, "sparsegrad_topk_grad: k must be in [1, ", O * I, "], got ", k);
  // the bases go to the GEMMs in whatever layout they are stored (SparseGrad keeps them column-major)
  at::Tensor G = sparsegrad_rotated_weight_grad(grad_out_, x_, u_out_, u_in_).contiguous();
  auto idx = at::empty({k}, x_.options().dtype(at::kLong));
  auto val = at::empty({k}, x_.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, G.scalar_type(), "sparsegrad_topk_grad_cpu", [&] {
    topk_abs<scalar_t>(G.data_ptr<scalar_t>(), O * I, k, idx.data_ptr<int64_t>(), val.data_ptr<scalar_t>());
  });
  return {idx, val};
}

// sparsegrad_topk_grad_coo: the same selection as (indices [3, k] int64: rows, columns and flat ids, so that
// indices[:2] is the COO index; keys [k]: the flat ids as int32 when the weight has fewer than 2^31 entries, else
// int64; values [k]). One call gives the backward its COO index and the optimizer its entry ids (a GPU would
// otherwise launch a kernel for each).
std::tuple<at::Tensor, at::Tensor, at::Tensor> sparsegrad_topk_grad_coo_cpu(const at::Tensor& grad_out,
                                                                            const at::Tensor& x,
                                                                            const std::optional<at::Tensor>& u_out,
                                                                            const std::optional<at::Tensor>& u_in,
                                                                            int64_t k) {
  auto [idx, val] = sparsegrad_topk_grad_cpu(grad_out, x, u_out, u_in, k);
  const int64_t I = x.size(1), n = grad_out.size(1) * I;
  auto ind = at::empty({3, k}, idx.options());
  auto keys = at::empty({k}, idx.options().dtype(n < (int64_t(1) << 31) ? at::kInt : at::kLong));
  const int64_t* ip = idx.data_ptr<int64_t>();
  int64_t* rp = ind.data_ptr<int64_t>();
  for (int64_t p = 0; p < k; ++p) {
    rp[p] = ip[p] / I;
    rp[k + p] = ip[p] % I;
    rp[2 * k + p] = ip[p];
  }
  if (keys.scalar_type() == at::kInt) {
    int32_t* kp = keys.data_ptr<int32_t>();
    for (int64_t p = 0; p < k; ++p) kp[p] = static_cast<int32_t>(ip[p]);
  } else {
    keys.copy_(idx);
  }
  return {ind, keys, val};
}

void sparsegrad_rotated_update_cpu(const at::Tensor& weight, const at::Tensor& u_out_, const at::Tensor& u_in_,
                                   const at::Tensor& indices_, const at::Tensor& delta_) {
  TORCH_CHECK(weight.dim() == 2, "sparsegrad_rotated_update_: weight must be [O, I], got shape ", weight.sizes());
  const int64_t O = weight.size(0), I = weight.size(1);
  check_rotation(u_out_, O, "u_out", weight);
  check_rotation(u_in_, I, "u_in", weight);
  TORCH_CHECK(indices_.dim() == 1 && delta_.dim() == 1 && indices_.size(0) == delta_.size(0),
              "sparsegrad_rotated_update_: indices and delta must be 1-D of one length, got ", indices_.sizes(), " and ",
              delta_.sizes());
  TORCH_CHECK(indices_.scalar_type() == at::kLong, "sparsegrad_rotated_update_: indices must be int64");
  TORCH_CHECK(delta_.scalar_type() == weight.scalar_type(), "sparsegrad_rotated_update_: delta dtype differs from weight");
  const int64_t k = indices_.size(0);
  if (k == 0) return;
  auto indices = indices_.contiguous();
  auto delta = delta_.contiguous();
  {
    const int64_t lo = indices.min().item<int64_t>(), hi = indices.max().item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < O * I, "sparsegrad_rotated_update_: index out of range [0, ", O * I, "): min ", lo,
                ", max ", hi);
  }
  const int64_t* ip = indices.data_ptr<int64_t>();
  // Distinct rows and columns holding an entry.
  std::vector<int64_t> row_slot(O, -1), col_slot(I, -1);
  std::vector<int64_t> rows, cols;
  for (int64_t p = 0; p < k; ++p) {
    const int64_t r = ip[p] / I, c = ip[p] % I;
    if (row_slot[r] < 0) { row_slot[r] = (int64_t)rows.size(); rows.push_back(r); }
    if (col_slot[c] < 0) { col_slot[c] = (int64_t)cols.size(); cols.push_back(c); }
  }
  const bool by_rows = rows.size() <= cols.size();
  // by rows:    weight      += U_out[:, R] @ T,   T[s, :] = sum_{(r_s, c)} d * U_in[:, c]^T     ([|R|, I])
  // by columns: weight^T    += U_in[:, C] @ T,   T[s, :] = sum_{(r, c_s)} d * U_out[:, r]^T    ([|C|, O])
  const at::Tensor& a = by_rows ? u_in_ : u_out_;   // side multiplied in the sparse step
  const at::Tensor& b = by_rows ? u_out_ : u_in_;   // side of the dense GEMM
  const auto& slot = by_rows ? row_slot : col_slot;
  const int64_t S = by_rows ? (int64_t)rows.size() : (int64_t)cols.size();
  const int64_t L = by_rows ? I : O;  // length of a T row
  auto aT = a.t().contiguous();       // row j of aT = column j of a (no copy when a is stored column-major)
  // half types: T accumulates in float and is rounded once, before the GEMM
  const bool half = weight.scalar_type() == at::kHalf || weight.scalar_type() == at::kBFloat16;
  auto T = at::zeros({S, L}, weight.options().dtype(half ? at::kFloat : weight.scalar_type()));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "sparsegrad_rotated_update_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* dp = delta.data_ptr<scalar_t>();
    const scalar_t* ap = aT.data_ptr<scalar_t>();
    acc_t* tp = T.data_ptr<acc_t>();
    // Each thread owns a range of T rows and scans the entries: no write races.
    at::parallel_for(0, S, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t p = 0; p < k; ++p) {
        const int64_t r = ip[p] / I, c = ip[p] % I;
        const int64_t s = slot[by_rows ? r : c];
        if (s < lo || s >= hi) continue;
        const acc_t d = static_cast<acc_t>(dp[p]);
        const scalar_t* arow = ap + (by_rows ? c : r) * L;
        acc_t* trow = tp + s * L;
        for (int64_t j = 0; j < L; ++j) trow[j] += d * static_cast<acc_t>(arow[j]);
      }
    });
  });
  if (half) T = T.to(weight.scalar_type());
  auto sel = at::tensor(by_rows ? rows : cols, indices.options());
  auto bsel = b.index_select(1, sel);  // [O, |R|] or [I, |C|]
  if (by_rows) {
    weight.addmm_(bsel, T);
  } else {
    auto wt = weight.t();
    wt.addmm_(bsel, T);
  }
}

TORCH_LIBRARY_FRAGMENT(scalerec, m) {
  m.def("sparsegrad_topk_grad(Tensor grad_out, Tensor x, Tensor? u_out, Tensor? u_in, int k) -> (Tensor, Tensor)");
  m.def("sparsegrad_topk_grad_coo(Tensor grad_out, Tensor x, Tensor? u_out, Tensor? u_in, int k) -> (Tensor, Tensor, Tensor)");
  m.def("sparsegrad_rotated_update_(Tensor(a!) weight, Tensor u_out, Tensor u_in, Tensor indices, Tensor delta) -> ()");
}

TORCH_LIBRARY_IMPL(scalerec, CPU, m) {
  m.impl("sparsegrad_topk_grad", &sparsegrad_topk_grad_cpu);
  m.impl("sparsegrad_topk_grad_coo", &sparsegrad_topk_grad_coo_cpu);
  m.impl("sparsegrad_rotated_update_", &sparsegrad_rotated_update_cpu);
}

}  // namespace scalerec
