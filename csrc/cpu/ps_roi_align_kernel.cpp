// ps_roi_align forward and backward for CPU: NCHW and channels_last, float/double/bfloat16/half.
//
// NOTE [ position-sensitive layouts ]
// Output channel c_out of bin (ph, pw) reads exactly one input channel,
// c_in = (c_out * PH + ph) * PW + pw, so every input channel feeds exactly one (c_out, bin):
// the c_out outputs of one bin read the same pixels of planes PH * PW channels apart (NCHW:
// PH * PW * H * W elements; channels_last: PH * PW elements of one pixel). A block of V output
// channels of a bin is therefore one vector, loaded by a strided gather (StridedLoad, vec_io.h)
// and stored strided; the kernels address elements through (pixel stride, lane stride).
// The parts:
// - Geometry: roi_align's separable, merged taps (roi_geometry.h, NOTE [ separable bilinear
//   sampling ]), computed once per ROI, always half-pixel aligned, no minimum box size, and an
//   empty adaptive grid divides by zero (NaN), as torchvision does.
// - Forward: `pool` samples one bin for a block of output channels, one gathered vector per
//   tap. The gathers' cache misses, not the arithmetic, bound it, so the drivers
//   (ps_drivers.h) order the work for the caches: NCHW items (bin, image, block of V output
//   channels) sample one bin of every ROI of the image from the bin's V planes while they are
//   in L2, so each line of the map is fetched about once; channels_last items (ROI, block) run
//   in spatial order with the next bin's taps prefetched, since there a pixel's V channels are V
//   lines of their own (NOTE [ ps_roi_align channels_last ]). channel_mapping is the same
//   for every ROI and is copied on the pooling threads (PsMappingRows).
//   NOTE [ ps_roi_align channels_last ]: bin-major orders, and ps_roi_pool's sweep of each
//   image's rows (NOTE [ ps_roi_pool channels_last forward ]) tried with one running sum per y
//   tap, measured slower than ROI-major items here (benchmarks/HISTORY.md).
// - Backward: the shared position-sensitive driver (ps_drivers.h, NOTE [ position-sensitive
//   backward ]) with this op's `scatter` (the bin's gradient over its bilinear taps, the
//   transpose of `pool`) and `touches` (whether a y tap of a row of bins lies in a band).
// - Glue: arguments checked (checks.h, check_ps_backward), outputs allocated in the input's
//   layout, registration on the switchable override (override.h).
#include "checks.h"
#include "memory.h"
#include "override.h"
#include "ps_drivers.h"
#include "roi_geometry.h"
#include "roi_schedule.h"
#include "vec_io.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

