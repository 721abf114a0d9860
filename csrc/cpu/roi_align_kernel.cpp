// roi_align forward and backward for CPU: NCHW and channels_last, float/double/bfloat16/half
// (reduced types accumulate in float).
//
// NOTE [ roi_align layouts ]
// The parts, bottom up:
// - Geometry (roi_geometry.h, NOTE [ separable bilinear sampling ]): per ROI, the merged row
//   taps of each output row of bins and the merged column taps of each output column, computed
//   once (build_roi_sampling) and shared by every channel.
// - Two leaf loops over pixel-major data, vectorized over channels: bin_sum (a bin as a
//   weighted sum of whole pixel vectors, sum_r wy[r] * sum_c wx[c] * X[r, c]) and its
//   transpose bin_scatter. for_channel_groups runs them on four vectors at a time (four
//   independent FMA chains). Every layout reduces to these two loops:
// - channels_last forward (forward_channels_last): pixels already are C-vectors; parallel over
//   ROIs in spatial order (roi_schedule.h), so neighbouring boxes share cached lines.
// - NCHW forward, two paths chosen by the work (use_transposed_nchw, NOTE [ transposed NCHW ]
//   in roi_schedule.h, the rule roi_pool shares): forward_nchw_blocked transposes a block of
//   V channels of an image into a pixel-major scratch [H, W, V] (pixel_transpose.h) and runs
//   bin_sum for every ROI of the image on it, parallel over (image, block); forward_nchw_direct,
//   for few ROIs, loops per plane, channel-major so a plane stays in cache for all its ROIs
//   (torchvision goes ROI-major and streams every plane once per ROI).
// - Backward: ROIs overlap, so threads own disjoint parts of grad_input and visit ROIs, bins and
//   taps in one fixed order: no races, no atomics, and the same bits for any thread count.
//   backward_blocked (NCHW, and channels_last in bfloat16/half) accumulates a block of V
//   channels of one image in a float pixel-major scratch with bin_scatter and writes it once,
//   rounded; backward_channels_last_inplace (channels_last float/double) adds straight into a
//   zeroed grad_input, threads owning blocks of V channels (one cache line of fp32: no false
//   sharing), so that every pixel's C values are updated together.
// - Glue: forward / roi_align_backward check arguments (checks.h), allocate outputs in the
//   input's layout and dispatch on dtype; register_kernels puts both ops on the switchable
//   override (override.h, route (a)); _roi_align_mixed, the autocast entry below, is a static
//   registration of the package's own namespace (route (b)).
//
// NOTE [ roi_align under autocast ]
// Like torchvision's kernel, torchvision::roi_align takes rois of the input's dtype only.
// Under bfloat16/float16 autocast torchvision casts the feature map to float32 and the result
// back; our AutocastCPU rule (torchvision_cpu_ext/ops/_rules.py) keeps a reduced feature map
// as it is and casts only the rois to float32 (bfloat16 cannot hold pixel coordinates), then
// calls torchvision_cpu_ext::_roi_align_mixed: this same forward, accepting that one mixed
// pair. A separate op keeps the mixed pair an autocast-only case (outside autocast it raises,
// as torchvision does) while torch.compile can still trace it. Its autograd calls
// _roi_align_backward with the reduced gradient and the float32 rois, so the backward takes
// that pair too.
#include "memory.h"
#include "override.h"
#include "pixel_transpose.h"
#include "checks.h"
#include "roi_geometry.h"
#include "roi_schedule.h"
#include "vec_io.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

