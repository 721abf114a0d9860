// ps_roi_pool forward and backward for CPU: NCHW and channels_last, float/double/bfloat16/half.
//
// NOTE [ ps_roi_pool ]
// Channel mapping, layouts and vectors as ps_roi_align (NOTE [ position-sensitive layouts ]):
// a block of V output channels of a bin is one gathered vector per pixel. The parts:
// - Geometry: torchvision's integer bins (roi_geometry.h, PoolBins, built by ps_bins) with
//   ps_roi_pool's rules: box extent end - start (at least 1) and bins clipped to
//   [0, H - 1] x [0, W - 1], so the last row and column of the map are never pooled. A bin's sum
//   runs in torchvision's order (rows, then columns) and is divided by the bin's area
//   (store_bin), so fp32/fp64 outputs equal torchvision's bit for bit.
// - NCHW forward: ps_forward_nchw (ps_drivers.h), items (bin, image, block of V output
//   channels), every ROI of the image pooled from the bin's V planes while they are in L2.
// - NOTE [ ps_roi_pool channels_last forward ]: items are (group of one image's ROIs, block of
//   output channels), and an item sweeps its image's rows top to bottom once: at row h every
//   ROI whose rows include h adds the row's part of each of its bins to a running sum (per ROI,
//   bin and lane), and a bin is divided and written after its last row. A bin's sum thus still
//   runs in torchvision's order, while the map is read row after row in address order, each
//   row in L2 for all the boxes overlapping it; ROI-major items read the same pixels box after
//   box, a pixel's V channels being V lines of their own, mostly fetched from L3 one box at a
//   time. Groups keep a thread's running sums within 4 MiB whatever the number of boxes (one
//   group for the usual few hundred ROIs); with fewer groups than threads the channel blocks
//   are narrower, so that every thread has an item (group_channel_items).
// - Backward: the shared position-sensitive driver (ps_drivers.h, NOTE [ position-sensitive
//   backward ]) with this op's `scatter` (the bin's mean gradient over its rectangle, clipped to
//   the band) and `touches` (whether a row of bins meets a band).
//   NOTE [ ps_roi_pool backward ]: torchvision's backward clips bins to [0, H] x [0, W], unlike
//   its forward, so for bins touching the last row or column its gradient is not the gradient
//   of its forward (it fails gradcheck there). Ours uses the forward's bins: the true gradient.
// - Glue: arguments checked (checks.h, check_ps_backward), outputs allocated in the input's
//   layout, registration on the switchable override (override.h).
// The orders that were measured against these: benchmarks/HISTORY.md.
#include "checks.h"
#include "debug_thresholds.h"
#include "memory.h"
#include "override.h"
#include "ps_drivers.h"
#include "roi_geometry.h"
#include "roi_schedule.h"
#include "vec_io.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <numeric>
#include <vector>

