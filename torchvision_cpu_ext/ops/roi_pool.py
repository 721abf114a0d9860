"""Python-side registrations of roi_pool: fake (Meta) kernels.

The C++ kernels are in csrc/cpu/roi_pool_kernel.cpp; outputs (and argmax) come in the input's
memory format.

torchvision registers no CPU autocast rule for roi_pool, and neither do we: under autocast it runs
as outside it (rois of the input's dtype, or torchvision's error).
"""

from __future__ import annotations

import torch

from ._common import grad_input_like, pooled_with_indices


def meta_roi_pool(
    input: torch.Tensor, rois: torch.Tensor, spatial_scale: float, pooled_height: int, pooled_width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    return pooled_with_indices("roi_pool", input, rois, input.size(1), pooled_height, pooled_width)


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
    return grad_input_like("_roi_pool_backward", grad, rois, batch_size, channels, height, width)


def register(lib: torch.library.Library) -> None:
    lib.impl("roi_pool", meta_roi_pool, "Meta")
    lib.impl("_roi_pool_backward", meta_roi_pool_backward, "Meta")
