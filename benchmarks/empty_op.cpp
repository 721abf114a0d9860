// The benchmark's empty depthwise convolutions (bench_ops.py, depthwise_conv): ops with the
// schemas of torchvision_cpu_ext::depthwise_conv1d / depthwise_conv2d whose CPU kernel only
// allocates the output (the shape and memory format the real op returns) and returns it. A call
// costs what every call of the real op must pay before any arithmetic: the Python binding
// parsing the arguments by the schema, the dispatch, and the output's allocation. A C++ kernel,
// not a Python one registered through torch.library: calling back into Python costs several
// microseconds itself, more than the small-call path's whole budget. Built on demand by
// bench_ops.py (torch.utils.cpp_extension's cache); not part of the package.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <vector>

namespace {

at::Tensor empty_depthwise_conv(
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    at::IntArrayRef stride,
    at::IntArrayRef padding,
    at::IntArrayRef dilation) {
  const int64_t dims = input.dim() - 2;
  TORCH_CHECK(dims >= 1 && weight.dim() == dims + 2, "input: [N, C, *spatial], weight: [C_out, 1, *kernel]");
  TORCH_CHECK(
      static_cast<int64_t>(stride.size()) == dims && static_cast<int64_t>(padding.size()) == dims &&
          static_cast<int64_t>(dilation.size()) == dims,
      "stride, padding and dilation: one value per spatial dimension");
  std::vector<int64_t> sizes{input.size(0), weight.size(0)};
  for (int64_t d = 0; d < dims; ++d) {
    const int64_t span = dilation[d] * (weight.size(d + 2) - 1) + 1;
    sizes.push_back((input.size(d + 2) + 2 * padding[d] - span) / stride[d] + 1);
  }
  return at::empty(sizes, input.options().memory_format(input.suggest_memory_format()));
}

} // namespace

TORCH_LIBRARY(tvce_bench_empty, m) {
  m.def(
      "depthwise_conv1d(Tensor input, Tensor weight, Tensor? bias, int[1] stride, int[1] padding, "
      "int[1] dilation) -> Tensor");
  m.def(
      "depthwise_conv2d(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, "
      "int[2] dilation) -> Tensor");
}

TORCH_LIBRARY_IMPL(tvce_bench_empty, CPU, m) {
  m.impl("depthwise_conv1d", &empty_depthwise_conv);
  m.impl("depthwise_conv2d", &empty_depthwise_conv);
}
