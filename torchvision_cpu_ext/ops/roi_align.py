"""Python-side registrations of roi_align: fake (Meta) kernels and the AutocastCPU rule.

The C++ kernels are in csrc/cpu/roi_align_kernel.cpp. Unlike torchvision's fake kernels, these
report outputs in the input's memory format, as the CPU kernels return them.

Under bfloat16/float16 autocast, torchvision casts the feature map to float32 and the result
back; ours keeps a reduced feature map as it is and casts only the rois to float32, through
torchvision_cpu_ext::_roi_align_mixed (NOTE [ roi_align under autocast ] in the kernel file):
the same output dtype, computed in the reduced type with float32 accumulation. Every other
combination is torchvision's rule exactly, errors included.
"""

from __future__ import annotations

import torch

from ._common import (
    _REDUCED,
    AUTOCAST_CPU_KEYS,
    autocast_cast,
    check_roi_inputs,
    empty_like_layout,
    grad_input_like,
)

_state: dict[str, object] = {"own_registered": False}


def _meta_forward(op: str, float_rois_ok: bool):
    def meta(
        input: torch.Tensor,
        rois: torch.Tensor,
        spatial_scale: float,
        pooled_height: int,
        pooled_width: int,
        sampling_ratio: int,
        aligned: bool,
    ) -> torch.Tensor:
        check_roi_inputs(op, input, rois, float_rois_ok)
        return empty_like_layout(input, (rois.size(0), input.size(1), pooled_height, pooled_width))

    meta.__name__ = f"meta_{op.lstrip('_')}"
    return meta


# torchvision::roi_align (rois of the input's dtype) and the autocast path's mixed op.
meta_roi_align = _meta_forward("roi_align", float_rois_ok=False)
meta_roi_align_mixed = _meta_forward("_roi_align_mixed", float_rois_ok=True)


def meta_roi_align_backward(
    grad: torch.Tensor,
    rois: torch.Tensor,
    spatial_scale: float,
    pooled_height: int,
    pooled_width: int,
    batch_size: int,
    channels: int,
    height: int,
    width: int,
    sampling_ratio: int,
    aligned: bool,
) -> torch.Tensor:
    return grad_input_like("_roi_align_backward", grad, rois, batch_size, channels, height, width, float_rois_ok=True)


def autocast_roi_align(
    input: torch.Tensor,
    rois: torch.Tensor,
    spatial_scale: float,
    pooled_height: int,
    pooled_width: int,
    sampling_ratio: int,
    aligned: bool,
) -> torch.Tensor:
    args = (spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned)
    with torch._C._ExcludeDispatchKeyGuard(AUTOCAST_CPU_KEYS):
        rois = autocast_cast(rois)
        if input.dtype in _REDUCED:
            return torch.ops.torchvision_cpu_ext._roi_align_mixed(input, rois, *args)
        # float32 / float64 (or a dtype the kernel rejects): torchvision's rule, which casts
        # nothing else here and returns the input's dtype.
        return torch.ops.torchvision.roi_align(autocast_cast(input), rois, *args).to(input.dtype)


def _setup_context(ctx, inputs, output) -> None:
    input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned = inputs
    ctx.save_for_backward(rois)
    ctx.input_shape = input.shape
    ctx.args = (spatial_scale, pooled_height, pooled_width)
    ctx.sampling = (sampling_ratio, aligned)


def _backward(ctx, grad: torch.Tensor):
    (rois,) = ctx.saved_tensors
    grad_input = torch.ops.torchvision._roi_align_backward(grad, rois, *ctx.args, *ctx.input_shape, *ctx.sampling)
    return grad_input, None, None, None, None, None, None


def register(lib: torch.library.Library) -> None:
    lib.impl("roi_align", meta_roi_align, "Meta")
    lib.impl("_roi_align_backward", meta_roi_align_backward, "Meta")
    lib.impl("roi_align", autocast_roi_align, "AutocastCPU")
    if not _state["own_registered"]:  # our own op: registered once, kept across disable()
        torch.library.register_fake("torchvision_cpu_ext::_roi_align_mixed", meta_roi_align_mixed)
        torch.library.register_autograd(
            "torchvision_cpu_ext::_roi_align_mixed", _backward, setup_context=_setup_context
        )
        _state["own_registered"] = True