namespace tvce {
namespace {

using detail::PoolBins;

constexpr const char* kOp = "ps_roi_pool";

std::vector<PoolBins> ps_bins(const at::Tensor& r, int64_t N, int64_t H, int64_t W, double scale, int64_t PH, int64_t PW) {
  std::vector<PoolBins> B;
  AT_DISPATCH_FLOATING_TYPES(r.scalar_type(), "ps_roi_pool_bins", [&] {
    B = detail::build_all_pool_bins<scalar_t>(r, N, scale, PH, PW, 0, H - 1, W - 1);
  });
  return B;
}

// Items (group of one image's ROIs, block of output channels) of the channels_last forward
// (NOTE [ ps_roi_pool channels_last forward ]): blocks of at most V channels, narrower when
// there are fewer groups than threads so that every thread gets an item. Returns {items,
// channels per block}.
std::pair<int64_t, int64_t> group_channel_items(int64_t groups, int64_t Cout, int64_t V, int64_t threads) {
  const int64_t blocks = std::clamp<int64_t>(std::max((Cout + V - 1) / V, (threads + groups - 1) / groups), 1, Cout);
  const int64_t width = (Cout + blocks - 1) / blocks;
  return {groups * ((Cout + width - 1) / width), width};
}

std::tuple<at::Tensor, at::Tensor> ps_roi_pool_forward(
    const at::Tensor& input,
    const at::Tensor& rois,
    double spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width) {
  detail::check_roi_inputs(kOp, input, rois);
  detail::check_pooled_size(kOp, pooled_height, pooled_width);
  const int64_t K = rois.size(0), N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  const int64_t PH = pooled_height, PW = pooled_width;
  const int64_t Cout = detail::ps_channels_out(kOp, C, PH, PW);
  const auto fmt = detail::layout_of(kOp, input);
  at::Tensor output = empty_output({K, Cout, PH, PW}, input.options(), fmt);
  at::Tensor mapping = empty_output(output.sizes(), output.options().dtype(at::kInt), fmt);
  if (output.numel() == 0) {
    return {output, mapping};
  }
  const at::Tensor in = input.contiguous(fmt);
  const at::Tensor r = detail::rois_as(rois, at::toOpMathType(input.scalar_type()));
  const auto B = ps_bins(r, N, H, W, spatial_scale, PH, PW);
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  const int64_t HW = H * W;
  const int64_t out_stride_roi = Cout * PH * PW, out_stride_channel = cl ? 1 : PH * PW, out_stride_bin = cl ? Cout : 1;
  const detail::PsMappingRows map_rows(mapping, Cout, PH * PW, out_stride_channel, out_stride_bin);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "ps_roi_pool_forward", [&] {
    using acc_t = opmath_t<scalar_t>;
    using Vec = OpVec<scalar_t>;
    constexpr int64_t V = Vec::size();
    const int64_t P = PH * PW;
    const scalar_t* ip = in.const_data_ptr<scalar_t>();
    scalar_t* op = output.data_ptr<scalar_t>();
    // Writes bin bin = ph * PW + pw of ROI k, output channels c0 .. c0 + n: the mean of its
    // pixels from their sum, 0 for an empty bin.
    const auto store_bin = [&](int64_t k, int64_t bin, int64_t c0, int64_t n, const Vec& sum) {
      const PoolBins& b = B[k];
      const int64_t ph = bin / PW, pw = bin % PW;
      store_strided(op + k * out_stride_roi + c0 * out_stride_channel + bin * out_stride_bin, out_stride_channel,
                    b.empty(ph, pw) ? Vec(0) : sum / Vec(static_cast<acc_t>(b.area(ph, pw))), n);
    };
    // NCHW: bin (ph, pw) of ROI k, `bin` pointing at that bin's channel for c0 at pixel (0, 0).
    // Summed in torchvision's order: rows, then columns.
    const auto pool = [&](const StridedLoad<scalar_t>& load, const scalar_t* bin, int64_t k, int64_t ph, int64_t pw,
                          int64_t c0, int64_t n) {
      const PoolBins& b = B[k];
      Vec sum(0);
      for (int64_t h = b.h0[ph]; h < b.h1[ph]; ++h) {
        for (int64_t w = b.w0[pw]; w < b.w1[pw]; ++w) {
          sum = sum + load(bin + h * W + w);
        }
      }
      store_bin(k, ph * PW + pw, c0, n, sum);
    };
    if (!cl) {  // items (bin, image, block of V output channels)
      detail::ps_forward_nchw(ip, detail::rois_per_image(B, N), C, HW, PH, PW, Cout, K, map_rows, pool);
      return;
    }
    // channels_last: rows swept top to bottom (NOTE [ ps_roi_pool channels_last forward ]).
    // Each image's ROIs in groups whose running sums fit in 4 MiB (one group for the usual few
    // hundred ROIs), so that a thread's scratch is bounded whatever the number of boxes.
    const int64_t group_bytes = debug::threshold(debug::kPsRoiPoolGroupBytes, int64_t{4} << 20);
    const int64_t group_size = std::max<int64_t>(1, group_bytes / (P * V * static_cast<int64_t>(sizeof(acc_t))));
    std::vector<std::pair<int64_t, std::vector<int64_t>>> groups;  // (image, ROIs)
    for (const auto& ks : detail::rois_per_image(B, N)) {
      const int64_t R = static_cast<int64_t>(ks.size());
      for (int64_t j = 0; j < R; j += group_size) {
        const auto first = ks.begin() + j, last = ks.begin() + std::min(R, j + group_size);
        groups.emplace_back(B[ks[j]].batch, std::vector<int64_t>(first, last));
      }
    }
    // A call that reads few pixels stays on one thread (its items are few and large).
    int64_t work = 0;
    for (const PoolBins& b : B) {
      work += (b.h1[PH - 1] - b.h0[0]) * (b.w1[PW - 1] - b.w0[0]) * Cout;
    }
    const int64_t threads = work < at::internal::GRAIN_SIZE ? 1 : at::get_num_threads();
    const auto split = group_channel_items(static_cast<int64_t>(groups.size()), Cout, V, threads);
    const int64_t items = split.first, width = split.second, blocks = items / static_cast<int64_t>(groups.size());
    at::parallel_for(0, items, threads == 1 ? items : 1, [&](int64_t i0, int64_t i1) {
      map_rows.copy_share(i0, i1, items);
      std::vector<acc_t> acc;  // running bin sums: [ROI of the group][bin][V]
      std::vector<int64_t> order, active;
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t c0 = i % blocks * width, n = std::min(width, Cout - c0);
        const auto& [m, ks] = groups[i / blocks];
        const int64_t R = static_cast<int64_t>(ks.size());
        const StridedLoad<scalar_t> load(P, n);
        const scalar_t* image = ip + m * HW * C + c0 * P;
        acc.assign(R * P * V, acc_t(0));
        for (const int64_t k : ks) {  // empty bins are never visited by the sweep
          for (int64_t bin = 0; bin < P; ++bin) {
            if (B[k].empty(bin / PW, bin % PW)) {
              store_bin(k, bin, c0, n, Vec(0));
            }
          }
        }
        // ROIs enter the sweep at their first row and leave after their last.
        order.resize(R);
        std::iota(order.begin(), order.end(), 0);
        std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return B[ks[x]].h0[0] < B[ks[y]].h0[0]; });
        active.clear();
        for (int64_t h = 0, next = 0; h < H && (next < R || !active.empty()); ++h) {
          for (; next < R && B[ks[order[next]]].h0[0] <= h; ++next) {
            active.push_back(order[next]);
          }
          active.erase(std::remove_if(active.begin(), active.end(), [&](int64_t j) { return B[ks[j]].h1[PH - 1] <= h; }),
                       active.end());
          const scalar_t* row = image + h * W * C;
          for (const int64_t j : active) {
            const int64_t k = ks[j];
            const PoolBins& b = B[k];
            for (int64_t ph = 0; ph < PH; ++ph) {
              if (h < b.h0[ph] || h >= b.h1[ph]) {
                continue;
              }
              for (int64_t pw = 0; pw < PW; ++pw) {
                if (b.w1[pw] <= b.w0[pw]) {
                  continue;
                }
                const int64_t bin = ph * PW + pw;
                acc_t* slot = acc.data() + (j * P + bin) * V;
                Vec sum = Vec::loadu(slot);
                for (int64_t w = b.w0[pw]; w < b.w1[pw]; ++w) {  // torchvision's order: rows, then columns
                  sum = sum + load(row + w * C + bin);
                }
                if (h + 1 < b.h1[ph]) {
                  sum.store(slot);
                } else {  // the bin's last row
                  store_bin(k, bin, c0, n, sum);
                }
              }
            }
          }
        }
      }
    });
  });
  return {output, mapping};
}

