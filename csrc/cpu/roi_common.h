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
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace tvce {
namespace detail {

// Taps of `bins` bins along one axis. Every bin has the same number n of taps (the most any
// bin of this ROI needs, padding with zero-weight taps on pixel 0) so that the kernels' inner
// loops have one trip count per ROI, which the branch predictor learns; bin i uses taps
// [i * n, (i + 1) * n).
template <typename acc_t>
struct AxisTaps {
  int64_t n = 0;
  std::vector<int64_t> idx;
  std::vector<acc_t> w;

  int64_t begin(int64_t bin) const { return bin * n; }
  int64_t end(int64_t bin) const { return (bin + 1) * n; }
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
  for (int64_t p = 0; p < bins; ++p) {
    std::copy(idx.begin() + off[p], idx.begin() + off[p + 1], t.idx.begin() + p * most);
    std::copy(w.begin() + off[p], w.begin() + off[p + 1], t.w.begin() + p * most);
  }
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
    RoiSampling<acc_t>& s) {
  const acc_t b = roi[0];
  TORCH_CHECK(
      b >= 0 && b < batch_size,
      "rois[:, 0] must hold batch indices in [0, ",
      batch_size,
      "), got ",
      b);
  s.batch = static_cast<int64_t>(b);
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
  if (!(std::isfinite(start_w) && std::isfinite(start_h) && std::isfinite(end_w) &&
        std::isfinite(end_h) && std::isfinite(bin_h) && std::isfinite(bin_w))) {
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
    grid_h = gh > 0 ? static_cast<int64_t>(gh) : 0;
    grid_w = gw > 0 ? static_cast<int64_t>(gw) : 0;
  }
  s.count = std::max(static_cast<acc_t>(grid_h * grid_w), acc_t(1));
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
    bool aligned) {
  const int64_t K = rois_acc.size(0);
  std::vector<RoiSampling<acc_t>> out(K);
  const acc_t* r = rois_acc.const_data_ptr<acc_t>();
  at::parallel_for(0, K, 64, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      build_roi_sampling<acc_t>(
          r + 5 * k, batch_size, height, width, static_cast<acc_t>(spatial_scale),
          pooled_height, pooled_width, sampling_ratio, aligned, out[k]);
    }
  });
  return out;
}

// Argument checks shared by the RoI ops: every message names the argument.
inline void check_roi_inputs(const char* op, const at::Tensor& input, const at::Tensor& rois) {
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
  const bool reduced = dt == at::kBFloat16 || dt == at::kHalf;
  TORCH_CHECK(
      rois.scalar_type() == dt || (reduced && rois.scalar_type() == at::kFloat), op,
      ": rois must have the dtype of input", reduced ? " or float32" : "", ", got input ", dt,
      " and rois ", rois.scalar_type());
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

} // namespace detail
} // namespace tvce
