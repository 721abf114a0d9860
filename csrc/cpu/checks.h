#pragma once
// Argument checks and output allocation shared by the kernels: every message names the op and
// the argument; outputs and gradients are allocated in the layout the kernel runs in, large
// ones from the output pool (memory.h).
#include "memory.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <cstdint>

namespace tvce {
namespace detail {

// The layout a kernel runs in: the tensor's suggested memory format, of the two supported.
inline at::MemoryFormat layout_of(const char* op, const at::Tensor& t) {
  const auto fmt = t.suggest_memory_format();
  TORCH_CHECK(
      fmt == at::MemoryFormat::Contiguous || fmt == at::MemoryFormat::ChannelsLast, op, ": unsupported memory format ",
      fmt, "; expected Contiguous or ChannelsLast");
  return fmt;
}

// Argument checks shared by the RoI ops: every message names the argument. rois must have the
// input's dtype, as torchvision's kernels require; `float_rois_ok` also takes float32 rois with a
// bfloat16/float16 input, which only roi_align's autocast path passes (NOTE [ roi_align under
// autocast ] in roi_align_kernel.cpp) and its backward then receives.
inline void check_roi_inputs(
    const char* op, const at::Tensor& input, const at::Tensor& rois, bool float_rois_ok = false) {
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
  const bool mixed_ok = float_rois_ok && (dt == at::kBFloat16 || dt == at::kHalf);
  TORCH_CHECK(
      rois.scalar_type() == dt || (mixed_ok && rois.scalar_type() == at::kFloat), op,
      ": rois must have the dtype of input", mixed_ok ? " or float32" : "", ", got input ", dt,
      " and rois ", rois.scalar_type());
}

// The channel_mapping a position-sensitive forward returned: int32, grad's shape, and the
// canonical map (output channel c of bin (ph, pw) read input channel (c * PH + ph) * PW + pw).
// The backward kernels partition work by input channel, which is only race-free for this map.
inline void check_channel_mapping(const char* op, const at::Tensor& m, const at::Tensor& grad, int64_t PH, int64_t PW) {
  TORCH_CHECK(
      m.scalar_type() == at::kInt && m.sizes() == grad.sizes() && m.device().is_cpu(), op,
      ": channel_mapping must be the int32 CPU tensor the forward returned, of grad's shape ", grad.sizes(),
      ", got ", m.scalar_type(), " ", m.sizes());
  if (m.numel() == 0) {
    return;
  }
  const at::Tensor expected = at::arange(m.size(1) * PH * PW, m.options()).view({1, m.size(1), PH, PW});
  TORCH_CHECK(
      m.eq(expected).all().item<bool>(), op,
      ": channel_mapping must map output channel c of bin (ph, pw) to input channel "
      "(c * pooled_height + ph) * pooled_width + pw, as the forward returned it");
}

// Output channels of a position-sensitive op: input channels / (PH * PW), exactly.
inline int64_t ps_channels_out(const char* op, int64_t channels, int64_t PH, int64_t PW) {
  TORCH_CHECK(
      PH > 0 && PW > 0 && channels % (PH * PW) == 0, op, ": input channels (", channels,
      ") must be a multiple of pooled_height * pooled_width (", PH, " * ", PW, ")");
  return channels / (PH * PW);
}

// The input shape a backward op is given, checked.
inline void check_input_shape(const char* op, int64_t batch_size, int64_t channels, int64_t height, int64_t width) {
  TORCH_CHECK(
      batch_size >= 0 && channels >= 0 && height >= 0 && width >= 0, op,
      ": input shape (batch_size, channels, height, width) must be non-negative, got (", batch_size, ", ", channels,
      ", ", height, ", ", width, ")");
}

// grad must be [K, output channels, pooled_height, pooled_width], the forward's output shape.
inline void check_grad_shape(const char* op, const at::Tensor& grad, int64_t K, int64_t channels, int64_t PH, int64_t PW) {
  TORCH_CHECK(
      grad.dim() == 4 && grad.size(0) == K && grad.size(1) == channels && grad.size(2) == PH && grad.size(3) == PW, op,
      ": grad must have shape [", K, ", ", channels, ", ", PH, ", ", PW,
      "] (rois, output channels, pooled_height, pooled_width), got ", grad.sizes());
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

// A zeroed grad_input accumulator in the opmath type and `fmt` (from the output pool when large).
inline at::Tensor zeroed_grad_input(const at::Tensor& grad, int64_t N, int64_t C, int64_t H, int64_t W, at::MemoryFormat fmt) {
  at::Tensor g = empty_output({N, C, H, W}, grad.options().dtype(at::toOpMathType(grad.scalar_type())), fmt);
  return g.zero_();
}

// grad_input of a backward whose threads own and write every element once
// (OwnedGradAccumulator and by_bands in roi_schedule.h): uninitialised, in grad's dtype and `fmt`.
inline at::Tensor owned_grad_input(const at::Tensor& grad, int64_t N, int64_t C, int64_t H, int64_t W, at::MemoryFormat fmt) {
  return empty_output({N, C, H, W}, grad.options(), fmt);
}

} // namespace detail
} // namespace tvce