namespace tvce {
namespace {

using detail::AxisTaps;
using detail::RoiSampling;

constexpr const char* kOp = "roi_align";

// Calls f(std::integral_constant<int, NV>, c, n_last) over the channel range [c0, c1) in
// groups of NV opmath vectors; n_last is the number of valid lanes in the group's last
// vector. Four vectors per group keep four independent FMA chains in flight.
template <typename scalar_t, typename F>
inline void for_channel_groups(int64_t c0, int64_t c1, const F& f) {
  constexpr int64_t V = OpVec<scalar_t>::size();
  int64_t c = c0;
  for (; c + 4 * V <= c1; c += 4 * V) {
    f(std::integral_constant<int, 4>{}, c, V);
  }
  for (; c < c1; c += V) {
    f(std::integral_constant<int, 1>{}, c, std::min(V, c1 - c));
  }
}

// The sum of bin (ph, pw) of one ROI over NV vectors of channels starting at `px0`, in a
// pixel-major image whose pixels are `pixel_stride` elements apart (see NOTE [ separable bilinear
// sampling ]): sum_r wy[r] * sum_c wx[c] * X[r, c].
template <typename scalar_t, int NV>
inline void bin_sum(
    const scalar_t* px0,
    int64_t W,
    int64_t pixel_stride,
    const RoiSampling<opmath_t<scalar_t>>& s,
    int64_t ph,
    int64_t pw,
    int64_t n_last,
    OpVec<scalar_t> (&acc)[NV]) {
  using Vec = OpVec<scalar_t>;
  using acc_t = opmath_t<scalar_t>;
  constexpr int64_t V = Vec::size();
  for (int v = 0; v < NV; ++v) acc[v] = Vec(acc_t(0));
  for (int64_t ky = s.y.begin(ph); ky < s.y.end(ph); ++ky) {
    const scalar_t* row = px0 + s.y.idx[ky] * W * pixel_stride;
    Vec racc[NV];
    for (int v = 0; v < NV; ++v) racc[v] = Vec(acc_t(0));
    for (int64_t kx = s.x.begin(pw); kx < s.x.end(pw); ++kx) {
      const scalar_t* px = row + s.x.idx[kx] * pixel_stride;
      const Vec wx(s.x.w[kx]);
      for (int v = 0; v < NV; ++v) {
        racc[v] = at::vec::fmadd(wx, load_opmath(px + v * V, v == NV - 1 ? n_last : V), racc[v]);
      }
    }
    const Vec wy(s.y.w[ky]);
    for (int v = 0; v < NV; ++v) acc[v] = at::vec::fmadd(wy, racc[v], acc[v]);
  }
}

// The transpose of bin_sum: adds w * g into every pixel the bin reads.
template <typename scalar_t, int NV>
inline void bin_scatter(
    opmath_t<scalar_t>* px0,
    int64_t W,
    int64_t pixel_stride,
    const RoiSampling<opmath_t<scalar_t>>& s,
    int64_t ph,
    int64_t pw,
    int64_t n_last,
    const OpVec<scalar_t> (&g)[NV]) {
  using Vec = OpVec<scalar_t>;
  constexpr int64_t V = Vec::size();
  for (int64_t ky = s.y.begin(ph); ky < s.y.end(ph); ++ky) {
    auto* row = px0 + s.y.idx[ky] * W * pixel_stride;
    for (int64_t kx = s.x.begin(pw); kx < s.x.end(pw); ++kx) {
      auto* px = row + s.x.idx[kx] * pixel_stride;
      const Vec w(s.y.w[ky] * s.x.w[kx]);
      for (int v = 0; v < NV; ++v) {
        const int64_t n = v == NV - 1 ? n_last : V;
        at::vec::fmadd(w, g[v], Vec::loadu(px + v * V, n)).store(px + v * V, static_cast<int>(n));
      }
    }
  }
}

template <typename scalar_t>
void forward_channels_last(
    const at::Tensor& input,  // [N, C, H, W], channels_last contiguous
    const at::Tensor& rois_acc,
    at::Tensor& output,  // [K, C, PH, PW], channels_last
    double spatial_scale,
    int64_t PH,
    int64_t PW,
    int64_t sampling_ratio,
    bool aligned) {
  using acc_t = opmath_t<scalar_t>;
  using Vec = OpVec<scalar_t>;
  constexpr int64_t V = Vec::size();
  const int64_t N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  const int64_t K = rois_acc.size(0);
  const scalar_t* in = input.const_data_ptr<scalar_t>();
  scalar_t* out = output.data_ptr<scalar_t>();
  const acc_t* r = rois_acc.const_data_ptr<acc_t>();
  const auto order = detail::spatial_order<acc_t>(rois_acc);
  // ~9 pixel reads per bin and channel.
  at::parallel_for(0, K, detail::grain_for(C * PH * PW * 9), [&](int64_t k0, int64_t k1) {
    RoiSampling<acc_t> s;
    for (int64_t i = k0; i < k1; ++i) {
      const int64_t k = order[i];  // neighbouring boxes in turn (detail::spatial_order)
      detail::build_roi_sampling<acc_t>(
          r + 5 * k, N, H, W, static_cast<acc_t>(spatial_scale), PH, PW, sampling_ratio, aligned, s);
      const scalar_t* img = in + s.batch * H * W * C;
      const Vec count(s.count);
      for (int64_t ph = 0; ph < PH; ++ph) {
        for (int64_t pw = 0; pw < PW; ++pw) {
          scalar_t* dst = out + ((k * PH + ph) * PW + pw) * C;
          for_channel_groups<scalar_t>(0, C, [&](auto nv, int64_t c, int64_t n_last) {
            constexpr int NV = decltype(nv)::value;
            Vec acc[NV];
            bin_sum<scalar_t, NV>(img + c, W, C, s, ph, pw, n_last, acc);
            for (int v = 0; v < NV; ++v) {
              store_opmath(dst + c + v * V, acc[v] / count, v == NV - 1 ? n_last : V);
            }
          });
        }
      }
    }
  });
}

// The pixels the bins of all ROIs read, per channel: the work that decides the NCHW path
// (NOTE [ transposed NCHW ] in roi_schedule.h).
template <typename acc_t>
int64_t pixel_reads(const std::vector<RoiSampling<acc_t>>& S, int64_t PH, int64_t PW) {
  int64_t taps = 0;
  for (const auto& s : S) {
    taps += PH * PW * s.y.n * s.x.n;
  }
  return taps;
}

template <typename scalar_t>
void forward_nchw_blocked(
    const at::Tensor& input,  // [N, C, H, W], contiguous
    const std::vector<RoiSampling<opmath_t<scalar_t>>>& S,
    at::Tensor& output,  // [K, C, PH, PW], contiguous
    int64_t PH,
    int64_t PW) {
  using Vec = OpVec<scalar_t>;
  constexpr int64_t V = Vec::size();
  const int64_t N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  const scalar_t* in = input.const_data_ptr<scalar_t>();
  scalar_t* out = output.data_ptr<scalar_t>();
  const auto per_image = detail::rois_per_image(S, N);
  const int64_t blocks = (C + V - 1) / V;
  const int64_t work = (H * W + static_cast<int64_t>(S.size()) / std::max<int64_t>(N, 1) * PH * PW * 9) * V;
  at::parallel_for(0, N * blocks, detail::grain_for(work), [&](int64_t t0, int64_t t1) {
    // Lanes past the last channel stay zero; they are computed and never stored.
    std::vector<scalar_t> pixels(H * W * V, scalar_t(0));
    scalar_t lanes[V];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / blocks, c0 = (t % blocks) * V, nc = std::min(V, C - c0);
      if (per_image[b].empty()) {
        continue;
      }
      detail::planes_to_pixels(in + (b * C + c0) * H * W, H * W, nc, V, pixels.data());
      for (const int64_t k : per_image[b]) {
        const auto& s = S[k];
        const Vec count(s.count);
        scalar_t* dst = out + (k * C + c0) * PH * PW;
        for (int64_t ph = 0; ph < PH; ++ph) {
          for (int64_t pw = 0; pw < PW; ++pw) {
            Vec acc[1];
            bin_sum<scalar_t, 1>(pixels.data(), W, V, s, ph, pw, V, acc);
            store_opmath(lanes, acc[0] / count, V);
            for (int64_t c = 0; c < nc; ++c) {
              dst[c * PH * PW + ph * PW + pw] = lanes[c];
            }
          }
        }
      }
    }
  });
}

template <typename scalar_t>
void forward_nchw_direct(
    const at::Tensor& input,  // [N, C, H, W], contiguous
    const std::vector<RoiSampling<opmath_t<scalar_t>>>& S,
    at::Tensor& output,  // [K, C, PH, PW], contiguous
    int64_t PH,
    int64_t PW) {
  using acc_t = opmath_t<scalar_t>;
  const int64_t C = input.size(1), H = input.size(2), W = input.size(3);
  const int64_t K = static_cast<int64_t>(S.size());
  const scalar_t* in = input.const_data_ptr<scalar_t>();
  scalar_t* out = output.data_ptr<scalar_t>();
  // Channel-major over (channel, ROI), so a plane stays in cache for all its ROIs.
  at::parallel_for(0, C * K, detail::grain_for(PH * PW * 9), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t c = i / K, k = i % K;
      const RoiSampling<acc_t>& s = S[k];
      const scalar_t* plane = in + (s.batch * C + c) * H * W;
      scalar_t* dst = out + (k * C + c) * PH * PW;
      for (int64_t ph = 0; ph < PH; ++ph) {
        for (int64_t pw = 0; pw < PW; ++pw) {
          acc_t acc = 0;
          for (int64_t ky = s.y.begin(ph); ky < s.y.end(ph); ++ky) {
            const scalar_t* row = plane + s.y.idx[ky] * W;
            acc_t racc = 0;
            for (int64_t kx = s.x.begin(pw); kx < s.x.end(pw); ++kx) {
              racc += s.x.w[kx] * static_cast<acc_t>(row[s.x.idx[kx]]);
            }
            acc += s.y.w[ky] * racc;
          }
          dst[ph * PW + pw] = static_cast<scalar_t>(acc / s.count);
        }
      }
    }
  });
}

