#pragma once
// Per-ROI precomputation shared by the RoI-align family.
//
// NOTE [ separable bilinear sampling ]
// torchvision samples each output bin (ph, pw) on a grid_h x grid_w grid; sample (iy, ix)
// sits at (y(ph, iy), x(pw, ix)) and reads four pixels with weights hy*hx, hy*lx, ly*hx,
// ly*lx. Both the positions and the weights factor into a y part and an x part, and a
// sample outside the map (y < -1 || y > H || x < -1 || x > W) contributes zero, which is
// the same as giving its y (or x) taps zero weight. So a bin is
//     out(ph, pw) = 1/count * sum_r wy_ph[r] * sum_c wx_pw[c] * X[r, c]
// where wy_ph collects, per distinct pixel row r, the summed weights of all y taps of bin ph
// (likewise wx_pw per column). Merging taps that hit the same row/column (neighbouring
// samples, clamped borders) reads each pixel of a bin once instead of once per tap: 2x2
// sampling of a small box touches 2-3 rows, not 4 taps. Positions, clamping and weights are
// computed with exactly torchvision's arithmetic; only the order of the final sums differs.
// The tables are tiny (a few dozen entries per ROI) and are computed once per ROI, then
// shared by every channel.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/SmallVector.h>

#include "memory.h"
#include "vec_io.h"

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <cstdint>
#include <cstring>
#if __has_include(<unistd.h>)
#include <unistd.h>
#endif
#include <vector>

namespace tvce {
namespace detail {

// Taps of `bins` bins along one axis: bin i uses taps [i * n, i * n + used[i]), n being the
// most any bin of this ROI needs. Only a bin's own taps are visited: a padding tap of zero
// weight would still read its pixel, and 0 * inf (an overflowed half map, say) is NaN in a bin
// that torchvision computes without that pixel.
template <typename acc_t>
struct AxisTaps {
  int64_t n = 0;
  std::vector<int64_t> idx, used;
  std::vector<acc_t> w;

