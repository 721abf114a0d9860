// The benchmark's line-read floor (bench_ops.py, --line-floor): the time to read one byte of
// each cache line a RoI forward must read, lines in ascending address order, split into one
// contiguous run per thread, with eight independent sums so that no add chain limits the loads.
// No kernel that reads those lines can do much better: the order is the one hardware
// prefetchers follow best, and there is no arithmetic. Built on demand by bench_ops.py; not
// part of the package. An op (tvce_bench::read_lines) rather than a Python module: without
// pybind11 and torch/extension.h it compiles in a fraction of the time.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

namespace {

// Sums the bytes of `x`'s storage at `offsets` (int64 byte offsets from the storage's start,
// ascending), returned so that the reads cannot be optimised away.
int64_t read_lines(const at::Tensor& x, const at::Tensor& offsets) {
  TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.is_contiguous(), "offsets: contiguous int64");
  const auto* base = static_cast<const uint8_t*>(x.storage().data());  // offsets count from the storage
  const int64_t* off = offsets.const_data_ptr<int64_t>();
  const int64_t n = offsets.numel();
  const int64_t nbytes = static_cast<int64_t>(x.storage().nbytes());
  TORCH_CHECK(n == 0 || (off[0] >= 0 && off[n - 1] < nbytes), "offsets: outside the tensor's storage");
  // The offsets are of lines: they mean what they say only for a line-aligned storage.
  TORCH_CHECK(reinterpret_cast<uintptr_t>(base) % 64 == 0, "x: storage not aligned to 64 bytes");
  const int64_t threads = at::get_num_threads();
  std::vector<int64_t> part(threads, 0);
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t i0 = n * t / threads, i1 = n * (t + 1) / threads;
      uint64_t s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      int64_t i = i0;
      for (; i + 8 <= i1; i += 8) {
        for (int j = 0; j < 8; ++j) {
          s[j] += base[off[i + j]];
        }
      }
      for (; i < i1; ++i) {
        s[0] += base[off[i]];
      }
      part[t] = static_cast<int64_t>(s[0] + s[1] + s[2] + s[3] + s[4] + s[5] + s[6] + s[7]);
    }
  });
  int64_t total = 0;
  for (const int64_t v : part) {
    total += v;
  }
  return total;
}

} // namespace

// Sums one byte of each line at the given byte offsets.
TORCH_LIBRARY(tvce_bench, m) {
  m.def("read_lines(Tensor x, Tensor offsets) -> int", &read_lines);
}