// channels_last backward when grad_input can accumulate in place (float/double): threads own
// blocks of V channels of every image and add each ROI's bins into grad_input directly.
// Writing a pixel-major block scratch back (backward_blocked) would touch every 64-byte line
// of grad_input once per channel block; here each pixel's C values are updated together.
template <typename scalar_t>
void backward_channels_last_inplace(
    const at::Tensor& grad,  // [K, C, PH, PW], channels_last contiguous
    const std::vector<RoiSampling<scalar_t>>& S,
    at::Tensor& grad_in,  // [N, C, H, W], channels_last, zeroed
    int64_t PH,
    int64_t PW) {
  using Vec = OpVec<scalar_t>;
  constexpr int64_t V = Vec::size();
  const int64_t C = grad_in.size(1), H = grad_in.size(2), W = grad_in.size(3);
  const scalar_t* g = grad.const_data_ptr<scalar_t>();
  scalar_t* gi = grad_in.data_ptr<scalar_t>();
  const int64_t blocks = (C + V - 1) / V;
  const int64_t work = static_cast<int64_t>(S.size()) * PH * PW * 9 * V;
  at::parallel_for(0, blocks, detail::grain_for(work), [&](int64_t b0, int64_t b1) {
    const int64_t c_end = std::min(C, b1 * V);
    for (int64_t k = 0; k < static_cast<int64_t>(S.size()); ++k) {
      const auto& s = S[k];
      scalar_t* img = gi + s.batch * H * W * C;
      const Vec count(s.count);
      for (int64_t ph = 0; ph < PH; ++ph) {
        for (int64_t pw = 0; pw < PW; ++pw) {
          const scalar_t* src = g + ((k * PH + ph) * PW + pw) * C;
          for_channel_groups<scalar_t>(b0 * V, c_end, [&](auto nv, int64_t c, int64_t n_last) {
            constexpr int NV = decltype(nv)::value;
            Vec gv[NV];
            for (int v = 0; v < NV; ++v) {
              gv[v] = Vec::loadu(src + c + v * V, v == NV - 1 ? n_last : V) / count;
            }
            bin_scatter<scalar_t, NV>(img + c, W, C, s, ph, pw, n_last, gv);
          });
        }
      }
    }
  });
}