  int64_t begin(int64_t bin) const { return bin * n; }
  int64_t end(int64_t bin) const { return bin * n + used[bin]; }
};

// Fills the merged taps of one axis, following torchvision's
// pre_calc_for_bilinear_interpolate / bilinear_interpolate_gradient exactly for positions,
// validity and clamping (`size` is H or W).
template <typename acc_t>
void build_axis_taps(
    acc_t roi_start,
    acc_t bin_size,
    int64_t bins,
    int64_t grid,
    int64_t size,
    AxisTaps<acc_t>& t,
    std::vector<int64_t>& scratch_idx,
    std::vector<acc_t>& scratch_w,
    std::vector<int64_t>& scratch_off) {
  if (size == 0) {
    // An empty map has no pixel to read (torchvision would index pixel -1).
    grid = 0;
  }
  auto& idx = scratch_idx;
  auto& w = scratch_w;
  auto& off = scratch_off;
  idx.clear();
  w.clear();
  off.assign(1, 0);
  int64_t most = 0;
  for (int64_t p = 0; p < bins; ++p) {
    const int64_t first = static_cast<int64_t>(idx.size());
    auto add = [&](int64_t i, acc_t wi) {
      // Taps arrive in position order (reversed for inverted boxes), so a repeated pixel is
      // one of the last two taps of this bin.
      const int64_t n = static_cast<int64_t>(idx.size());
      for (int64_t k = std::max(first, n - 2); k < n; ++k) {
        if (idx[k] == i) {
          w[k] += wi;
          return;
        }
      }
      idx.push_back(i);
      w.push_back(wi);
    };
    for (int64_t i = 0; i < grid; ++i) {
      acc_t v = roi_start + p * bin_size +
          static_cast<acc_t>(i + .5f) * bin_size / static_cast<acc_t>(grid);
      // Outside the map (and NaN, which torchvision would turn into a wild index): no taps.
      if (!(v >= -1.0 && v <= size)) {
        continue;
      }
      if (v <= 0) {
        v = 0;
      }
      int64_t lo = static_cast<int64_t>(v);
      int64_t hi;
      if (lo >= size - 1) {
        hi = lo = size - 1;
        v = static_cast<acc_t>(lo);
      } else {
        hi = lo + 1;
      }
      const acc_t l = v - lo;
      const acc_t h = 1. - l;
      add(lo, h);
      add(hi, l);
    }
    off.push_back(static_cast<int64_t>(idx.size()));
    most = std::max(most, off[p + 1] - off[p]);
  }
  t.n = most;
  t.idx.assign(bins * most, 0);
  t.w.assign(bins * most, acc_t(0));
  t.used.resize(bins);
  for (int64_t p = 0; p < bins; ++p) {
    t.used[p] = off[p + 1] - off[p];
    std::copy(idx.begin() + off[p], idx.begin() + off[p + 1], t.idx.begin() + p * most);
    std::copy(w.begin() + off[p], w.begin() + off[p + 1], t.w.begin() + p * most);
  }
}

// rois[k, 0] as a checked batch index (torchvision reads out of bounds for a bad one).
template <typename acc_t>
int64_t batch_index(const acc_t* roi, int64_t batch_size) {
  const acc_t b = roi[0];
  TORCH_CHECK(b >= 0 && b < batch_size, "rois[:, 0] must hold batch indices in [0, ", batch_size, "), got ", b);
  return static_cast<int64_t>(b);
}

// Everything a kernel needs to know about one ROI of the roi_align family.
template <typename acc_t>
struct RoiSampling {
  int64_t batch = 0;
  acc_t count = 1;  // samples per bin (torchvision divides the bin's sum by it)
  AxisTaps<acc_t> y, x;
  // Reused between ROIs by a thread that builds many.
  std::vector<int64_t> scratch_idx, scratch_off;
  std::vector<acc_t> scratch_w;
};

// Geometry of one ROI, exactly as torchvision's roi_align computes it.
template <typename acc_t>
void build_roi_sampling(
    const acc_t* roi,
    int64_t batch_size,
    int64_t height,
    int64_t width,
    acc_t spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t sampling_ratio,
    bool aligned,
    RoiSampling<acc_t>& s,
    bool count_at_least_one = true) {
  s.batch = batch_index(roi, batch_size);
  const acc_t offset = aligned ? acc_t(0.5) : acc_t(0.0);
  const acc_t start_w = roi[1] * spatial_scale - offset;
  const acc_t start_h = roi[2] * spatial_scale - offset;
  const acc_t end_w = roi[3] * spatial_scale - offset;
  const acc_t end_h = roi[4] * spatial_scale - offset;
  acc_t roi_w = end_w - start_w;
  acc_t roi_h = end_h - start_h;
  if (!aligned) {
    // torchvision forces malformed ROIs to be 1x1.
    roi_w = std::max(roi_w, acc_t(1.));
    roi_h = std::max(roi_h, acc_t(1.));
  }
  const acc_t bin_h = roi_h / static_cast<acc_t>(pooled_height);
  const acc_t bin_w = roi_w / static_cast<acc_t>(pooled_width);
  int64_t grid_h = sampling_ratio;
  int64_t grid_w = sampling_ratio;
  const bool finite = std::isfinite(start_w) && std::isfinite(start_h) && std::isfinite(end_w) &&
      std::isfinite(end_h) && std::isfinite(bin_h) && std::isfinite(bin_w);
  if (!finite) {
    // A non-finite box samples nothing: torchvision gives zeros with adaptive sampling (and
    // reads out of bounds with a fixed sampling ratio).
    grid_h = grid_w = 0;
  } else if (sampling_ratio <= 0) {
    const acc_t gh = std::ceil(roi_h / pooled_height);
    const acc_t gw = std::ceil(roi_w / pooled_width);
    // torchvision stores the adaptive grid in an int; a larger one is undefined there.
    TORCH_CHECK(
        gh < acc_t(1 << 30) && gw < acc_t(1 << 30),
        "roi_align: a box of ",
        roi_h,
        " x ",
        roi_w,
        " feature pixels is too large for adaptive sampling");
    grid_h = static_cast<int64_t>(gh);
    grid_w = static_cast<int64_t>(gw);
  }
  // torchvision's count is the product of the grid sizes even when an inverted box makes one
  // negative (no samples, count -1 or 2...). roi_align divides an empty grid's zero sum by at
  // least 1; ps_roi_align by the raw count, so a zero count gives NaN, as in torchvision.
  s.count = static_cast<acc_t>(grid_h * grid_w);
  grid_h = std::max<int64_t>(grid_h, 0);
  grid_w = std::max<int64_t>(grid_w, 0);
  if (count_at_least_one || !finite) {
    s.count = std::max(s.count, acc_t(1));
  }
  build_axis_taps<acc_t>(start_h, bin_h, pooled_height, grid_h, height, s.y, s.scratch_idx, s.scratch_w, s.scratch_off);
  build_axis_taps<acc_t>(start_w, bin_w, pooled_width, grid_w, width, s.x, s.scratch_idx, s.scratch_w, s.scratch_off);
}

// Builds the sampling tables of all K ROIs (in parallel; each is independent).
template <typename acc_t>
std::vector<RoiSampling<acc_t>> build_all_roi_sampling(
    const at::Tensor& rois_acc,  // [K, 5], contiguous, acc_t
    int64_t batch_size,
    int64_t height,
    int64_t width,
    double spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t sampling_ratio,
    bool aligned,
    bool count_at_least_one = true) {
  const int64_t K = rois_acc.size(0);
  std::vector<RoiSampling<acc_t>> out(K);
  const acc_t* r = rois_acc.const_data_ptr<acc_t>();
  at::parallel_for(0, K, 64, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      build_roi_sampling<acc_t>(
          r + 5 * k, batch_size, height, width, static_cast<acc_t>(spatial_scale),
          pooled_height, pooled_width, sampling_ratio, aligned, out[k], count_at_least_one);
    }
  });
  return out;
}

