#pragma once
// Large outputs (NOTE [ output pool ]).
//
// A fresh output of tens of MB is the largest single cost of a fast kernel here: glibc serves
// every allocation above its mmap threshold (at most 32 MiB) with a new mapping, which the
// kernel then faults in page by page, often for longer than the kernel's own work
// (benchmarks/HISTORY.md, "Output pool").
// In a detector the same shapes come back every iteration (a backbone's batch-norm outputs, the
// box head's RoI features), so large outputs are taken from a small pool of blocks freed by
// earlier outputs of exactly the same byte size: no mapping, no page faults.
// - Only outputs of at least kPoolMin bytes; smaller ones are ordinary at::empty tensors.
// - Blocks are returned by the tensors' deleters (the storage's allocator is the pool, so a
//   resize_ allocates from it too) and kept, most recent first, up to a cap
//   (TORCHVISION_CPU_EXT_POOL_MB, default 256; 0 disables the pool); beyond it the oldest
//   blocks are freed. torchvision_cpu_ext.empty_cache() frees them all.
// - New blocks are marked MADV_HUGEPAGE before the first write, so even a cold block is
//   faulted in 2 MiB at a time.
#include "debug_thresholds.h"

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <cstdint>
#include <cstdlib>
#include <list>
#include <mutex>
#include <utility>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace tvce {

inline void advise_huge_pages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const auto begin = reinterpret_cast<uintptr_t>(data);
  const uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t hi = (begin + bytes) & ~(kHuge - 1);
  if (hi > lo) {
    // Advice only: on failure (THP disabled, old kernel) pages are simply 4 KiB.
    (void)madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
  }
#else
  (void)data;
  (void)bytes;
#endif
}

class OutputPool final : public c10::Allocator {
 public:
  static constexpr size_t kPoolMin = size_t(4) << 20;

  // kPoolMin, unless a test lowered it (NOTE [ debug thresholds ]).
  static size_t pool_min() {
    return static_cast<size_t>(debug::threshold(debug::kOutputPoolMinBytes, static_cast<int64_t>(kPoolMin)));
  }

  // Never destroyed: tensors may outlive static destruction at exit.
  static OutputPool& get() {
    static OutputPool* pool = new OutputPool();
    return *pool;
  }

  c10::DataPtr allocate(size_t n) override {
    if (n == 0) {
      return {nullptr, nullptr, nullptr, c10::Device(c10::kCPU)};
    }
    void* p = take(n);
    if (p == nullptr) {
      p = c10::alloc_cpu(n);
      advise_huge_pages(p, n);
    }
    return {p, new Block{p, n}, &release, c10::Device(c10::kCPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  size_t cached_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return cached_;
  }

  void empty_cache() {
    std::list<std::pair<size_t, void*>> blocks;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      blocks.swap(free_);
      cached_ = 0;
    }
    for (auto& b : blocks) {
      c10::free_cpu(b.second);
    }
  }

  size_t cap() const {
    return cap_;
  }

 private:
  struct Block {
    void* ptr;
    size_t size;
  };

  // TORCHVISION_CPU_EXT_POOL_MB: a whole number of MiB in [0, 1048576]; anything else is
  // reported and the default (256) is used.
  OutputPool() {
    size_t mb = 256;
    if (const char* env = std::getenv("TORCHVISION_CPU_EXT_POOL_MB"); env != nullptr && *env != '\0') {
      char* end = nullptr;
      const long long v = std::strtoll(env, &end, 10);
      if (*end == '\0' && v >= 0 && v <= (1LL << 20)) {
        mb = static_cast<size_t>(v);
      } else {
        TORCH_WARN("torchvision_cpu_ext: TORCHVISION_CPU_EXT_POOL_MB=", env,
                   " is not a whole number of MiB in [0, 1048576]; using 256");
      }
    }
    cap_ = mb << 20;
  }

  void* take(size_t n) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = free_.begin(); it != free_.end(); ++it) {
      if (it->first == n) {
        void* p = it->second;
        cached_ -= n;
        free_.erase(it);
        return p;
      }
    }
    return nullptr;
  }

  static void release(void* ctx) {
    auto* b = static_cast<Block*>(ctx);
    get().put(b->ptr, b->size);
    delete b;
  }

  void put(void* p, size_t n) {
    std::list<std::pair<size_t, void*>> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (n > cap_ || n < pool_min()) {  // (a resize_ of a pooled tensor may ask for any size)
        evicted.emplace_back(n, p);
      } else {
        free_.emplace_front(n, p);
        cached_ += n;
        while (cached_ > cap_) {
          cached_ -= free_.back().first;
          evicted.splice(evicted.end(), free_, std::prev(free_.end()));
        }
      }
    }
    for (auto& b : evicted) {  // freed outside the lock
      c10::free_cpu(b.second);
    }
  }

  std::mutex mutex_;
  std::list<std::pair<size_t, void*>> free_;  // (bytes, block), most recently freed first
  size_t cached_ = 0;
  size_t cap_ = 0;
};

// An uninitialised CPU tensor for a kernel's output, from the pool when it is large.
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options, at::MemoryFormat fmt) {
  int64_t numel = 1;
  for (const int64_t s : sizes) {
    numel *= s;
  }
  const size_t bytes = static_cast<size_t>(numel) * c10::elementSize(c10::typeMetaToScalarType(options.dtype()));
  OutputPool& pool = OutputPool::get();
  if (bytes < OutputPool::pool_min() || bytes > pool.cap()) {
    return at::empty(sizes, options.memory_format(fmt));
  }
  return at::detail::empty_generic(
      sizes, &pool, c10::DispatchKeySet(c10::DispatchKey::CPU), c10::typeMetaToScalarType(options.dtype()), fmt);
}

} // namespace tvce
