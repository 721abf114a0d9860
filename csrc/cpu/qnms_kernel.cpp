// qnms for CPU: torchvision's nms of quantized boxes, on the integer representations
// (torchvision.ops.nms passes boxes.int_repr() and scores.int_repr(), no scale or zero point).
//
// NOTE [ qnms ]
// torchvision compares integer coordinates converted to float: the scale cancels in the IoU
// and the zero point in every difference, so the kept boxes are those of nms on the float
// values of the integers. Its order is a stable descending sort of the integer scores (ties
// by index), and quantized scores tie often, where another tie order keeps other boxes. So
// the boxes are put in that order first (the same stable at::sort, exact for every integer
// type, where scores converted to float could tie above 2^24), nms runs on them with strictly
// decreasing stand-in scores (its order is then the identity), and the kept positions are
// mapped back through the order. Coordinates up to 2^24 (every 8- and
// 16-bit type) are exact in float, and so are the areas torchvision computes in integers
// (wider coordinates are rounded to float by torchvision too, its areas may differ in the last
// bits from ours).
#include "override.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

namespace tvce {
namespace {

at::Tensor qnms(const at::Tensor& dets, const at::Tensor& scores, double iou_threshold) {
  TORCH_CHECK(
      dets.device().is_cpu() && scores.device().is_cpu(), "qnms: dets and scores must be CPU tensors, got ",
      dets.device(), " and ", scores.device());
  TORCH_CHECK(dets.dim() == 2 && dets.size(1) == 4, "qnms: dets must have shape [N, 4], got ", dets.sizes());
  TORCH_CHECK(scores.dim() == 1, "qnms: scores must have shape [N], got ", scores.sizes());
  TORCH_CHECK(
      dets.size(0) == scores.size(0), "qnms: dets and scores must have the same length, got ", dets.size(0), " and ",
      scores.size(0));
  TORCH_CHECK(
      dets.scalar_type() == scores.scalar_type(), "qnms: dets and scores must have the same dtype, got ",
      dets.scalar_type(), " and ", scores.scalar_type());
  TORCH_CHECK(
      at::isIntegralType(dets.scalar_type(), /*includeBool=*/false),
      "qnms: dets must hold integer representations (a quantized tensor's int_repr()), got ", dets.scalar_type());
  const int64_t n = dets.size(0);
  TORCH_CHECK(n <= (int64_t{1} << 24), "qnms: at most 2^24 boxes, got ", n);
  if (n == 0) {
    return at::empty({0}, dets.options().dtype(at::kLong));
  }
  const at::Tensor order = std::get<1>(scores.sort(/*stable=*/true, 0, /*descending=*/true));
  const at::Tensor boxes = dets.index_select(0, order).to(at::kFloat);
  // n, n - 1, ..., 1: distinct in float up to 2^24.
  const at::Tensor ranks = at::arange(n, 0, -1, dets.options().dtype(at::kFloat));
  static const auto nms = c10::Dispatcher::singleton()
                              .findSchemaOrThrow("torchvision::nms", "")
                              .typed<at::Tensor(const at::Tensor&, const at::Tensor&, double)>();
  return order.index_select(0, nms.call(boxes, ranks, iou_threshold));
}

void register_kernels(torch::Library& m) {
  m.impl("qnms", TORCH_FN(qnms));
}

const CpuOverride registrar({"qnms"}, &register_kernels);

} // namespace
} // namespace tvce