// Integer bins of roi_pool and ps_roi_pool. torchvision rounds the box to pixels, takes
// floor/ceil of multiples of the bin size in the kernel's type, offsets and clips them; the
// bins are separable (rows depend on ph only, columns on pw only). `extent_plus` is 1 for
// roi_pool (the box includes its end pixel) and 0 for ps_roi_pool; bins are clipped to
// [0, clip_h] x [0, clip_w] (H, W for roi_pool; H - 1, W - 1 for ps_roi_pool's forward).
struct PoolBins {
  // [start, end) of each output row / column of bins; inline up to 8 bins (no allocation per
  // box for the usual 7x7: a forward builds one per box on every call).
  using Axis = c10::SmallVector<int64_t, 8>;
  int64_t batch = 0;
  Axis h0, h1, w0, w1;
  bool empty(int64_t ph, int64_t pw) const { return h1[ph] <= h0[ph] || w1[pw] <= w0[pw]; }
  int64_t area(int64_t ph, int64_t pw) const { return (h1[ph] - h0[ph]) * (w1[pw] - w0[pw]); }
};

template <typename acc_t>
void build_pool_axis(acc_t lo, acc_t hi, int64_t extent_plus, int64_t bins, int64_t clip,
                     PoolBins::Axis& s, PoolBins::Axis& e) {
  s.assign(bins, 0);
  e.assign(bins, 0);
  if (!(std::isfinite(lo) && std::isfinite(hi))) {
    return;  // every bin empty (torchvision: undefined int conversions)
  }
  // Beyond +-2^30 torchvision's int arithmetic overflows; such boxes are far off any map.
  constexpr acc_t kFar = acc_t(1 << 30);
  const int64_t start = static_cast<int64_t>(std::clamp(std::round(lo), -kFar, kFar));
  const int64_t end = static_cast<int64_t>(std::clamp(std::round(hi), -kFar, kFar));
  const int64_t extent = std::max<int64_t>(end - start + extent_plus, 1);
  const acc_t bin = static_cast<acc_t>(extent) / static_cast<acc_t>(bins);
  for (int64_t p = 0; p < bins; ++p) {
    const int64_t a = static_cast<int64_t>(std::floor(static_cast<acc_t>(p) * bin));
    const int64_t b = static_cast<int64_t>(std::ceil(static_cast<acc_t>(p + 1) * bin));
    s[p] = std::min(std::max<int64_t>(a + start, 0), clip);
    e[p] = std::min(std::max<int64_t>(b + start, 0), clip);
  }
}

