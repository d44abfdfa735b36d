// CUDA kernels of the SparseGrad ops (compiled only when torch has CUDA and a toolkit is present).
// Same contracts as csrc/cpu/sparsegrad.cpp:
//   sparsegrad_topk_grad(grad_out, x, u_out?, u_in?, k) -> (flat indices ascending [k], values [k])
//   sparsegrad_topk_grad_coo(...) -> (indices [3, k]: rows, columns, flat ids; keys [k] int32; values [k])
//   sparsegrad_rotated_update_(weight, u_out, u_in, indices, delta): weight += U_out D U_in^T, D sparse.
// The dense products go to cuBLAS through at::mm; the selection is this file's radix select (below: 5 kernels for
// float32, no host sync; SCALEREC_SPARSEGRAD_SELECT=torch switches to at::topk + sort for comparison); the
// sparse-by-dense update scatters the k deltas into a dense zero matrix and multiplies it through both bases (no
// host sync: see sparsegrad_rotated_update_cuda).
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cub/cub.cuh>
#include <torch/library.h>
#include <torch/torch.h>

#include "../sparsegrad_rotated_grad.h"

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <optional>

namespace scalerec {

// ---------------------------------------------------------------------------------------------------------------
// Exact top-k of |G| by radix select, indices ascending, in 2 + P kernels (P = 2, 3 or 6 digit passes for 16-, 32-
// and 64-bit types) and no host sync. It replaces at::topk + sort + index_select (~25 launches per layer; on a GPU
// the SparseGrad step is host-bound, so the launches are what costs).
//   key(v) = the bits of |v| (sign cleared): for IEEE floats their order as unsigned integers is the order of the
//            magnitudes (NaN above inf, as in torch.topk).
//   pass p (radix_hist_kernel): histogram of the p-th 11-bit digit (from the top) of the keys that share the digits
//            fixed so far; the last block to finish picks the digit that holds the k-th largest key and writes
//            (prefix, need) for the next pass. After the last pass, T = prefix is the k-th largest key and `need`
//            says how many of the keys equal to T are taken.
//   radix_count_kernel: per chunk of kChunk entries, the keys > T and == T; the last block to finish turns both
//            counts into their exclusive prefix sums over the chunks (one pass, not one sum per chunk).
//   radix_write_kernel: every entry with key > T and the first `need` with key == T (ties in index order, as the
//            CPU kernel takes them) go to their place in ascending index order, with their signed values.
namespace {

constexpr int kDigitBits = 11;
constexpr int kBins = 1 << kDigitBits;  // 2048
constexpr int kThreads = 256;
constexpr int kItems = 8;
constexpr int kChunk = kThreads * kItems;  // entries per block in the count and write kernels
constexpr int kBinsPerThread = kBins / kThreads;
static_assert(kBins % kThreads == 0, "bins per thread");

template <typename T>
struct MagKey;
template <>
struct MagKey<float> {
  using type = unsigned int;
  static constexpr int bits = 32;
  __device__ static type of(float v) { return __float_as_uint(v) & 0x7fffffffu; }
};
template <>
struct MagKey<double> {
  using type = unsigned long long;
  static constexpr int bits = 64;
  __device__ static type of(double v) {
    return static_cast<unsigned long long>(__double_as_longlong(v)) & 0x7fffffffffffffffull;
  }
};
template <>
struct MagKey<at::Half> {
  using type = unsigned int;
  static constexpr int bits = 16;
  __device__ static type of(at::Half v) { return static_cast<unsigned int>(v.x) & 0x7fffu; }
};
template <>
struct MagKey<at::BFloat16> {
  using type = unsigned int;
  static constexpr int bits = 16;
  __device__ static type of(at::BFloat16 v) { return static_cast<unsigned int>(v.x) & 0x7fffu; }
};

constexpr int num_passes(int bits) { return (bits + kDigitBits - 1) / kDigitBits; }

struct SelectState {
  unsigned long long prefix;  // the key bits fixed by the passes so far (the lower bits zero)
  long long need;             // how many of the entries that carry that prefix are still to be taken
};

// Workspace (one zero-filled int64 tensor): states [P + 1], then int32 histograms [P][kBins], finished-block
// counters [P + 1] (the digit passes, then the count kernel), and per-chunk counts [2][chunks] (the count kernel
// leaves their exclusive prefix sums there).
struct Workspace {
  SelectState* state;
  int* hist;
  unsigned int* done;
  int* counts;
};

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) radix_hist_kernel(const scalar_t* __restrict__ v, int64_t n, int64_t k,
                                                              int pass, Workspace ws) {
  using K = MagKey<scalar_t>;
  using key_t = typename K::type;
  __shared__ int sh[kBins];
  __shared__ bool is_last;
  const int hi = K::bits - kDigitBits * pass;  // key bits [hi, bits) are fixed by the earlier passes
  const int lo = hi > kDigitBits ? hi - kDigitBits : 0;  // this pass's digit: bits [lo, hi)
  const unsigned long long prefix = pass == 0 ? 0ull : ws.state[pass].prefix;
  const key_t digit_mask = static_cast<key_t>((1ull << (hi - lo)) - 1ull);
  for (int b = threadIdx.x; b < kBins; b += kThreads) sh[b] = 0;
  __syncthreads();
  for (int64_t i = blockIdx.x * (int64_t)kThreads + threadIdx.x; i < n; i += (int64_t)gridDim.x * kThreads) {
    const key_t key = K::of(v[i]);
    if (pass > 0 && (static_cast<unsigned long long>(key) >> hi) != (prefix >> hi)) continue;
    atomicAdd(&sh[(key >> lo) & digit_mask], 1);
  }
  __syncthreads();
  int* h = ws.hist + pass * kBins;
  for (int b = threadIdx.x; b < kBins; b += kThreads)
    if (sh[b]) atomicAdd(&h[b], sh[b]);
  __threadfence();  // this block's counts are visible device-wide before it reports done
  __syncthreads();
  if (threadIdx.x == 0) is_last = atomicAdd(&ws.done[pass], 1u) == gridDim.x - 1;
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  // The last block: thread t holds the bins [kBins - kBinsPerThread (t + 1), kBins - kBinsPerThread t), scanned
  // from the top; `above` = the entries in higher bins. The bin where `above` crosses `need` is the digit.
  const long long need = pass == 0 ? k : ws.state[pass].need;
  int mine[kBinsPerThread];
  long long sum = 0;
  for (int j = 0; j < kBinsPerThread; ++j) {
    mine[j] = __ldcg(&h[kBins - 1 - (kBinsPerThread * threadIdx.x + j)]);  // L2: other blocks' atomics
    sum += mine[j];
  }
  using Scan = cub::BlockScan<long long, kThreads>;
  __shared__ typename Scan::TempStorage scan_tmp;
  long long above;
  Scan(scan_tmp).ExclusiveSum(sum, above);
  for (int j = 0; j < kBinsPerThread; ++j) {
    const int bin = kBins - 1 - (kBinsPerThread * threadIdx.x + j);
    if (above < need && above + mine[j] >= need) {
      ws.state[pass + 1].prefix = prefix | (static_cast<unsigned long long>(bin) << lo);
      ws.state[pass + 1].need = need - above;
    }
    above += mine[j];
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) radix_count_kernel(const scalar_t* __restrict__ v, int64_t n, int passes,
                                                               Workspace ws, int chunks) {
  using K = MagKey<scalar_t>;
  using key_t = typename K::type;
  const key_t T = static_cast<key_t>(ws.state[passes].prefix);
  const int64_t base = blockIdx.x * (int64_t)kChunk + threadIdx.x * (int64_t)kItems;
  int packed = 0;  // (above T) + (equal to T) << 16: both at most kChunk < 2^16
  for (int j = 0; j < kItems; ++j) {
    const int64_t i = base + j;
    if (i < n) {
      const key_t key = K::of(v[i]);
      packed += (key > T) ? 1 : (key == T ? (1 << 16) : 0);
    }
  }
  using Reduce = cub::BlockReduce<int, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  __shared__ bool is_last;
  const int total = Reduce(tmp).Sum(packed);
  if (threadIdx.x == 0) {
    ws.counts[blockIdx.x] = total & 0xffff;
    ws.counts[chunks + blockIdx.x] = total >> 16;
    __threadfence();  // this block's counts are visible device-wide before it reports done
    is_last = atomicAdd(&ws.done[passes], 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  // The last block: the exclusive prefix sums of both counts over the chunks, in place, kChunk chunks a round
  // (thread t holds chunks [kItems t, kItems (t + 1)) of the round). A chunk's two counts travel as one 64-bit
  // word, (== T) << 32 | (> T): each sum is at most n <= INT_MAX, so the low half never carries into the high.
  using Scan = cub::BlockScan<unsigned long long, kThreads>;
  __shared__ typename Scan::TempStorage scan_tmp;
  unsigned long long carry = 0;  // the same in every thread: the sum of the rounds before
  for (int64_t round = 0; round < chunks; round += kChunk) {
    unsigned long long x[kItems];
    for (int j = 0; j < kItems; ++j) {
      const int64_t c = round + threadIdx.x * (int64_t)kItems + j;
      x[j] = c < chunks ? (static_cast<unsigned long long>(static_cast<unsigned int>(__ldcg(&ws.counts[c]))) |
                           (static_cast<unsigned long long>(static_cast<unsigned int>(__ldcg(&ws.counts[chunks + c])))
                            << 32))
                        : 0ull;
    }
    unsigned long long before[kItems], round_total;  // round_total: the block-wide sum, given to every thread
    Scan(scan_tmp).ExclusiveSum(x, before, round_total);
    for (int j = 0; j < kItems; ++j) {
      const int64_t c = round + threadIdx.x * (int64_t)kItems + j;
      if (c < chunks) {
        const unsigned long long p = carry + before[j];
        ws.counts[c] = static_cast<int>(p & 0xffffffffull);
        ws.counts[chunks + c] = static_cast<int>(p >> 32);
      }
    }
    carry += round_total;
    __syncthreads();  // scan_tmp is reused by the next round
  }
}

// Where the selected entries go: flat ids and values always; with `coords`, also the rows ([0, k)) and columns
// ([k, 2k)) of a [3, k] index whose last row is `flat`; with `keys`, the flat ids as int32 as well.
template <typename scalar_t>
struct Outputs {
  int64_t* flat;
  scalar_t* val;
  int64_t* coords;  // or nullptr
  int* keys;        // or nullptr
  int64_t k, cols;
};

template <typename scalar_t>
__device__ __forceinline__ void emit(const Outputs<scalar_t>& o, long long pos, int64_t i, scalar_t value) {
  o.flat[pos] = i;
  o.val[pos] = value;
  if (o.coords != nullptr) {
    o.coords[pos] = i / o.cols;
    o.coords[o.k + pos] = i % o.cols;
  }
  if (o.keys != nullptr) o.keys[pos] = static_cast<int>(i);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) radix_write_kernel(const scalar_t* __restrict__ v, int64_t n, int passes,
                                                               Workspace ws, int chunks, Outputs<scalar_t> out) {
  using K = MagKey<scalar_t>;
  using key_t = typename K::type;
  const key_t T = static_cast<key_t>(ws.state[passes].prefix);
  const long long need = ws.state[passes].need;
  // the entries above T and equal to T in the chunks before this one (the count kernel's prefix sums)
  const long long chunk_gt = ws.counts[blockIdx.x], chunk_eq = ws.counts[chunks + blockIdx.x];
  using Scan = cub::BlockScan<int, kThreads>;
  __shared__ typename Scan::TempStorage scan_tmp;
  // this thread's kItems consecutive entries, and the ones before them inside the chunk
  const int64_t base = blockIdx.x * (int64_t)kChunk + threadIdx.x * (int64_t)kItems;
  key_t keys[kItems];
  int packed = 0;
  for (int j = 0; j < kItems; ++j) {
    const int64_t i = base + j;
    keys[j] = i < n ? K::of(v[i]) : key_t(0);
    if (i < n) packed += (keys[j] > T) ? 1 : (keys[j] == T ? (1 << 16) : 0);
  }
  int before;
  Scan(scan_tmp).ExclusiveSum(packed, before);
  long long g = chunk_gt + (before & 0xffff), e = chunk_eq + (before >> 16);
  for (int j = 0; j < kItems; ++j) {
    const int64_t i = base + j;
    if (i >= n) break;
    if (keys[j] > T) {
      const long long pos = g + (e < need ? e : need);
      emit(out, pos, i, v[i]);
      ++g;
    } else if (keys[j] == T) {
      if (e < need) {
        emit(out, g + e, i, v[i]);
      }
      ++e;
    }
  }
}

template <typename scalar_t>
void radix_topk_abs(const at::Tensor& G, int64_t k, const Outputs<scalar_t>& out) {
  constexpr int P = num_passes(MagKey<scalar_t>::bits);
  const int64_t n = G.numel();
  const int chunks = static_cast<int>((n + kChunk - 1) / kChunk);
  // int64 words: the states, then the int32 arrays two to a word
  const int64_t ints = int64_t(P) * kBins + (P + 1) + 2 * int64_t(chunks);
  const int64_t words = 2 * int64_t(P + 1) + (ints + 1) / 2;
  at::Tensor buf = at::zeros({words}, G.options().dtype(at::kLong));
  Workspace ws;
  ws.state = reinterpret_cast<SelectState*>(buf.data_ptr<int64_t>());
  ws.hist = reinterpret_cast<int*>(buf.data_ptr<int64_t>() + 2 * (P + 1));
  ws.done = reinterpret_cast<unsigned int*>(ws.hist + P * kBins);
  ws.counts = reinterpret_cast<int*>(ws.done + P + 1);
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, G.get_device()));
  const int hist_blocks = static_cast<int>(std::min<int64_t>(chunks, 4 * int64_t(sms)));
  auto stream = c10::cuda::getCurrentCUDAStream();
  const scalar_t* v = G.const_data_ptr<scalar_t>();
  for (int p = 0; p < P; ++p) {
    radix_hist_kernel<scalar_t><<<hist_blocks, kThreads, 0, stream>>>(v, n, k, p, ws);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  radix_count_kernel<scalar_t><<<chunks, kThreads, 0, stream>>>(v, n, P, ws, chunks);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  radix_write_kernel<scalar_t><<<chunks, kThreads, 0, stream>>>(v, n, P, ws, chunks, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

bool use_torch_topk() {
  const char* s = std::getenv("SCALEREC_SPARSEGRAD_SELECT");
  if (s == nullptr || s[0] == '\0' || std::strcmp(s, "radix") == 0) return false;
  TORCH_CHECK(std::strcmp(s, "torch") == 0, "SCALEREC_SPARSEGRAD_SELECT must be 'radix' (the default) or 'torch', "
              "got '", s, "'");
  return true;
}

}  // namespace

namespace {

// The checked rotated gradient, flattened (the selection's input).
at::Tensor rotated_grad_for_selection(const at::Tensor& grad_out, const at::Tensor& x,
                                      const std::optional<at::Tensor>& u_out_, const std::optional<at::Tensor>& u_in_,
                                      int64_t k) {
  TORCH_CHECK(grad_out.dim() == 2 && x.dim() == 2 && grad_out.size(0) == x.size(0),
              "sparsegrad_topk_grad: expected grad_out [N, O] and x [N, I]");
  const int64_t O = grad_out.size(1), I = x.size(1);
  TORCH_CHECK(k >= 1 && k <= O * I, "sparsegrad_topk_grad: k must be in [1, ", O * I, "], got ", k);
  TORCH_CHECK(!u_out_ || (u_out_->size(0) == O && u_out_->size(1) == O), "sparsegrad: u_out must be [O, O]");
  TORCH_CHECK(!u_in_ || (u_in_->size(0) == I && u_in_->size(1) == I), "sparsegrad: u_in must be [I, I]");
  TORCH_CHECK(O * I <= INT_MAX, "sparsegrad_topk_grad (CUDA): the weight has ", O * I, " entries; at most ",
              INT_MAX, " are supported");
  return sparsegrad_rotated_weight_grad(grad_out, x, u_out_, u_in_).reshape(-1).contiguous();
}

// at::topk + sort + index_select: the selection before the radix select, kept for comparison
std::tuple<at::Tensor, at::Tensor> torch_topk_abs(const at::Tensor& G, int64_t k) {
  auto top = at::topk(G.abs(), k, /*dim=*/0, /*largest=*/true, /*sorted=*/false);
  at::Tensor idx = std::get<0>(std::get<1>(top).sort());  // ascending -> coalesced COO order
  return {idx, G.index_select(0, idx)};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> sparsegrad_topk_grad_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                                                             const std::optional<at::Tensor>& u_out_,
                                                             const std::optional<at::Tensor>& u_in_, int64_t k) {
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor G = rotated_grad_for_selection(grad_out, x, u_out_, u_in_, k);
  if (use_torch_topk()) return torch_topk_abs(G, k);
  at::Tensor idx = at::empty({k}, G.options().dtype(at::kLong));
  at::Tensor val = at::empty({k}, G.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, G.scalar_type(), "sparsegrad_topk_grad_cuda", [&] {
    radix_topk_abs<scalar_t>(G, k, Outputs<scalar_t>{idx.data_ptr<int64_t>(), val.data_ptr<scalar_t>(), nullptr,
                                                     nullptr, k, x.size(1)});
  });
  return {idx, val};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparsegrad_topk_grad_coo_cuda(const at::Tensor& grad_out,
                                                                             const at::Tensor& x,
                                                                             const std::optional<at::Tensor>& u_out_,
                                                                             const std::optional<at::Tensor>& u_in_,
                                                                             int64_t k) {
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor G = rotated_grad_for_selection(grad_out, x, u_out_, u_in_, k);
  const int64_t I = x.size(1);
  if (use_torch_topk()) {
    auto [idx, val] = torch_topk_abs(G, k);
    at::Tensor ind = at::stack({at::div(idx, I, "floor"), at::remainder(idx, I), idx});
    return {ind, idx.to(at::kInt), val};
  }
  at::Tensor ind = at::empty({3, k}, G.options().dtype(at::kLong));  // rows, columns, flat ids
  at::Tensor keys = at::empty({k}, G.options().dtype(at::kInt));     // O * I <= INT_MAX (checked)
  at::Tensor val = at::empty({k}, G.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, G.scalar_type(), "sparsegrad_topk_grad_coo_cuda", [&] {
    int64_t* p = ind.data_ptr<int64_t>();
    radix_topk_abs<scalar_t>(G, k, Outputs<scalar_t>{p + 2 * k, val.data_ptr<scalar_t>(), p,
                                                     keys.data_ptr<int>(), k, I});
  });
  return {ind, keys, val};
}

void sparsegrad_rotated_update_cuda(const at::Tensor& weight, const at::Tensor& u_out, const at::Tensor& u_in,
                                    const at::Tensor& indices_, const at::Tensor& delta_) {
  TORCH_CHECK(weight.dim() == 2, "sparsegrad_rotated_update_: weight must be [O, I]");
  const int64_t O = weight.size(0), I = weight.size(1);
  TORCH_CHECK(u_out.size(0) == O && u_out.size(1) == O && u_in.size(0) == I && u_in.size(1) == I,
              "sparsegrad_rotated_update_: rotations must be [O, O] and [I, I]");
  TORCH_CHECK(indices_.dim() == 1 && indices_.sizes() == delta_.sizes(),
              "sparsegrad_rotated_update_: indices and delta must be 1-D of one length");
  TORCH_CHECK(indices_.scalar_type() == at::kLong, "sparsegrad_rotated_update_: indices must be int64");
  // (the ids' range is not checked here, unlike on the CPU: that would be a host sync; index_add_ asserts on device)
  const int64_t k = indices_.size(0);
  if (k == 0) return;
  c10::cuda::CUDAGuard guard(weight.device());
  // Dense on the GPU: D is scattered into a zero [O, I] matrix and multiplied through both bases (two GEMMs,
  // ~2.3 GFLOP for a 1536 x 384 MLP linear: tens of microseconds on a datacenter GPU). The compact form (only the
  // touched rows of D, as on the CPU) needs their count on the host, i.e. a device-to-host sync per layer and
  // step, which stalled the whole step on an H200 (SparseGrad at 0.40x LoRA's steps/s there).
  auto D = at::zeros({O, I}, weight.options());
  D.view({-1}).index_add_(0, indices_.contiguous(), delta_.to(weight.scalar_type()).contiguous());
  // weight += U_out (D U_in^T)
  weight.addmm_(u_out, at::mm(D, u_in.t()));  // in-place methods are const on at::Tensor
}

TORCH_LIBRARY_IMPL(scalerec, CUDA, m) {
  m.impl("sparsegrad_topk_grad", &sparsegrad_topk_grad_cuda);
  m.impl("sparsegrad_topk_grad_coo", &sparsegrad_topk_grad_coo_cuda);
  m.impl("sparsegrad_rotated_update_", &sparsegrad_rotated_update_cuda);
}

}  // namespace scalerec
