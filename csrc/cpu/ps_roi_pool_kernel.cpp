// ps_roi_pool forward and backward for CPU: NCHW and channels_last, float/double/bfloat16/half.
//
// Layouts and threading as ps_roi_align (NOTE [ position-sensitive layouts ]): one input
// channel per output element, scalar loops over (pixel stride, channel stride), forward
// parallel over (ROI, output channel), backward threads owning input channels.
// Geometry is torchvision's integer bins (roi_common.h, PoolBins) with ps_roi_pool's rules:
// box extent end - start (at least 1) and bins clipped to [0, H - 1] x [0, W - 1], so the last
// row and column of the map are never pooled. The bin sum runs in torchvision's order and
// divides by the bin area, so fp32/fp64 outputs equal torchvision's bit for bit.
// NOTE [ ps_roi_pool backward ]: torchvision's backward clips bins to [0, H] x [0, W], unlike
// its forward, so for bins touching the last row or column its gradient is not the gradient
// of its forward (it fails gradcheck there). Ours uses the forward's bins: the true gradient.
#include "memory.h"
#include "override.h"
#include "roi_common.h"
#include "vec_io.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

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
  at::Tensor mapping = at::empty_like(output, output.options().dtype(at::kInt));
  if (output.numel() == 0) {
    return {output, mapping};
  }
  const at::Tensor in = input.contiguous(fmt);
  const auto B = ps_bins(detail::rois_as(rois, at::toOpMathType(input.scalar_type())), N, H, W, spatial_scale, PH, PW);
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  const int64_t HW = H * W, pstride = cl ? C : 1, cstride = cl ? 1 : HW;
  const int64_t os_k = Cout * PH * PW, os_c = cl ? 1 : PH * PW, os_p = cl ? Cout : 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "ps_roi_pool_forward", [&] {
    using acc_t = opmath_t<scalar_t>;
    const scalar_t* ip = in.const_data_ptr<scalar_t>();
    scalar_t* op = output.data_ptr<scalar_t>();
    int32_t* mp = mapping.data_ptr<int32_t>();
    at::parallel_for(0, K * Cout, detail::grain_for(PH * PW * 9), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t k = i / Cout, co = i % Cout;
        const PoolBins& b = B[k];
        for (int64_t ph = 0; ph < PH; ++ph) {
          for (int64_t pw = 0; pw < PW; ++pw) {
            const int64_t ci = (co * PH + ph) * PW + pw;
            const scalar_t* plane = ip + b.batch * C * HW + ci * cstride;
            acc_t sum = 0;
            for (int64_t h = b.h0[ph]; h < b.h1[ph]; ++h) {
              for (int64_t w = b.w0[pw]; w < b.w1[pw]; ++w) {
                sum += static_cast<acc_t>(plane[(h * W + w) * pstride]);
              }
            }
            const acc_t area = static_cast<acc_t>((b.h1[ph] - b.h0[ph]) * (b.w1[pw] - b.w0[pw]));
            const int64_t o = k * os_k + co * os_c + (ph * PW + pw) * os_p;
            op[o] = static_cast<scalar_t>(b.empty(ph, pw) ? acc_t(0) : sum / area);
            mp[o] = static_cast<int32_t>(ci);
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
  // NCHW planes are zeroed below by the thread that owns them.
  at::Tensor grad_in = detail::grad_input_zeroed_unless_nchw(grad, batch_size, channels, height, width, fmt);
  const at::Tensor g = grad.contiguous(fmt);
  const auto B = ps_bins(detail::rois_as(rois, acc_type), batch_size, height, width, spatial_scale, PH, PW);
  const int64_t C = channels, W = width, HW = height * width, pstride = cl ? C : 1, cstride = cl ? 1 : HW;
  const int64_t os_k = Cout * PH * PW, os_c = cl ? 1 : PH * PW, os_p = cl ? Cout : 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "ps_roi_pool_backward", [&] {
    using acc_t = opmath_t<scalar_t>;
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    acc_t* gi = grad_in.data_ptr<acc_t>();
    // Threads own input channels (NOTE [ position-sensitive layouts ] in ps_roi_align_kernel.cpp).
    at::parallel_for(0, C, detail::grain_for(K * 9), [&](int64_t c0, int64_t c1) {
      for (int64_t ci = c0; ci < c1; ++ci) {
        const int64_t co = ci / (PH * PW), ph = (ci / PW) % PH, pw = ci % PW;
        for (int64_t n = 0; n < batch_size && !cl; ++n) {
          std::fill_n(gi + (n * C + ci) * HW, HW, acc_t(0));
        }
        for (int64_t k = 0; k < K; ++k) {
          const PoolBins& b = B[k];
          if (b.empty(ph, pw)) {
            continue;
          }
          const acc_t area = static_cast<acc_t>((b.h1[ph] - b.h0[ph]) * (b.w1[pw] - b.w0[pw]));
          const acc_t d = static_cast<acc_t>(gp[k * os_k + co * os_c + (ph * PW + pw) * os_p]) / area;
          acc_t* plane = gi + b.batch * C * HW + ci * cstride;
          for (int64_t h = b.h0[ph]; h < b.h1[ph]; ++h) {
            for (int64_t w = b.w0[pw]; w < b.w1[pw]; ++w) {
              plane[(h * W + w) * pstride] += d;
            }
          }
        }
      }
    });
  });
  return grad_in.to(grad.scalar_type());
}

void register_kernels(torch::Library& m) {
  m.impl("ps_roi_pool", TORCH_FN(ps_roi_pool_forward));
  m.impl("_ps_roi_pool_backward", TORCH_FN(ps_roi_pool_backward));
}

const CpuOverride registrar({"ps_roi_pool", "_ps_roi_pool_backward"}, &register_kernels);

} // namespace
} // namespace tvce