template <typename acc_t>
void build_pool_bins(const acc_t* roi, int64_t batch_size, acc_t scale, int64_t PH, int64_t PW,
                     int64_t extent_plus, int64_t clip_h, int64_t clip_w, PoolBins& out) {
  out.batch = batch_index(roi, batch_size);
  build_pool_axis<acc_t>(roi[2] * scale, roi[4] * scale, extent_plus, PH, clip_h, out.h0, out.h1);
  build_pool_axis<acc_t>(roi[1] * scale, roi[3] * scale, extent_plus, PW, clip_w, out.w0, out.w1);
}

template <typename acc_t>
std::vector<PoolBins> build_all_pool_bins(const at::Tensor& rois_acc, int64_t batch_size, double scale,
                                          int64_t PH, int64_t PW, int64_t extent_plus, int64_t clip_h,
                                          int64_t clip_w) {
  const int64_t K = rois_acc.size(0);
  std::vector<PoolBins> out(K);
  const acc_t* r = rois_acc.const_data_ptr<acc_t>();
  at::parallel_for(0, K, 64, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      build_pool_bins<acc_t>(r + 5 * k, batch_size, static_cast<acc_t>(scale), PH, PW, extent_plus, clip_h,
                             clip_w, out[k]);
    }
  });
  return out;
}

// at::parallel_for grain for items of about `work` elementary operations each: small problems
// stay on one thread, where a parallel region would cost more than it saves.
inline int64_t grain_for(int64_t work) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, work));
}

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

// nc planes of HW values -> HW pixels of V lanes (lanes past nc untouched). float uses
// ATen's 16x16 register transposes; other types a loop tiled so that the pixel-major side
// stays in L1.
template <typename T>
inline void planes_to_pixels(const T* planes, int64_t HW, int64_t nc, int64_t V, T* pixels) {
  if constexpr (std::is_same_v<T, float>) {
    at::vec::transpose_mxn<float>(planes, HW, pixels, V, static_cast<int>(nc), static_cast<int>(HW));
    return;
  }
  constexpr int64_t kTile = 64;
  for (int64_t p0 = 0; p0 < HW; p0 += kTile) {
    const int64_t p1 = std::min(HW, p0 + kTile);
    for (int64_t c = 0; c < nc; ++c) {
      const T* src = planes + c * HW;
      for (int64_t p = p0; p < p1; ++p) {
        pixels[p * V + c] = src[p];
      }
    }
  }
}

// The inverse of planes_to_pixels, rounding to the planes' type.
template <typename T, typename U>
inline void pixels_to_planes(const T* pixels, int64_t HW, int64_t nc, int64_t V, U* planes) {
  if constexpr (std::is_same_v<T, float> && std::is_same_v<U, float>) {
    at::vec::transpose_mxn<float>(pixels, V, planes, HW, static_cast<int>(HW), static_cast<int>(nc));
    return;
  }
  constexpr int64_t kTile = 64;
  for (int64_t p0 = 0; p0 < HW; p0 += kTile) {
    const int64_t p1 = std::min(HW, p0 + kTile);
    for (int64_t c = 0; c < nc; ++c) {
      U* dst = planes + c * HW;
      for (int64_t p = p0; p < p1; ++p) {
        dst[p] = static_cast<U>(pixels[p * V + c]);
      }
    }
  }
}

