#pragma once
// Scheduling of the RoI kernels: how work is split between threads and ordered for the
// caches, independent of what a kernel computes.
// - Grains (parallel_grain.h) and orders: rois_per_image (the ROI order every accumulation
//   follows, for deterministic sums), spatial_order (a Morton order of box centres for the
//   forwards, so neighbouring boxes share cached lines).
// - Owned output: backwards never share a grad_input element between threads. A thread owns NCHW
//   planes or, in channels_last, a band of rows (by_bands), zeroes it in cache, adds into it
//   and writes it once (OwnedGradAccumulator), with non-temporal stores for large gradients
//   (stream_grad_input).
// - The NCHW path of the roi_align / roi_pool forwards (use_transposed_nchw).
// Every size decision here reads its threshold through debug_thresholds.h.
#include "debug_thresholds.h"
#include "parallel_grain.h"
#include "vec_io.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>
#if __has_include(<unistd.h>)
#include <unistd.h>
#endif
#include <vector>

namespace tvce {
namespace detail {

// ROI indices per image, in ROI order (the order every accumulation follows).
template <typename Roi>
std::vector<std::vector<int64_t>> rois_per_image(const std::vector<Roi>& S, int64_t N) {
  std::vector<std::vector<int64_t>> out(N);
  for (int64_t k = 0; k < static_cast<int64_t>(S.size()); ++k) {
    out[S[k].batch].push_back(k);
  }
  return out;
}

// An order in which to process ROIs (rois_acc: [K, 5] in the kernel's opmath type) so that
// boxes near each other on the map come one after another: the Morton order of their centres
// (16-pixel cells of image coordinates), image by image. Forward items are independent, and
// the lines one box reads are then often still in cache for the next.
template <typename acc_t>
std::vector<int64_t> spatial_order(const at::Tensor& rois_acc) {
  const int64_t K = rois_acc.size(0);
  const acc_t* r = rois_acc.const_data_ptr<acc_t>();
  const auto cell = [](acc_t a, acc_t b) -> uint64_t {
    const acc_t v = (a + b) / acc_t(32);
    return v >= acc_t(0) ? static_cast<uint64_t>(std::min(v, acc_t(65535))) : 0;  // NaN -> 0
  };
  const auto spread = [](uint64_t v) {  // the 16 bits of v to the even bits of 32
    v = (v | (v << 8)) & 0x00FF00FFu;
    v = (v | (v << 4)) & 0x0F0F0F0Fu;
    v = (v | (v << 2)) & 0x33333333u;
    return (v | (v << 1)) & 0x55555555u;
  };
  std::vector<std::pair<uint64_t, int64_t>> keys(K);
  for (int64_t k = 0; k < K; ++k) {
    const acc_t* b = r + 5 * k;
    const uint64_t image = b[0] >= acc_t(0) ? static_cast<uint64_t>(std::min(b[0], acc_t(1 << 20))) : 0;
    keys[k] = {(image << 32) | (spread(cell(b[2], b[4])) << 1) | spread(cell(b[1], b[3])), k};
  }
  std::sort(keys.begin(), keys.end());
  std::vector<int64_t> order(K);
  for (int64_t k = 0; k < K; ++k) {
    order[k] = keys[k].second;
  }
  return order;
}

// The per-core L2 size (glibc's sysconf; 1 MiB where it does not say).
inline int64_t l2_bytes() {
  static const int64_t bytes = [] {
    long v = 0;
#if defined(_SC_LEVEL2_CACHE_SIZE)
    v = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
    return v > 0 ? static_cast<int64_t>(v) : int64_t{1} << 20;
  }();
  return bytes;
}

// Whether a backward writes grad_input with non-temporal stores (OwnedGradAccumulator): when
// its opmath size (what the kernels accumulate; a bfloat16/half gradient counts twice its
// bytes) is at least 32 MiB per thread. Below that, a destination written in the previous call
// (the output pool hands back the same block) may still sit in the caches, whose share grows
// with the threads used, and ordinary stores hit it; above, streaming saves reading every line
// before writing it (benchmarks/HISTORY.md, "streamed gradients").
inline bool stream_grad_input(const at::Tensor& grad_in) {
  const auto acc = at::toOpMathType(grad_in.scalar_type());
  const size_t threads = static_cast<size_t>(std::max(1, at::get_num_threads()));
  const int64_t per_thread = debug::threshold(debug::kStreamGradBytes, int64_t{32} << 20);
  return static_cast<size_t>(grad_in.numel()) * c10::elementSize(acc) >= static_cast<size_t>(per_thread) * threads;
}

// The part of grad_input that one thread owns and fills (NCHW planes, or a channels_last band
// of rows seen as one plane): start() returns `planes` zeroed opmath planes to add into while
// they stay in cache, finish() leaves them in grad_input.
// Two ways, chosen by the size of grad_input (stream_grad_input above):
// - streaming: the planes are a per-thread buffer, written to grad_input once with
//   non-temporal stores (write_opmath, rounding bfloat16/half);
// - otherwise float/double add into grad_input's planes themselves, zeroed right before, and
//   bfloat16/half into a buffer rounded into grad_input with ordinary stores.
// The per-thread buffer is zeroed once; finish() writes it out and re-zeroes only its nonzero
// blocks (drain_opmath), as a backward's planes are mostly untouched.
template <typename scalar_t>
class OwnedGradAccumulator {
 public:
  using acc_t = at::opmath_type<scalar_t>;

