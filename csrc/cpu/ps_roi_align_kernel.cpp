// ps_roi_align forward and backward for CPU: NCHW and channels_last, float/double/bfloat16/half.
//
// NOTE [ position-sensitive layouts ]
// Output channel c_out of bin (ph, pw) reads exactly one input channel,
// c_in = (c_out * PH + ph) * PW + pw, so every input channel feeds exactly one (c_out, bin):
// the c_out outputs of one bin read the same pixels of planes PH * PW channels apart (NCHW:
// PH * PW * H * W elements; channels_last: PH * PW elements of one pixel, a strided gather).
// - Forward: each bin runs roi_align's separable, merged taps (computed once per ROI, NOTE
//   [ separable bilinear sampling ]) with one vector of V output channels per tap, loaded by a
//   gather (StridedLoad). The misses, not the arithmetic, bound it: a standalone measurement
//   gave ~4 ns per 10-lane gather from L1 but ~60 ns from random lines of a map beyond L2.
//   NCHW items are (bin, image, block of V output channels): an item samples one bin of every
//   ROI of the image from the bin's V planes (V * H * W elements) while they are in L2, so each
//   line of the map is fetched about once. channels_last items are (ROI, block) in spatial
//   order with the next bin's taps prefetched: there a pixel's V channels are V lines of its
//   own, and a bin-major order measured slower (ps_roi_pool: 3.8 vs 2.1 ms). Measured on the
//   R-FCN case ([2, 490, 100, 136], 300 boxes, 7x7, 2 threads): the scalar loop per (ROI,
//   output channel) took ~3.1 ms; ROI-major items with prefetching ~2.0 ms (~2.5 without);
//   bin-major NCHW items 1.64 ms against 2.03 ms for ROI-major in one process (1 thread:
//   3.12 vs 3.13 ms). Per plane (scalar, one plane at a time for all ROIs) measured slower
//   than either.
//   NOTE [ ps_roi_align channels_last ]: ps_roi_pool's channels_last sweep of each image's
//   rows (NOTE [ ps_roi_pool channels_last forward ]), tried here with one running sum per y
//   tap combined in tap order, measured slower: 1.7-3.0 against 1.6-2.3 ms at 2 threads, 6-11
//   against 3.0-3.8 ms at 1 (alternating processes), so ROI-major items stay.
// - Backward, NCHW (detail::ps_backward_nchw): a thread owns (bin b, block of V output
//   channels), hence the input channels c_out * PH * PW + b they feed, whose planes it zeroes
//   and fills while in cache (detail::NchwPlanes) from each image's ROIs in order.
//   channels_last (detail::by_bands): a thread owns bands of rows (half of L2) of an image and adds
//   what each of its ROIs, in order, puts in them (a zeroed float map scattered into took
//   6.2 ms, the bands 2.9 ms). Either way: no races, deterministic, every element receiving
//   its adds in ROI order, each element of grad_input written once.
// Both address elements through (pixel stride, channel stride).
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
  at::Tensor mapping = empty_output(output.sizes(), output.options().dtype(at::kInt), fmt);
  if (output.numel() == 0) {
    return {output, mapping};
  }
  const at::Tensor in = input.contiguous(fmt);
  const at::Tensor r = detail::rois_as(rois, at::toOpMathType(input.scalar_type()));
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  const int64_t HW = H * W, pstride = cl ? C : 1;
  // Strides of output element (k, c_out, ph * PW + pw).
  const int64_t os_k = Cout * PH * PW, os_c = cl ? 1 : PH * PW, os_p = cl ? Cout : 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "ps_roi_align_forward", [&] {
    using acc_t = opmath_t<scalar_t>;
    const auto S = detail::build_all_roi_sampling<acc_t>(
        r, N, H, W, spatial_scale, PH, PW, sampling_ratio, /*aligned=*/true, /*count_at_least_one=*/false);
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
        const scalar_t* row = bin + s.y.idx[ky] * W * pstride;
        Vec racc(0);
        for (int64_t kx = s.x.begin(pw); kx < s.x.end(pw); ++kx) {
          racc = racc + Vec(s.x.w[kx]) * load(row + s.x.idx[kx] * pstride);
        }
        acc = acc + Vec(s.y.w[ky]) * racc;
      }
      store_strided(op + k * os_k + c0 * os_c + (ph * PW + pw) * os_p, os_c, acc / Vec(s.count), n);
    };
    const detail::PsMappingRows map_rows(mapping, Cout, P, os_c, os_p);
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
              load.prefetch(bin + (s.y.idx[ky] * W + s.x.idx[kx]) * pstride);
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
  // Every element is written once by the thread that owns it (NchwPlanes / by_bands).
  at::Tensor grad_in = detail::owned_grad_input(grad, batch_size, channels, height, width, fmt);
  const bool stream = detail::stream_grad_input(grad_in);
  const at::Tensor g = grad.contiguous(fmt);
  const at::Tensor r = detail::rois_as(rois, acc_type);
  const int64_t C = channels, HW = height * width;
  const int64_t os_k = Cout * PH * PW, os_c = cl ? 1 : PH * PW, os_p = cl ? Cout : 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "ps_roi_align_backward", [&] {
    using acc_t = opmath_t<scalar_t>;
    using Vec = OpVec<scalar_t>;
    constexpr int64_t V = Vec::size();
    const auto S = detail::build_all_roi_sampling<acc_t>(
        r, batch_size, height, width, spatial_scale, PH, PW, sampling_ratio, true, false);
    const auto per_image = detail::rois_per_image(S, batch_size);
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    scalar_t* gi = grad_in.data_ptr<scalar_t>();
    const int64_t P = PH * PW;
    // Adds ROI k's gradient of bin (ph, pw), output channels c0 .. c0 + n, at its tap rows in
    // [r0, r1) into dst (row r0 of input channel c0 * P + ph * PW + pw); lanes are `ls` apart,
    // pixels `ps`.
    const auto scatter_bin = [&](int64_t k, int64_t ph, int64_t pw, int64_t c0, int64_t n, int64_t r0, int64_t r1,
                                 acc_t* dst, int64_t ls, int64_t ps) {
      const RoiSampling<acc_t>& s = S[k];
      const Vec gv = load_strided<scalar_t>(gp + k * os_k + c0 * os_c + (ph * PW + pw) * os_p, os_c, n) / Vec(s.count);
      acc_t buf[V];
      for (int64_t ky = s.y.begin(ph); ky < s.y.end(ph); ++ky) {
        const int64_t y = s.y.idx[ky];
        if (y < r0 || y >= r1) {
          continue;
        }
        acc_t* row = dst + (y - r0) * width * ps;
        const Vec gy = gv * Vec(s.y.w[ky]);
        for (int64_t kx = s.x.begin(pw); kx < s.x.end(pw); ++kx) {
          (gy * Vec(s.x.w[kx])).store(buf);
          acc_t* px = row + s.x.idx[kx] * ps;
          for (int64_t j = 0; j < n; ++j) {
            px[j * ls] += buf[j];
          }
        }
      }
    };
    if (cl) {
      // Bands of half of L2 (1 MiB here; 1.5 MiB measured 1-3% slower, 2 MiB 6-8%).
      const int64_t band_bytes = detail::l2_bytes() / 2;
      detail::by_bands(gi, batch_size, C, height, width, stream, band_bytes, [&](int64_t m, int64_t r0, int64_t r1, acc_t* band) {
        for (const int64_t k : per_image[m]) {
          const RoiSampling<acc_t>& s = S[k];
          for (int64_t ph = 0; ph < PH; ++ph) {
            bool in_band = false;
            for (int64_t ky = s.y.begin(ph); ky < s.y.end(ph); ++ky) {
              in_band |= s.y.idx[ky] >= r0 && s.y.idx[ky] < r1;
            }
            for (int64_t pw = 0; pw < PW && in_band; ++pw) {
              for (int64_t c0 = 0; c0 < Cout; c0 += V) {
                scatter_bin(k, ph, pw, c0, std::min(V, Cout - c0), r0, r1, band + c0 * P + ph * PW + pw, P, C);
              }
            }
          }
        }
      });
      return;
    }
    detail::ps_backward_nchw(gi, per_image, C, HW, PH, PW, Cout, K, stream,
                             [&](int64_t k, int64_t ph, int64_t pw, int64_t c0, int64_t n, acc_t* dst, int64_t ls) {
                               scatter_bin(k, ph, pw, c0, n, 0, height, dst, ls, 1);
                             });
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
