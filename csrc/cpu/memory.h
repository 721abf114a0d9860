#pragma once
// Fresh outputs of tens of MB are the largest single cost of a fast kernel on a machine that
// faults memory in 4 KiB at a time (here: 17.7 ms to fault in 50 MB, more than roi_align's
// compute). Marking an untouched allocation MADV_HUGEPAGE before the first write lets the
// kernel fault it in 2 MiB pages instead, as c10's allocator does under THP_MEM_ALLOC_ENABLE=1.
// The tensor stays an ordinary allocation of PyTorch's allocator; only the page size changes.
#include <ATen/ATen.h>

#include <cstdint>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace tvce {

inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const size_t bytes = t.storage().nbytes();
  if (bytes < 4 * kHuge) {
    return;
  }
  const auto begin = reinterpret_cast<uintptr_t>(t.storage().data());
  const uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t hi = (begin + bytes) & ~(kHuge - 1);
  if (hi > lo) {
    // Advice only: on failure (THP disabled, old kernel) the memory is simply faulted in 4 KiB
    // pages as before.
    (void)madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
  }
#else
  (void)t;
#endif
}

} // namespace tvce