  explicit OwnedGradAccumulator(bool stream) : stream_(stream) {}

  // The planes are dst, dst + stride, ... (HW elements each); *acc_stride receives the
  // distance between the returned opmath planes.
  acc_t* start(scalar_t* dst, int64_t planes, int64_t stride, int64_t HW, int64_t* acc_stride) {
    dst_ = dst;
    planes_ = planes;
    stride_ = stride;
    HW_ = HW;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      if (!stream_) {
        for (int64_t j = 0; j < planes; ++j) {
          std::fill_n(dst + j * stride, HW, acc_t(0));
        }
        *acc_stride = stride;
        return dst;
      }
    }
    // finish() leaves the buffer zero (drain_opmath), so only a larger one needs zeros added.
    if (static_cast<int64_t>(buf_.size()) < planes * HW) {
      buf_.resize(planes * HW, acc_t(0));
    }
    *acc_stride = HW;
    return buf_.data();
  }

  void finish() {
    if (std::is_same_v<scalar_t, acc_t> && !stream_) {
      return;  // added in place
    }
    for (int64_t j = 0; j < planes_; ++j) {
      drain_opmath(dst_ + j * stride_, buf_.data() + j * HW_, HW_, stream_);
    }
  }

 private:
  bool stream_;
  scalar_t* dst_ = nullptr;
  int64_t planes_ = 0, stride_ = 0, HW_ = 0;
  std::vector<acc_t> buf_;
};

// channels_last backward by bands of rows: a thread owns (image m, rows [r0, r1)), whose
// grad_input elements are contiguous in channels_last, and calls fill(m, r0, r1, band) to add
// every contribution landing in those rows into `band`, zeroed opmath elements where pixel
// (y, x), channel c is band[((y - r0) * W + x) * C + c]. Bands are about `band_bytes` of opmath
// so they stay in L2 while ROIs scatter into them (scattering into a zeroed map missed the
// cache on nearly every add), and each is written to grad_input once (bfloat16/half rounded
// then). A bin whose rows span several bands is visited by each of them, so larger bands do
// less repeated work until they leave L2 (the callers' sizes: benchmarks/HISTORY.md).
template <typename scalar_t, typename Fill>
void by_bands(scalar_t* grad_in, int64_t N, int64_t C, int64_t H, int64_t W, bool stream, int64_t band_bytes,
              const Fill& fill) {
  using acc_t = at::opmath_type<scalar_t>;
  band_bytes = debug::threshold(debug::kGradBandBytes, band_bytes);
  const int64_t row = std::max<int64_t>(1, W * C), rows = std::max<int64_t>(1, band_bytes / (row * sizeof(acc_t)));
  const int64_t bands = (H + rows - 1) / rows;
  at::parallel_for(0, N * bands, 1, [&](int64_t t0, int64_t t1) {
    OwnedGradAccumulator<scalar_t> band(stream);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t m = t / bands, r0 = (t % bands) * rows, r1 = std::min(H, r0 + rows);
      int64_t unused = 0;
      acc_t* dst = band.start(grad_in + (m * H + r0) * row, 1, 0, (r1 - r0) * row, &unused);
      fill(m, r0, r1, dst);
      band.finish();
    }
  });
}

// NOTE [ transposed NCHW ]
// roi_align's and roi_pool's NCHW forwards run one of two paths: blocks of V channels of an image
// transposed into a pixel-major scratch [H, W, V] (pixel_transpose.h), where the channels_last
// bin loop runs with one vector per pixel; or direct loops over each channel plane. The
// transpose costs O(H * W) per block and pays off once the bins of the image's ROIs read at
// least half of its pixels (`pixel_reads`: per channel, summed over every bin of every ROI).
// One rule for both ops, so that the crossover is the same wherever the work is the same.
inline bool use_transposed_nchw(int64_t pixel_reads, int64_t N, int64_t H, int64_t W) {
  const int64_t forced = debug::threshold(debug::kNchwTranspose, -1);
  if (forced >= 0) {
    return forced != 0;
  }
  return pixel_reads >= N * H * W / 2;
}

} // namespace detail
} // namespace tvce