// Argument checks shared by the RoI ops: every message names the argument. rois must have the
// input's dtype, as torchvision's kernels require; `float_rois_ok` also takes float32 rois with a
// bfloat16/float16 input, which only roi_align's autocast path passes (NOTE [ roi_align under
// autocast ] in roi_align_kernel.cpp) and its backward then receives.
inline void check_roi_inputs(
    const char* op, const at::Tensor& input, const at::Tensor& rois, bool float_rois_ok = false) {
  TORCH_CHECK(
      input.device().is_cpu() && rois.device().is_cpu(),
      op, ": input and rois must be CPU tensors, got input on ", input.device(),
      " and rois on ", rois.device());
  TORCH_CHECK(
      input.dim() == 4, op, ": input must be a 4-D tensor [N, C, H, W], got ", input.dim(),
      "-D with shape ", input.sizes());
  TORCH_CHECK(
      rois.dim() == 2 && rois.size(1) == 5, op,
      ": rois must have shape [K, 5] (batch index, x1, y1, x2, y2), got ", rois.sizes());
  const auto dt = input.scalar_type();
  TORCH_CHECK(
      dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf, op,
      ": input must be float32, float64, bfloat16 or float16, got ", dt);
  const bool mixed_ok = float_rois_ok && (dt == at::kBFloat16 || dt == at::kHalf);
  TORCH_CHECK(
      rois.scalar_type() == dt || (mixed_ok && rois.scalar_type() == at::kFloat), op,
      ": rois must have the dtype of input", mixed_ok ? " or float32" : "", ", got input ", dt,
      " and rois ", rois.scalar_type());
}

// The channel_mapping a position-sensitive forward returned: int32, grad's shape, and the
// canonical map (output channel c of bin (ph, pw) read input channel (c * PH + ph) * PW + pw).
// The backward kernels partition work by input channel, which is only race-free for this map.
inline void check_channel_mapping(const char* op, const at::Tensor& m, const at::Tensor& grad, int64_t PH, int64_t PW) {
  TORCH_CHECK(
      m.scalar_type() == at::kInt && m.sizes() == grad.sizes() && m.device().is_cpu(), op,
      ": channel_mapping must be the int32 CPU tensor the forward returned, of grad's shape ", grad.sizes(),
      ", got ", m.scalar_type(), " ", m.sizes());
  if (m.numel() == 0) {
    return;
  }
  const at::Tensor expected = at::arange(m.size(1) * PH * PW, m.options()).view({1, m.size(1), PH, PW});
  TORCH_CHECK(
      m.eq(expected).all().item<bool>(), op,
      ": channel_mapping must map output channel c of bin (ph, pw) to input channel "
      "(c * pooled_height + ph) * pooled_width + pw, as the forward returned it");
}

// Output channels of a position-sensitive op: input channels / (PH * PW), exactly.
inline int64_t ps_channels_out(const char* op, int64_t channels, int64_t PH, int64_t PW) {
  TORCH_CHECK(
      PH > 0 && PW > 0 && channels % (PH * PW) == 0, op, ": input channels (", channels,
      ") must be a multiple of pooled_height * pooled_width (", PH, " * ", PW, ")");
  return channels / (PH * PW);
}

// The layout a kernel runs in: the tensor's suggested memory format, of the two supported.
inline at::MemoryFormat layout_of(const char* op, const at::Tensor& t) {
  const auto fmt = t.suggest_memory_format();
  TORCH_CHECK(
      fmt == at::MemoryFormat::Contiguous || fmt == at::MemoryFormat::ChannelsLast, op, ": unsupported memory format ",
      fmt, "; expected Contiguous or ChannelsLast");
  return fmt;
}

// A zeroed grad_input accumulator in the opmath type and `fmt` (from the output pool when large).
inline at::Tensor zeroed_grad_input(const at::Tensor& grad, int64_t N, int64_t C, int64_t H, int64_t W, at::MemoryFormat fmt) {
  at::Tensor g = empty_output({N, C, H, W}, grad.options().dtype(at::toOpMathType(grad.scalar_type())), fmt);
  return g.zero_();
}

// grad_input of a backward whose threads own and write every element once (NchwPlanes and
// by_bands below): uninitialised, in grad's dtype and `fmt`.
inline at::Tensor owned_grad_input(const at::Tensor& grad, int64_t N, int64_t C, int64_t H, int64_t W, at::MemoryFormat fmt) {
  return empty_output({N, C, H, W}, grad.options(), fmt);
}

