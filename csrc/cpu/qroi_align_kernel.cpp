// qroi_align for CPU: torchvision's roi_align of a quantized map, on integer representations
// (torchvision.ops.roi_align passes input.int_repr(), rois.int_repr() and both tensors' scale
// and zero point, and wraps the result with the input's scale and zero point).
//
// NOTE [ qroi_align ]
// torchvision averages the raw integers with the bilinear weights, then dequantizes the mean
// (scale * (sum - zero_point * sum_of_weights) / count; samples outside the map weigh 0, i.e.
// count as the zero point) and requantizes it: zero_point + nearbyint(value * (1 / scale)),
// clamped to the integer type. Here the map minus its zero point (exact small integers in
// float) goes through roi_align (ours, through the dispatcher), is scaled, and is requantized
// by the same expression. The means are the same sums in another order, so a value can land
// on the other side of a rounding midpoint: results are torchvision's or one step away.
// torchvision reads every RoI from image 0 and takes batch size 1 only (a quantized batch
// index is not always representable), so the same restriction holds here.
#include "override.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <limits>

namespace tvce {
namespace {

at::Tensor qroi_align(
    const at::Tensor& input, const at::Tensor& rois, double input_scale, int64_t input_zero_point, double rois_scale,
    int64_t rois_zero_point, double spatial_scale, int64_t pooled_height, int64_t pooled_width,
    int64_t sampling_ratio, bool aligned) {
  TORCH_CHECK(
      input.device().is_cpu() && rois.device().is_cpu(), "qroi_align: input and rois must be CPU tensors, got ",
      input.device(), " and ", rois.device());
  TORCH_CHECK(input.dim() == 4, "qroi_align: input must be a 4-D tensor [1, C, H, W], got ", input.sizes());
  TORCH_CHECK(rois.dim() == 2 && rois.size(1) == 5, "qroi_align: rois must have shape [K, 5], got ", rois.sizes());
  TORCH_CHECK(
      input.scalar_type() == rois.scalar_type(), "qroi_align: input and rois must have the same dtype, got ",
      input.scalar_type(), " and ", rois.scalar_type());
  TORCH_CHECK(
      at::isIntegralType(input.scalar_type(), /*includeBool=*/false),
      "qroi_align: input must hold integer representations (a quantized tensor's int_repr()), got ",
      input.scalar_type());
  TORCH_CHECK(input.size(0) == 1, "qroi_align: input must hold one image (batch size 1), got ", input.size(0));
  TORCH_CHECK(input_scale > 0, "qroi_align: input_scale must be positive, got ", input_scale);
  const int64_t ph = pooled_height, pw = pooled_width;
  if (rois.size(0) == 0 || input.size(1) == 0 || ph * pw == 0) {
    return at::empty({rois.size(0), input.size(1), ph, pw}, input.options());
  }
  at::Tensor boxes = (rois.to(at::kFloat) - static_cast<float>(rois_zero_point)) * static_cast<float>(rois_scale);
  boxes.select(1, 0).zero_();
  const at::Tensor centred = input.to(at::kFloat) - static_cast<float>(input_zero_point);
  static const auto roi_align =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("torchvision::roi_align", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, double, c10::SymInt, c10::SymInt, int64_t, bool)>();
  const at::Tensor mean = roi_align.call(centred, boxes, spatial_scale, ph, pw, sampling_ratio, aligned);
  const float scale = static_cast<float>(input_scale);
  const at::Tensor value = mean * scale;
  // round_ is round-half-to-even, as nearbyint in the default rounding mode; the zero point is
  // added in int64 as torchvision adds it (float would round it for 32-bit types).
  at::Tensor q = (value * (1.0f / scale)).round_().to(at::kLong).add_(input_zero_point);
  AT_DISPATCH_INTEGRAL_TYPES(input.scalar_type(), "qroi_align", [&] {
    q.clamp_(static_cast<int64_t>(std::numeric_limits<scalar_t>::min()),
             static_cast<int64_t>(std::numeric_limits<scalar_t>::max()));
  });
  return q.to(input.scalar_type()).contiguous();
}

void register_kernels(torch::Library& m) {
  m.impl("qroi_align", TORCH_FN(qroi_align));
}

const CpuOverride registrar({"qroi_align"}, &register_kernels);

} // namespace
} // namespace tvce