// Backward, NCHW (and channels_last in bfloat16/half): a thread owns (image, block of V channels) pairs. It accumulates
// every bin of every ROI of that image, in ROI order, into a float pixel-major scratch
// [H, W, V], then writes the block of grad_input once (rounded to its dtype). So grad_input
// is written exactly once (no zero fill, no float copy of it for bfloat16/half), there are
// no races and no atomics, and the sums do not depend on the thread count.
template <typename scalar_t>
void backward_blocked(
    const at::Tensor& grad,  // [K, C, PH, PW], contiguous in `fmt`
    const std::vector<RoiSampling<opmath_t<scalar_t>>>& S,
    at::Tensor& grad_in,  // [N, C, H, W], `fmt`, uninitialized
    int64_t PH,
    int64_t PW,
    at::MemoryFormat fmt) {
  using acc_t = opmath_t<scalar_t>;
  using Vec = OpVec<scalar_t>;
  constexpr int64_t V = Vec::size();
  const int64_t N = grad_in.size(0), C = grad_in.size(1), H = grad_in.size(2), W = grad_in.size(3);
  const int64_t HW = H * W;
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  const scalar_t* g = grad.const_data_ptr<scalar_t>();
  scalar_t* gi = grad_in.data_ptr<scalar_t>();
  const auto per_image = detail::rois_per_image(S, N);
  const int64_t blocks = (C + V - 1) / V;
  const int64_t work = (HW + static_cast<int64_t>(S.size()) / std::max<int64_t>(N, 1) * PH * PW * 9) * V;
  at::parallel_for(0, N * blocks, detail::grain_for(work), [&](int64_t t0, int64_t t1) {
    std::vector<acc_t> pixels(HW * V);
    acc_t lanes[V];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / blocks, c0 = (t % blocks) * V, nc = std::min(V, C - c0);
      std::fill(pixels.begin(), pixels.end(), acc_t(0));
      for (const int64_t k : per_image[b]) {
        const auto& s = S[k];
        const Vec count(s.count);
        for (int64_t ph = 0; ph < PH; ++ph) {
          for (int64_t pw = 0; pw < PW; ++pw) {
            Vec gv[1];
            if (cl) {
              gv[0] = load_opmath(g + ((k * PH + ph) * PW + pw) * C + c0, nc);
            } else {
              const scalar_t* src = g + ((k * C + c0) * PH + ph) * PW + pw;
              for (int64_t c = 0; c < V; ++c) {
                lanes[c] = c < nc ? static_cast<acc_t>(src[c * PH * PW]) : acc_t(0);
              }
              gv[0] = Vec::loadu(lanes);
            }
            gv[0] = gv[0] / count;
            bin_scatter<scalar_t, 1>(pixels.data(), W, V, s, ph, pw, V, gv);
          }
        }
      }
      if (cl) {
        scalar_t* dst = gi + b * HW * C + c0;
        for (int64_t p = 0; p < HW; ++p) {
          store_opmath(dst + p * C, Vec::loadu(pixels.data() + p * V), nc);
        }
      } else {
        detail::pixels_to_planes(pixels.data(), HW, nc, V, gi + (b * C + c0) * HW);
      }
    }
  });
}