// Whether a backward writes grad_input with non-temporal stores (NchwPlanes): when its opmath
// size (what the kernels accumulate; a bfloat16/half gradient counts twice its bytes) is at
// least 32 MiB per thread. Below that, a destination written in the previous call (the output
// pool hands back the same block) still sits in this VM's caches, which seem to grow with the
// threads used, and ordinary stores hit it; above, streaming saves reading every line before
// writing it. Measured here (2-vCPU VM, R-FCN ps gradients 53 MB as float, roi_pool P2 111 MB):
// - 2 threads: the ps backwards alike either way (2.6-3.3 ms, noise; 2.8 -> 3.6 ms streamed in
//   an earlier run), roi_pool P2 24 -> 17-20 ms streamed (bfloat16 NCHW 21 -> 19 ms);
// - 1 thread: the ps backwards 9.2-10.5 -> 5.4-6.1 ms streamed (fp32), 5.7-8.0 -> 4.0-5.5 ms
//   (bfloat16), so a single-thread gradient of 53 MB no longer stays in cache.
inline bool stream_grad_input(const at::Tensor& grad_in) {
  const auto acc = at::toOpMathType(grad_in.scalar_type());
  const size_t threads = static_cast<size_t>(std::max(1, at::get_num_threads()));
  return static_cast<size_t>(grad_in.numel()) * c10::elementSize(acc) >= (size_t{32} << 20) * threads;
}

// NCHW gradient planes that one thread owns and fills: start() returns `planes` zeroed
// opmath planes to add into while they stay in cache, finish() leaves them in grad_input.
// Two ways, chosen by the size of grad_input (stream_grad_input above):
// - streaming: the planes are a per-thread buffer, written to grad_input once with
//   non-temporal stores (write_opmath, rounding bfloat16/half);
// - otherwise float/double add into grad_input's planes themselves, zeroed right before, and
//   bfloat16/half into a buffer rounded into grad_input with ordinary stores.
// The per-thread buffer is zeroed once; finish() writes it out and re-zeroes only its nonzero
// blocks (drain_opmath), as a backward's planes are mostly untouched.
template <typename scalar_t>
class NchwPlanes {
 public:
  using acc_t = at::opmath_type<scalar_t>;

  explicit NchwPlanes(bool stream) : stream_(stream) {}

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

// The NCHW driver of the position-sensitive backwards (NOTE [ position-sensitive layouts ]):
// a thread owns (bin b, block of V output channels), hence the input channels c_out * P + b
// they feed, and for each image calls scatter(k, ph, pw, c0, n, dst, lane_stride) for that
// image's ROIs in order; dst holds the zeroed opmath planes of input channels
// (c0 + j) * P + b, j < n, `lane_stride` apart (NchwPlanes).
template <typename scalar_t, typename Scatter>
void ps_backward_nchw(scalar_t* grad_in, const std::vector<std::vector<int64_t>>& per_image, int64_t C, int64_t HW,
                      int64_t PH, int64_t PW, int64_t Cout, int64_t K, bool stream, const Scatter& scatter) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t V = OpVec<scalar_t>::size();
  const int64_t P = PH * PW, blocks = (Cout + V - 1) / V;
  at::parallel_for(0, P * blocks, grain_for(K * 9 * V), [&](int64_t i0, int64_t i1) {
    NchwPlanes<scalar_t> planes(stream);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / blocks, c0 = (i % blocks) * V, n = std::min(V, Cout - c0);
      for (int64_t m = 0; m < static_cast<int64_t>(per_image.size()); ++m) {
        int64_t ls = 0;
        acc_t* dst = planes.start(grad_in + (m * C + c0 * P + b) * HW, n, P * HW, HW, &ls);
        for (const int64_t k : per_image[m]) {
          scatter(k, b / PW, b % PW, c0, n, dst, ls);
        }
        planes.finish();
      }
    }
  });
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