namespace tvce {
namespace {

using detail::RoiSampling;

constexpr const char* kOp = "ps_roi_align";

std::tuple<at::Tensor, at::Tensor> ps_roi_align_forward(
    const at::Tensor& input,
    const at::Tensor& rois,
    double spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t sampling_ratio) {
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
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  const int64_t HW = H * W, pixel_stride = cl ? C : 1;
  // Strides of output element (k, c_out, ph * PW + pw).
  const int64_t out_stride_roi = Cout * PH * PW, out_stride_channel = cl ? 1 : PH * PW, out_stride_bin = cl ? Cout : 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "ps_roi_align_forward", [&] {
    using acc_t = opmath_t<scalar_t>;
    const auto S = detail::build_all_roi_sampling<acc_t>(
        r, N, H, W, spatial_scale, PH, PW, sampling_ratio, /*aligned=*/true, /*count_at_least_one=*/false, kOp);
    const scalar_t* ip = in.const_data_ptr<scalar_t>();
    scalar_t* op = output.data_ptr<scalar_t>();
    using Vec = OpVec<scalar_t>;
    const int64_t P = PH * PW;
    // Bin (ph, pw) of ROI k for output channels c0 .. c0 + n, `bin` pointing at that bin's
    // channel for c0 at pixel (0, 0).
    const auto pool = [&](const StridedLoad<scalar_t>& load, const scalar_t* bin, int64_t k, int64_t ph, int64_t pw,
                          int64_t c0, int64_t n) {
      const RoiSampling<acc_t>& s = S[k];
      Vec acc(0);
      for (int64_t ky = s.y.begin(ph); ky < s.y.end(ph); ++ky) {
        const scalar_t* row = bin + s.y.idx[ky] * W * pixel_stride;
        Vec racc(0);
        for (int64_t kx = s.x.begin(pw); kx < s.x.end(pw); ++kx) {
          racc = racc + Vec(s.x.w[kx]) * load(row + s.x.idx[kx] * pixel_stride);
        }
        acc = acc + Vec(s.y.w[ky]) * racc;
      }
      store_strided(op + k * out_stride_roi + c0 * out_stride_channel + (ph * PW + pw) * out_stride_bin, out_stride_channel, acc / Vec(s.count), n);
    };
    const detail::PsMappingRows map_rows(mapping, Cout, P, out_stride_channel, out_stride_bin);
    if (!cl) {  // items (bin, image, block of V output channels)
      detail::ps_forward_nchw(ip, detail::rois_per_image(S, N), C, HW, PH, PW, Cout, K, map_rows, pool);
      return;
    }
    // channels_last: items (ROI, block of V output channels), the next bin's taps prefetched.
    detail::ps_forward_channels_last(
        ip, detail::spatial_order<acc_t>(r), C, HW, PH, PW, Cout, map_rows, [&](int64_t k) { return S[k].batch; },
        [&](const StridedLoad<scalar_t>& load, const scalar_t* bin, int64_t k, int64_t ph, int64_t pw) {
          const RoiSampling<acc_t>& s = S[k];
          for (int64_t ky = s.y.begin(ph); ky < s.y.end(ph); ++ky) {
            for (int64_t kx = s.x.begin(pw); kx < s.x.end(pw); ++kx) {
              load.prefetch(bin + (s.y.idx[ky] * W + s.x.idx[kx]) * pixel_stride);
            }
          }
        },
        pool);
  });
  return {output, mapping};
}

at::Tensor ps_roi_align_backward(
    const at::Tensor& grad,
    const at::Tensor& rois,
    const at::Tensor& channel_mapping,
    double spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t sampling_ratio,
    int64_t batch_size,
    int64_t channels,
    int64_t height,
    int64_t width) {
  constexpr const char* op = "_ps_roi_align_backward";
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
  const at::Tensor r = detail::rois_as(rois, acc_type);
  const int64_t C = channels;
  const int64_t out_stride_roi = Cout * PH * PW, out_stride_channel = cl ? 1 : PH * PW, out_stride_bin = cl ? Cout : 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "ps_roi_align_backward", [&] {
    using acc_t = opmath_t<scalar_t>;
    using Vec = OpVec<scalar_t>;
    constexpr int64_t V = Vec::size();
    const auto S = detail::build_all_roi_sampling<acc_t>(
        r, batch_size, height, width, spatial_scale, PH, PW, sampling_ratio, true, false, op);
    const auto per_image = detail::rois_per_image(S, batch_size);
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    scalar_t* gi = grad_in.data_ptr<scalar_t>();
    // NOTE [ position-sensitive backward ] in ps_drivers.h: the gradient of output channels
    // c0 .. c0 + n of bin (ph, pw) of ROI k, added at its taps in rows [r0, r1).
    const auto scatter = [&](int64_t k, int64_t ph, int64_t pw, int64_t c0, int64_t n, int64_t r0, int64_t r1,
                             acc_t* dst, int64_t lane_stride, int64_t pixel_stride) {
      const RoiSampling<acc_t>& s = S[k];
      const Vec gv =
          load_strided<scalar_t>(gp + k * out_stride_roi + c0 * out_stride_channel + (ph * PW + pw) * out_stride_bin,
                                 out_stride_channel, n) /
          Vec(s.count);
      acc_t buf[V];
      for (int64_t ky = s.y.begin(ph); ky < s.y.end(ph); ++ky) {
        const int64_t y = s.y.idx[ky];
        if (y < r0 || y >= r1) {
          continue;
        }
        acc_t* row = dst + (y - r0) * width * pixel_stride;
        const Vec gy = gv * Vec(s.y.w[ky]);
        for (int64_t kx = s.x.begin(pw); kx < s.x.end(pw); ++kx) {
          (gy * Vec(s.x.w[kx])).store(buf);
          acc_t* px = row + s.x.idx[kx] * pixel_stride;
          for (int64_t j = 0; j < n; ++j) {
            px[j * lane_stride] += buf[j];
          }
        }
      }
    };
    // Whether a y tap of row ph of k's bins lies in [r0, r1).
    const auto touches = [&](int64_t k, int64_t ph, int64_t r0, int64_t r1) {
      const RoiSampling<acc_t>& s = S[k];
      bool in_band = false;
      for (int64_t ky = s.y.begin(ph); ky < s.y.end(ph); ++ky) {
        in_band |= s.y.idx[ky] >= r0 && s.y.idx[ky] < r1;
      }
      return in_band;
    };
    detail::ps_backward(gi, per_image, C, height, width, PH, PW, Cout, K, cl, stream, touches, scatter);
  });
  return grad_in;
}

void register_kernels(torch::Library& m) {
  m.impl("ps_roi_align", TORCH_FN(ps_roi_align_forward));
  m.impl("_ps_roi_align_backward", TORCH_FN(ps_roi_align_backward));
}

const CpuOverride registrar({"ps_roi_align", "_ps_roi_align_backward"}, &register_kernels);

} // namespace
} // namespace tvce