template <typename scalar_t>
void backward_kernel(
    const at::Tensor& grad,
    const std::vector<RoiSampling<opmath_t<scalar_t>>>& S,
    at::Tensor& grad_in,
    int64_t PH,
    int64_t PW,
    at::MemoryFormat fmt) {
  if constexpr (std::is_same_v<scalar_t, opmath_t<scalar_t>>) {
    if (fmt == at::MemoryFormat::ChannelsLast) {
      grad_in.zero_();
      backward_channels_last_inplace<scalar_t>(grad, S, grad_in, PH, PW);
      return;
    }
  }
  backward_blocked<scalar_t>(grad, S, grad_in, PH, PW, fmt);
}

at::Tensor forward(
    const char* op,
    bool float_rois_ok,
    const at::Tensor& input,
    const at::Tensor& rois,
    double spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t sampling_ratio,
    bool aligned) {
  detail::check_roi_inputs(op, input, rois, float_rois_ok);
  detail::check_pooled_size(op, pooled_height, pooled_width);
  const auto fmt = detail::layout_of(op, input);
  const int64_t K = rois.size(0), C = input.size(1);
  at::Tensor output = empty_output({K, C, pooled_height, pooled_width}, input.options(), fmt);
  if (output.numel() == 0) {
    return output;
  }
  const at::Tensor in = input.contiguous(fmt);
  const at::Tensor r = detail::rois_as(rois, at::toOpMathType(input.scalar_type()));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "roi_align_forward", [&] {
    using acc_t = opmath_t<scalar_t>;
    if (fmt == at::MemoryFormat::ChannelsLast) {
      forward_channels_last<scalar_t>(in, r, output, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned);
      return;
    }
    const auto S = detail::build_all_roi_sampling<acc_t>(
        r, in.size(0), in.size(2), in.size(3), spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned);
    if (detail::use_transposed_nchw(pixel_reads(S, pooled_height, pooled_width), in.size(0), in.size(2), in.size(3))) {
      forward_nchw_blocked<scalar_t>(in, S, output, pooled_height, pooled_width);
    } else {
      forward_nchw_direct<scalar_t>(in, S, output, pooled_height, pooled_width);
    }
  });
  return output;
}

