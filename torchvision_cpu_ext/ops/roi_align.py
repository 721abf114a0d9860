"""Python-side registrations of roi_align: fake (Meta) kernels and the AutocastCPU rule.

The C++ kernels are in csrc/cpu/roi_align_kernel.cpp. Unlike torchvision's fake kernels, these
accept fp32 rois with a bf16/fp16 input (the autocast rule's case) and report outputs in the
input's memory format, as the CPU kernels return them.
"""

from __future__ import annotations

import torch

from ._common import autocast_rule, check_roi_inputs, empty_like_layout, grad_input_like


def meta_roi_align(
    input: torch.Tensor,
    rois: torch.Tensor,
    spatial_scale: float,
    pooled_height: int,
    pooled_width: int,
    sampling_ratio: int,
    aligned: bool,
) -> torch.Tensor:
    check_roi_inputs("roi_align", input, rois)
    return empty_like_layout(input, (rois.size(0), input.size(1), pooled_height, pooled_width))


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
    return grad_input_like("_roi_align_backward", grad, rois, batch_size, channels, height, width)


def register(lib: torch.library.Library) -> None:
    lib.impl("roi_align", meta_roi_align, "Meta")
    lib.impl("_roi_align_backward", meta_roi_align_backward, "Meta")
    lib.impl("roi_align", autocast_rule("roi_align"), "AutocastCPU")
