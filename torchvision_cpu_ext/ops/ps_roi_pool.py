"""Python-side registrations of ps_roi_pool: fake (Meta) kernels and the AutocastCPU rule.

The C++ kernels are in csrc/cpu/ps_roi_pool_kernel.cpp; outputs (and channel_mapping) come in
the input's memory format.
"""

from __future__ import annotations

import torch

from ._common import autocast_rule, check_roi_dtypes, check_roi_inputs, empty_like_layout, ps_channels_out


def meta_ps_roi_pool(
    input: torch.Tensor, rois: torch.Tensor, spatial_scale: float, pooled_height: int, pooled_width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    check_roi_inputs("ps_roi_pool", input, rois)
    c_out = ps_channels_out("ps_roi_pool", input.size(1), pooled_height, pooled_width)
    shape = (rois.size(0), c_out, pooled_height, pooled_width)
    return empty_like_layout(input, shape), empty_like_layout(input, shape, torch.int32)


def meta_ps_roi_pool_backward(
    grad: torch.Tensor,
    rois: torch.Tensor,
    channel_mapping: torch.Tensor,
    spatial_scale: float,
    pooled_height: int,
    pooled_width: int,
    batch_size: int,
    channels: int,
    height: int,
    width: int,
) -> torch.Tensor:
    check_roi_dtypes("_ps_roi_pool_backward", grad, rois)
    return empty_like_layout(grad, (batch_size, channels, height, width))


def register(lib: torch.library.Library) -> None:
    lib.impl("ps_roi_pool", meta_ps_roi_pool, "Meta")
    lib.impl("_ps_roi_pool_backward", meta_ps_roi_pool_backward, "Meta")
    lib.impl("ps_roi_pool", autocast_rule("ps_roi_pool"), "AutocastCPU")
