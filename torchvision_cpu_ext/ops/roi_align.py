"""roi_align's Python side: the autograd of `torchvision_cpu_ext::_roi_align_mixed`.

Under bfloat16/float16 autocast, torchvision casts the feature map to float32 and the result
back; ours keeps a reduced feature map as it is and casts only the rois to float32, through
`_roi_align_mixed` (its AutocastCPU rule and fake kernel are in ops/_rules.py; the kernel and
NOTE [ roi_align under autocast ] in csrc/cpu/roi_align_kernel.cpp): the same output dtype,
computed in the reduced type with float32 accumulation. Every other combination is
torchvision's rule exactly, errors included. torchvision's own autograd serves roi_align.
"""

from __future__ import annotations

import torch

_state: dict[str, bool] = {"registered": False}


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


def register() -> None:
    if not _state["registered"]:  # our own op: registered once, kept across disable()
        torch.library.register_autograd(
            "torchvision_cpu_ext::_roi_align_mixed", _backward, setup_context=_setup_context
        )
        _state["registered"] = True


def unregister() -> None:
    pass


def owners() -> dict[str, str]:
    return {}