at::Tensor ps_roi_pool_backward(
    const at::Tensor& grad,
    const at::Tensor& rois,
    const at::Tensor& channel_mapping,
    double spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t batch_size,
    int64_t channels,
    int64_t height,
    int64_t width) {
  constexpr const char* op = "_ps_roi_pool_backward";
  const int64_t PH = pooled_height, PW = pooled_width;
  const int64_t Cout =
      detail::check_ps_backward(op, grad, rois, channel_mapping, PH, PW, batch_size, channels, height, width);
  const int64_t K = rois.size(0);
  const auto fmt = detail::layout_of(op, grad);
  const auto acc_type = at::toOpMathType(grad.scalar_type());
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  if (grad.numel() == 0 || batch_size * channels * height * width == 0) {
    return detail::zeroed_grad_input(grad, batch_size, channels, height, width, fmt).to(grad.scalar_type());
  }
  // Every element is written once by the thread that owns it (NOTE [ position-sensitive backward ]).
  at::Tensor grad_in = detail::owned_grad_input(grad, batch_size, channels, height, width, fmt);
  const bool stream = detail::stream_grad_input(grad_in);
  const at::Tensor g = grad.contiguous(fmt);
  const auto B = ps_bins(detail::rois_as(rois, acc_type), batch_size, height, width, spatial_scale, PH, PW);
  const int64_t C = channels, W = width;
  const int64_t out_stride_roi = Cout * PH * PW, out_stride_channel = cl ? 1 : PH * PW, out_stride_bin = cl ? Cout : 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "ps_roi_pool_backward", [&] {
    using acc_t = opmath_t<scalar_t>;
    using Vec = OpVec<scalar_t>;
    constexpr int64_t V = Vec::size();
    const auto per_image = detail::rois_per_image(B, batch_size);
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    scalar_t* gi = grad_in.data_ptr<scalar_t>();
    // NOTE [ position-sensitive backward ] in ps_drivers.h: the gradient of output channels
    // c0 .. c0 + n of bin (ph, pw) of ROI k, divided by the bin's area, added to its pixels in
    // rows [r0, r1).
    const auto scatter = [&](int64_t k, int64_t ph, int64_t pw, int64_t c0, int64_t n, int64_t r0, int64_t r1,
                             acc_t* dst, int64_t lane_stride, int64_t pixel_stride) {
      const PoolBins& b = B[k];
      if (b.empty(ph, pw)) {
        return;
      }
      const int64_t h0 = std::max(b.h0[ph], r0), h1 = std::min(b.h1[ph], r1);
      const acc_t area = static_cast<acc_t>(b.area(ph, pw));
      acc_t d[V];
      (load_strided<scalar_t>(gp + k * out_stride_roi + c0 * out_stride_channel + (ph * PW + pw) * out_stride_bin,
                              out_stride_channel, n) /
       Vec(area))
          .store(d);
      for (int64_t h = h0; h < h1; ++h) {
        for (int64_t w = b.w0[pw]; w < b.w1[pw]; ++w) {
          acc_t* px = dst + ((h - r0) * W + w) * pixel_stride;
          for (int64_t j = 0; j < n; ++j) {
            px[j * lane_stride] += d[j];
          }
        }
      }
    };
    // Whether row ph of k's bins has a row in [r0, r1).
    const auto touches = [&](int64_t k, int64_t ph, int64_t r0, int64_t r1) {
      return std::max(B[k].h0[ph], r0) < std::min(B[k].h1[ph], r1);
    };
    detail::ps_backward(gi, per_image, C, height, width, PH, PW, Cout, K, cl, stream, touches, scatter);
  });
  return grad_in;
}

void register_kernels(torch::Library& m) {
  m.impl("ps_roi_pool", TORCH_FN(ps_roi_pool_forward));
  m.impl("_ps_roi_pool_backward", TORCH_FN(ps_roi_pool_backward));
}

const CpuOverride registrar({"ps_roi_pool", "_ps_roi_pool_backward"}, &register_kernels);

} // namespace
} // namespace tvce
