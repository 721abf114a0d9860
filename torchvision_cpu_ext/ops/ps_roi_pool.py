"""Python-side registrations of ps_roi_pool: fake (Meta) kernels.

The C++ kernels are in csrc/cpu/ps_roi_pool_kernel.cpp; outputs (and channel_mapping) come in
the input's memory format.

torchvision registers no CPU autocast rule for ps_roi_pool, and neither do we: under autocast it runs
as outside it (rois of the input's dtype, or torchvision's error).
"""

from __future__ import annotations

import torch

from ._common import grad_input_like, pooled_with_indices, ps_channels_out


def meta_ps_roi_pool(
    input: torch.Tensor, rois: torch.Tensor, spatial_scale: float, pooled_height: int, pooled_width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    c_out = ps_channels_out("ps_roi_pool", input.size(1), pooled_height, pooled_width)
    return pooled_with_indices("ps_roi_pool", input, rois, c_out, pooled_height, pooled_width)


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
    return grad_input_like("_ps_roi_pool_backward", grad, rois, batch_size, channels, height, width)


def register(lib: torch.library.Library) -> None:
    lib.impl("ps_roi_pool", meta_ps_roi_pool, "Meta")
    lib.impl("_ps_roi_pool_backward", meta_ps_roi_pool_backward, "Meta")