// channels_last backward by bands of rows: a thread owns (image m, rows [r0, r1)), whose
// grad_input elements are contiguous in channels_last, and calls fill(m, r0, r1, band) to add
// every contribution landing in those rows into `band`, zeroed opmath elements where pixel
// (y, x), channel c is band[((y - r0) * W + x) * C + c]. Bands are about `band_bytes` of opmath
// so they stay in L2 while ROIs scatter into them (scattering into a zeroed map missed the
// cache on nearly every add), and each is written to grad_input once (bfloat16/half rounded
// then). A bin whose rows span several bands is visited by each of them, so larger bands do
// less repeated work until they leave L2 (the callers' sizes are measured there).
template <typename scalar_t, typename Fill>
void by_bands(scalar_t* grad_in, int64_t N, int64_t C, int64_t H, int64_t W, bool stream, int64_t band_bytes,
              const Fill& fill) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t row = std::max<int64_t>(1, W * C), rows = std::max<int64_t>(1, band_bytes / (row * sizeof(acc_t)));
  const int64_t bands = (H + rows - 1) / rows;
  at::parallel_for(0, N * bands, 1, [&](int64_t t0, int64_t t1) {
    NchwPlanes<scalar_t> band(stream);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t m = t / bands, r0 = (t % bands) * rows, r1 = std::min(H, r0 + rows);
      int64_t unused = 0;
      acc_t* dst = band.start(grad_in + (m * H + r0) * row, 1, 0, (r1 - r0) * row, &unused);
      fill(m, r0, r1, dst);
      band.finish();
    }
  });
}

// The input shape a backward op is given, checked.
inline void check_input_shape(const char* op, int64_t batch_size, int64_t channels, int64_t height, int64_t width) {
  TORCH_CHECK(
      batch_size >= 0 && channels >= 0 && height >= 0 && width >= 0, op,
      ": input shape (batch_size, channels, height, width) must be non-negative, got (", batch_size, ", ", channels,
      ", ", height, ", ", width, ")");
}

// grad must be [K, output channels, pooled_height, pooled_width], the forward's output shape.
inline void check_grad_shape(const char* op, const at::Tensor& grad, int64_t K, int64_t channels, int64_t PH, int64_t PW) {
  TORCH_CHECK(
      grad.dim() == 4 && grad.size(0) == K && grad.size(1) == channels && grad.size(2) == PH && grad.size(3) == PW, op,
      ": grad must have shape [", K, ", ", channels, ", ", PH, ", ", PW,
      "] (rois, output channels, pooled_height, pooled_width), got ", grad.sizes());
}

inline void check_pooled_size(const char* op, int64_t pooled_height, int64_t pooled_width) {
  TORCH_CHECK(
      pooled_height >= 0 && pooled_width >= 0, op,
      ": output size (pooled_height, pooled_width) must be non-negative, got (", pooled_height,
      ", ", pooled_width, ")");
}

// rois as a contiguous [K, 5] tensor of the kernel's accumulation type (a no-op for the
// usual float32 input with float32 rois).
inline at::Tensor rois_as(const at::Tensor& rois, at::ScalarType acc) {
  return rois.to(acc).contiguous();
}

// channel_mapping of the position-sensitive forwards is the same for every ROI (output channel
// c of bin p read input channel c * P + p): one row in the mapping's memory order (NCHW
// (c, bin), channels_last (bin, c)), copied to each ROI by the threads of the pooling loop.
class PsMappingRows {
 public:
  PsMappingRows(at::Tensor& mapping, int64_t Cout, int64_t P, int64_t os_c, int64_t os_p)
      : dst_(mapping.data_ptr<int32_t>()), K_(mapping.size(0)), row_(Cout * P) {
    for (int64_t c = 0; c < Cout; ++c) {
      for (int64_t p = 0; p < P; ++p) {
        row_[c * os_c + p * os_p] = static_cast<int32_t>(c * P + p);
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
// while they are in L2, so each line of the map is fetched about once (ROI-major items fetched
// ~1.4 times as many lines; measured in the kernel files). Calls pool(load, bin, k, ph, pw, c0,
// n) with `bin` at pixel (0, 0) of input channel c0 * PH * PW + ph * PW + pw of k's image, and
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
      const int64_t bb = i / (N * blocks), m = i / blocks % N, c0 = i % blocks * V;
      const int64_t n = std::min(V, Cout - c0);
      const StridedLoad<scalar_t> load(P * HW, n);
      const scalar_t* bin = input + m * C * HW + (c0 * P + bb) * HW;
      for (const int64_t k : per_image[m]) {
        pool(load, bin, k, bb / PW, bb % PW, c0, n);
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
      for (int64_t bb = 0; bb < P; ++bb) {
        if (bb + 1 < P) {
          prefetch(load, group + bb + 1, k, (bb + 1) / PW, (bb + 1) % PW);
        }
        pool(load, group + bb, k, bb / PW, bb % PW, c0, n);
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
