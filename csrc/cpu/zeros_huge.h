// Zero-filled CPU tensors for large gradients (the dense [C, d] table gradient), backed by transparent huge
// pages where the kernel offers them on request (THP mode "madvise"): a fresh 256 MiB gradient then costs
// 128 page faults instead of 65,536, which is most of the time of allocating and zeroing it. The values and
// the tensor are ordinary; on other systems, or for small tensors, this is at::zeros_like.
#pragma once

#include <torch/torch.h>

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace scalerec {
namespace cpu {

inline at::Tensor zeros_like_huge(const at::Tensor& like) {
  auto t = at::empty_like(like, at::MemoryFormat::Contiguous);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr()), bytes = t.nbytes();
  if (bytes >= 8 * kHuge) {
    const uintptr_t a = (p + kHuge - 1) & ~(kHuge - 1), e = (p + bytes) & ~(kHuge - 1);
    if (e > a) madvise(reinterpret_cast<void*>(a), e - a, MADV_HUGEPAGE);  // advice only: failure is harmless
  }
#endif
  return t.zero_();
}

}  // namespace cpu
}  // namespace scalerec
