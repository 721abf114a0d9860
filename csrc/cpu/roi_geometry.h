#pragma once
// RoI geometry: what one ROI reads, computed once per ROI and shared by every channel.
// - roi_align, ps_roi_align: RoiSampling, the merged bilinear taps of each row and column of
//   bins (NOTE [ separable bilinear sampling ]), built by build_all_roi_sampling.
// - roi_pool, ps_roi_pool: PoolBins, the integer [start, end) rows and columns of each bin,
//   built by build_all_pool_bins.
// Both follow torchvision's arithmetic exactly (positions, clamping, rounding); only the
// order of a bin's final sums may differ. Nothing here depends on layout or dtype beyond the
// opmath type acc_t the boxes are read in.
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
#include <ATen/Parallel.h>
#include <c10/util/SmallVector.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
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
    bool count_at_least_one = true,
    const char* op = "roi_align") {
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
        op,
        ": a box of ",
        roi_h,
        " x ",
        roi_w,
        " feature pixels is too large for adaptive sampling");
    grid_h = static_cast<int64_t>(gh);
    grid_w = static_cast<int64_t>(gw);
  }
  // torchvision (0.29) refuses a grid of more than 2^31 - 1 samples per ROI (its per-ROI table
  // would not fit an int); ours would run it, but for minutes on a huge box: the same error.
  const double samples = static_cast<double>(std::max<int64_t>(grid_h, 0)) * std::max<int64_t>(grid_w, 0) *
      static_cast<double>(pooled_height) * static_cast<double>(pooled_width);
  TORCH_CHECK(
      samples <= static_cast<double>(std::numeric_limits<int32_t>::max()),
      op,
      ": sampling grid is too large (",
      grid_h,
      " x ",
      grid_w,
      " samples in each of ",
      pooled_height,
      " x ",
      pooled_width,
      " bins, over 2^31 - 1 per ROI), reduce sampling_ratio or the RoI size");
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
    bool count_at_least_one = true,
    const char* op = "roi_align") {
  const int64_t K = rois_acc.size(0);
  std::vector<RoiSampling<acc_t>> out(K);
  const acc_t* r = rois_acc.const_data_ptr<acc_t>();
  at::parallel_for(0, K, 64, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      build_roi_sampling<acc_t>(
          r + 5 * k, batch_size, height, width, static_cast<acc_t>(spatial_scale),
          pooled_height, pooled_width, sampling_ratio, aligned, out[k], count_at_least_one, op);
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

} // namespace detail
} // namespace tvce
