#pragma once
// The drivers of the position-sensitive ops (ps_roi_align, ps_roi_pool): how their work is split
// into items and threads in each layout; the ops pass in what happens at one bin.
// - Forward: ps_forward_nchw (items (bin, image, block of V output channels), the bin's planes
//   kept in L2 for every ROI of the image) and ps_forward_channels_last (ps_roi_align's items
//   (ROI, block of V output channels) in spatial order; ps_roi_pool sweeps rows instead, in its
//   own file). Both copy channel_mapping's identical rows (PsMappingRows) on the pooling threads.
// - Backward: ps_backward, one driver for both ops (NOTE [ position-sensitive backward ]).
// - check_ps_backward: the argument checks both backwards make.
// A block of output channels c0 .. c0 + n of one bin is one vector: their input channels
// (c * PH + ph) * PW + pw are P apart at a pixel in channels_last and P * H * W apart in NCHW,
// read and written with strided loads and stores (vec_io.h).
#include "checks.h"
#include "roi_schedule.h"
#include "vec_io.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace tvce {
namespace detail {

// channel_mapping of the position-sensitive forwards is the same for every ROI (output channel
// c of bin p read input channel c * P + p): one row in the mapping's memory order (NCHW
// (c, bin), channels_last (bin, c)), copied to each ROI by the threads of the pooling loop.
class PsMappingRows {
 public:
  PsMappingRows(at::Tensor& mapping, int64_t Cout, int64_t P, int64_t stride_channel, int64_t stride_bin)
      : dst_(mapping.data_ptr<int32_t>()), K_(mapping.size(0)), row_(Cout * P) {
    for (int64_t c = 0; c < Cout; ++c) {
      for (int64_t p = 0; p < P; ++p) {
        row_[c * stride_channel + p * stride_bin] = static_cast<int32_t>(c * P + p);
      }
    }
  }
  // Rows [K * i0 / items, K * i1 / items) for a thread running items [i0, i1) of `items`:
  // every row is written once however the items are split.
  void copy_share(int64_t i0, int64_t i1, int64_t items) const {
    const int64_t n = static_cast<int64_t>(row_.size());
    for (int64_t k = K_ * i0 / items; k < K_ * i1 / items; ++k) {
      std::memcpy(dst_ + k * n, row_.data(), n * sizeof(int32_t));
    }
  }

 private:
  int32_t* dst_;
  int64_t K_;
  std::vector<int32_t> row_;
};

// NCHW forward of the position-sensitive ops: items (bin, image, block of V output channels).
// An item runs one bin of every ROI of the image from that bin's V planes (V * H * W elements)
// while they are in L2, so each line of the map is fetched about once (ROI-major items fetch
// a line again for each box that reads it). Calls pool(load, bin, k, ph, pw, c0, n) with `bin` at pixel (0, 0) of input channel c0 * PH * PW + ph * PW + pw of k's image, and
// copies channel_mapping's rows on the same threads.
template <typename scalar_t, typename Pool>
void ps_forward_nchw(const scalar_t* input, const std::vector<std::vector<int64_t>>& per_image, int64_t C,
                     int64_t HW, int64_t PH, int64_t PW, int64_t Cout, int64_t K, const PsMappingRows& map_rows,
                     const Pool& pool) {
  constexpr int64_t V = OpVec<scalar_t>::size();
  const int64_t N = static_cast<int64_t>(per_image.size()), P = PH * PW, blocks = (Cout + V - 1) / V;
  const int64_t items = P * N * blocks;
  at::parallel_for(0, items, grain_for((K / std::max<int64_t>(N, 1) + 1) * 9 * V), [&](int64_t i0, int64_t i1) {
    map_rows.copy_share(i0, i1, items);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t bin_index = i / (N * blocks), m = i / blocks % N, c0 = i % blocks * V;
      const int64_t n = std::min(V, Cout - c0);
      const StridedLoad<scalar_t> load(P * HW, n);
      const scalar_t* bin = input + m * C * HW + (c0 * P + bin_index) * HW;
      for (const int64_t k : per_image[m]) {
        pool(load, bin, k, bin_index / PW, bin_index % PW, c0, n);
      }
    }
  });
}

// channels_last forward of ps_roi_align: items (ROI, block of V output channels) in `order`
// (spatial_order), ROI k's bins one after another with the next bin's input asked for ahead
// (each pixel's V channels are V lines of their own; a bin-major order and ps_roi_pool's sweep
// of the rows measured slower, NOTE [ ps_roi_align channels_last ]). Calls prefetch(load, bin,
// k, ph, pw) for the next bin and pool(load, bin, k, ph, pw, c0, n) as ps_forward_nchw does,
// `bin` at pixel (0, 0) of the bin's channel for c0 in image batch(k); copies
// channel_mapping's rows on the same threads.
template <typename scalar_t, typename Batch, typename Prefetch, typename Pool>
void ps_forward_channels_last(const scalar_t* input, const std::vector<int64_t>& order, int64_t C, int64_t HW,
                              int64_t PH, int64_t PW, int64_t Cout, const PsMappingRows& map_rows,
                              const Batch& batch, const Prefetch& prefetch, const Pool& pool) {
  constexpr int64_t V = OpVec<scalar_t>::size();
  const int64_t P = PH * PW, blocks = (Cout + V - 1) / V;
  const int64_t items = static_cast<int64_t>(order.size()) * blocks;
  at::parallel_for(0, items, grain_for(P * 9 * V), [&](int64_t i0, int64_t i1) {
    map_rows.copy_share(i0, i1, items);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t k = order[i / blocks], c0 = (i % blocks) * V, n = std::min(V, Cout - c0);
      const StridedLoad<scalar_t> load(P, n);
      const scalar_t* group = input + batch(k) * C * HW + c0 * P;
      for (int64_t bin = 0; bin < P; ++bin) {
        if (bin + 1 < P) {
          prefetch(load, group + bin + 1, k, (bin + 1) / PW, (bin + 1) % PW);
        }
        pool(load, group + bin, k, bin / PW, bin % PW, c0, n);
      }
    }
  });
}

