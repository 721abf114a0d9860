// ps_roi_align forward and backward for CPU: NCHW and channels_last, float/double/bfloat16/half.
//
// NOTE [ position-sensitive layouts ]
// Output channel c_out of bin (ph, pw) reads exactly one input channel,
// c_in = (c_out * PH + ph) * PW + pw, so every input channel feeds exactly one (c_out, bin) and
// every output element one plane: there is no channel vector to share between outputs (in
// channels_last the channels one bin needs are PH * PW apart: a strided gather). Options
// measured on the R-FCN case ([2, 490, 100, 136], 300 boxes, 7x7, benchmarks/RESULTS.md):
// the scalar loops below over roi_align's separable, merged taps (computed once per ROI, see
// NOTE [ separable bilinear sampling ]) read each tap once and already beat torchvision's
// per-sample recomputation by the factors recorded there, for both layouts, so one code path
// addresses elements through (pixel stride, channel stride) and serves NCHW and channels_last.
// - Forward: parallel over (ROI, output channel).
// - Backward: a thread owns input channels, hence the one (c_out, bin) each feeds, and visits
//   ROIs in order: no races, deterministic. bfloat16/half accumulate in a float buffer.
// Geometry is torchvision's: always half-pixel aligned, no minimum box size, and an empty
// adaptive grid divides by zero (NaN), as torchvision does.
#include "memory.h"
#include "override.h"
#include "roi_common.h"
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
  at::Tensor mapping = at::empty_like(output, output.options().dtype(at::kInt));
  if (output.numel() == 0) {
    return {output, mapping};
  }
  const at::Tensor in = input.contiguous(fmt);
  const at::Tensor r = detail::rois_as(rois, at::toOpMathType(input.scalar_type()));
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  const int64_t HW = H * W, pstride = cl ? C : 1, cstride = cl ? 1 : HW;
  // Strides of output element (k, c_out, ph * PW + pw).
  const int64_t os_k = Cout * PH * PW, os_c = cl ? 1 : PH * PW, os_p = cl ? Cout : 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "ps_roi_align_forward", [&] {
    using acc_t = opmath_t<scalar_t>;
    const auto S = detail::build_all_roi_sampling<acc_t>(
        r, N, H, W, spatial_scale, PH, PW, sampling_ratio, /*aligned=*/true, /*count_at_least_one=*/false);
    const scalar_t* ip = in.const_data_ptr<scalar_t>();
    scalar_t* op = output.data_ptr<scalar_t>();
    int32_t* mp = mapping.data_ptr<int32_t>();
    at::parallel_for(0, K * Cout, detail::grain_for(PH * PW * 9), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t k = i / Cout, co = i % Cout;
        const RoiSampling<acc_t>& s = S[k];
        for (int64_t ph = 0; ph < PH; ++ph) {
          for (int64_t pw = 0; pw < PW; ++pw) {
            const int64_t ci = (co * PH + ph) * PW + pw;
            const scalar_t* plane = ip + s.batch * C * HW + ci * cstride;
            acc_t acc = 0;
            for (int64_t ky = s.y.begin(ph); ky < s.y.end(ph); ++ky) {
              const scalar_t* row = plane + s.y.idx[ky] * W * pstride;
              acc_t racc = 0;
              for (int64_t kx = s.x.begin(pw); kx < s.x.end(pw); ++kx) {
                racc += s.x.w[kx] * static_cast<acc_t>(row[s.x.idx[kx] * pstride]);
              }
              acc += s.y.w[ky] * racc;
            }
            const int64_t o = k * os_k + co * os_c + (ph * PW + pw) * os_p;
            op[o] = static_cast<scalar_t>(acc / s.count);
            mp[o] = static_cast<int32_t>(ci);
          }
        }
      }
    });
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
  // NCHW planes are zeroed below by the thread that owns them.
  at::Tensor grad_in = detail::grad_input_zeroed_unless_nchw(grad, batch_size, channels, height, width, fmt);
  const at::Tensor g = grad.contiguous(fmt);
  const at::Tensor r = detail::rois_as(rois, acc_type);
  const int64_t C = channels, HW = height * width, pstride = cl ? C : 1, cstride = cl ? 1 : HW;
  const int64_t os_k = Cout * PH * PW, os_c = cl ? 1 : PH * PW, os_p = cl ? Cout : 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "ps_roi_align_backward", [&] {
    using acc_t = opmath_t<scalar_t>;
    const auto S = detail::build_all_roi_sampling<acc_t>(
        r, batch_size, height, width, spatial_scale, PH, PW, sampling_ratio, true, false);
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    acc_t* gi = grad_in.data_ptr<acc_t>();
    // Threads own input channels: see NOTE [ position-sensitive layouts ].
    at::parallel_for(0, C, detail::grain_for(K * 9), [&](int64_t c0, int64_t c1) {
      for (int64_t ci = c0; ci < c1; ++ci) {
        const int64_t co = ci / (PH * PW), ph = (ci / PW) % PH, pw = ci % PW;
        for (int64_t n = 0; n < batch_size && !cl; ++n) {
          std::fill_n(gi + (n * C + ci) * HW, HW, acc_t(0));
        }
        for (int64_t k = 0; k < K; ++k) {
          const RoiSampling<acc_t>& s = S[k];
          const acc_t gv = static_cast<acc_t>(gp[k * os_k + co * os_c + (ph * PW + pw) * os_p]) / s.count;
          acc_t* plane = gi + s.batch * C * HW + ci * cstride;
          for (int64_t ky = s.y.begin(ph); ky < s.y.end(ph); ++ky) {
            acc_t* row = plane + s.y.idx[ky] * width * pstride;
            const acc_t gy = gv * s.y.w[ky];
            for (int64_t kx = s.x.begin(pw); kx < s.x.end(pw); ++kx) {
              row[s.x.idx[kx] * pstride] += gy * s.x.w[kx];
            }
          }
        }
      }
    });
  });
  return grad_in.to(grad.scalar_type());
}

void register_kernels(torch::Library& m) {
  m.impl("ps_roi_align", TORCH_FN(ps_roi_align_forward));
  m.impl("_ps_roi_align_backward", TORCH_FN(ps_roi_align_backward));
}

const CpuOverride registrar({"ps_roi_align", "_ps_roi_align_backward"}, &register_kernels);

} // namespace
} // namespace tvce
