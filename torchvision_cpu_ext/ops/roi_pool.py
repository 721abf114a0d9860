"""Python-side registrations of roi_pool: fake (Meta) kernels and the AutocastCPU rule.

The C++ kernels are in csrc/cpu/roi_pool_kernel.cpp; outputs (and argmax) come in the input's
memory format.
"""

from __future__ import annotations

import torch

from ._common import autocast_rule, check_roi_dtypes, check_roi_inputs, empty_like_layout


def meta_roi_pool(
    input: torch.Tensor, rois: torch.Tensor, spatial_scale: float, pooled_height: int, pooled_width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    check_roi_inputs("roi_pool", input, rois)
    shape = (rois.size(0), input.size(1), pooled_height, pooled_width)
    return empty_like_layout(input, shape), empty_like_layout(input, shape, torch.int32)


def meta_roi_pool_backward(
    grad: torch.Tensor,
    rois: torch.Tensor,
    argmax: torch.Tensor,
    spatial_scale: float,
    pooled_height: int,
    pooled_width: int,
    batch_size: int,
    channels: int,
    height: int,
    width: int,
) -> torch.Tensor:
    check_roi_dtypes("_roi_pool_backward", grad, rois)
    return empty_like_layout(grad, (batch_size, channels, height, width))


def register(lib: torch.library.Library) -> None:
    lib.impl("roi_pool", meta_roi_pool, "Meta")
    lib.impl("_roi_pool_backward", meta_roi_pool_backward, "Meta")
    lib.impl("roi_pool", autocast_rule("roi_pool"), "AutocastCPU")