// NOTE [ position-sensitive backward ]
// Both ps backwards add, for every ROI k and bin (ph, pw), the bin's output gradient (divided by
// its sample count or its area) to the pixels the forward read, in the input channels of the
// bin's group, (c * PH + ph) * PW + pw. Only where they add differs (bilinear taps for
// ps_roi_align, whole bin rectangles for ps_roi_pool), so ps_backward owns everything else and
// takes the op's part as two functors:
// - scatter(k, ph, pw, c0, n, r0, r1, dst, lane_stride, pixel_stride) adds the gradient of output
//   channels c0 .. c0 + n of bin (ph, pw) of ROI k at the pixels it read in rows [r0, r1);
//   dst is row r0, column 0 of the bin's input channel for c0: lane j of pixel (y, x) is
//   dst[((y - r0) * W + x) * pixel_stride + j * lane_stride].
// - touches(k, ph, r0, r1): whether row ph of k's bins reads a row in [r0, r1); a band that it
//   does not meet skips that row of bins.
// The driver decides which thread owns which part of grad_input, so that no element is shared
// and every element receives its adds in ROI order (deterministic for any thread count, no
// atomics):
// - NCHW (ps_backward_nchw): a thread owns the planes of (bin, block of V output channels) in
//   every image; a bin's channel group is exactly the planes its gradient reaches.
// - channels_last (by_bands): a thread owns bands of rows of an image (half of L2: the ps ops'
//   boxes are small, so few bins span two bands) holding every channel of those pixels.
// Either way the owned part is zeroed, filled while in cache and written once
// (OwnedGradAccumulator), streamed when large (stream_grad_input).

// NCHW: a thread owns (bin b, block of V output channels), hence the input channels
// c_out * P + b they feed, and for each image scatters that image's ROIs in order into the
// zeroed opmath planes of input channels (c0 + j) * P + b, j < n, `lane_stride` apart.
template <typename scalar_t, typename Scatter>
void ps_backward_nchw(scalar_t* grad_in, const std::vector<std::vector<int64_t>>& per_image, int64_t C, int64_t H,
                      int64_t HW, int64_t PH, int64_t PW, int64_t Cout, int64_t K, bool stream, const Scatter& scatter) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t V = OpVec<scalar_t>::size();
  const int64_t P = PH * PW, blocks = (Cout + V - 1) / V;
  at::parallel_for(0, P * blocks, grain_for(K * 9 * V), [&](int64_t i0, int64_t i1) {
    OwnedGradAccumulator<scalar_t> planes(stream);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / blocks, c0 = (i % blocks) * V, n = std::min(V, Cout - c0);
      for (int64_t m = 0; m < static_cast<int64_t>(per_image.size()); ++m) {
        int64_t lane_stride = 0;
        acc_t* dst = planes.start(grad_in + (m * C + c0 * P + b) * HW, n, P * HW, HW, &lane_stride);
        for (const int64_t k : per_image[m]) {
          scatter(k, b / PW, b % PW, c0, n, 0, H, dst, lane_stride, 1);
        }
        planes.finish();
      }
    }
  });
}

// The position-sensitive backward (NOTE [ position-sensitive backward ]) into grad_input
// [N, C, H, W], NCHW or channels_last, owned and written once by its threads.
template <typename scalar_t, typename Touches, typename Scatter>
void ps_backward(scalar_t* grad_in, const std::vector<std::vector<int64_t>>& per_image, int64_t C, int64_t H, int64_t W,
                 int64_t PH, int64_t PW, int64_t Cout, int64_t K, bool channels_last, bool stream,
                 const Touches& touches, const Scatter& scatter) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t V = OpVec<scalar_t>::size();
  const int64_t P = PH * PW, N = static_cast<int64_t>(per_image.size());
  if (!channels_last) {
    ps_backward_nchw(grad_in, per_image, C, H, H * W, PH, PW, Cout, K, stream, scatter);
    return;
  }
  by_bands(grad_in, N, C, H, W, stream, l2_bytes() / 2, [&](int64_t m, int64_t r0, int64_t r1, acc_t* band) {
    for (const int64_t k : per_image[m]) {
      for (int64_t ph = 0; ph < PH; ++ph) {
        if (!touches(k, ph, r0, r1)) {
          continue;
        }
        for (int64_t pw = 0; pw < PW; ++pw) {
          for (int64_t c0 = 0; c0 < Cout; c0 += V) {
            scatter(k, ph, pw, c0, std::min(V, Cout - c0), r0, r1, band + c0 * P + ph * PW + pw, P, C);
          }
        }
      }
    }
  });
}

// The checks both position-sensitive backwards make; returns the output channel count.
inline int64_t check_ps_backward(
    const char* op, const at::Tensor& grad, const at::Tensor& rois, const at::Tensor& channel_mapping, int64_t PH,
    int64_t PW, int64_t batch_size, int64_t channels, int64_t height, int64_t width) {
  check_roi_inputs(op, grad, rois);
  check_pooled_size(op, PH, PW);
  check_input_shape(op, batch_size, channels, height, width);
  const int64_t Cout = ps_channels_out(op, channels, PH, PW);
  check_grad_shape(op, grad, rois.size(0), Cout, PH, PW);
  check_channel_mapping(op, channel_mapping, grad, PH, PW);
  return Cout;
}


} // namespace detail
} // namespace tvce