at::Tensor roi_align_forward(
    const at::Tensor& input,
    const at::Tensor& rois,
    double spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t sampling_ratio,
    bool aligned) {
  return forward(kOp, false, input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned);
}

// See NOTE [ roi_align under autocast ].
at::Tensor roi_align_mixed_forward(
    const at::Tensor& input,
    const at::Tensor& rois,
    double spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t sampling_ratio,
    bool aligned) {
  return forward(
      "_roi_align_mixed", true, input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned);
}

at::Tensor roi_align_backward(
    const at::Tensor& grad,
    const at::Tensor& rois,
    double spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t batch_size,
    int64_t channels,
    int64_t height,
    int64_t width,
    int64_t sampling_ratio,
    bool aligned) {
  constexpr const char* op = "_roi_align_backward";
  detail::check_roi_inputs(op, grad, rois, /*float_rois_ok=*/true);  // NOTE [ roi_align under autocast ]
  detail::check_pooled_size(op, pooled_height, pooled_width);
  detail::check_input_shape(op, batch_size, channels, height, width);
  detail::check_grad_shape(op, grad, rois.size(0), channels, pooled_height, pooled_width);
  // The forward returns channels_last output for channels_last input, so the gradient's
  // layout tells which layout the input had.
  const auto fmt = detail::layout_of(op, grad);
  at::Tensor grad_in = empty_output({batch_size, channels, height, width}, grad.options(), fmt);
  if (grad_in.numel() == 0) {
    return grad_in;
  }
  if (grad.numel() == 0) {
    return grad_in.zero_();
  }
  const at::Tensor g = grad.contiguous(fmt);
  const at::Tensor r = detail::rois_as(rois, at::toOpMathType(grad.scalar_type()));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "roi_align_backward", [&] {
    const auto S = detail::build_all_roi_sampling<opmath_t<scalar_t>>(
        r, batch_size, height, width, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned,
        /*count_at_least_one=*/true, op);
    backward_kernel<scalar_t>(g, S, grad_in, pooled_height, pooled_width, fmt);
  });
  return grad_in;
}

void register_kernels(torch::Library& m) {
  m.impl("roi_align", TORCH_FN(roi_align_forward));
  m.impl("_roi_align_backward", TORCH_FN(roi_align_backward));
}

const CpuOverride registrar({"roi_align", "_roi_align_backward"}, &register_kernels);

} // namespace
} // namespace tvce

TORCH_LIBRARY_FRAGMENT(torchvision_cpu_ext, m) {
  m.def(
      "_roi_align_mixed(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
      "SymInt pooled_width, int sampling_ratio, bool aligned) -> Tensor");
}

TORCH_LIBRARY_IMPL(torchvision_cpu_ext, CPU, m) {
  m.impl("_roi_align_mixed", TORCH_FN(tvce::roi_align_mixed_forward));
}
