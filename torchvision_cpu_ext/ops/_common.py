"""Checks, fake-kernel helpers and the autocast rule shared by the RoI ops' Python registrations."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch._prims_common import suggest_memory_format

AUTOCAST_CPU_KEYS = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)

_REDUCED = (torch.bfloat16, torch.float16)


def check_roi_dtypes(op: str, input: torch.Tensor, rois: torch.Tensor) -> None:
    """rois share the input's dtype, or are float32 for a bfloat16/float16 input (as in C++)."""
    ok = rois.dtype == input.dtype or (input.dtype in _REDUCED and rois.dtype == torch.float32)
    torch._check(
        ok,
        lambda: (
            f"{op}: rois must have the dtype of input"
            + (" or float32" if input.dtype in _REDUCED else "")
            + f", got input {input.dtype} and rois {rois.dtype}"
        ),
    )


def check_roi_inputs(op: str, input: torch.Tensor, rois: torch.Tensor) -> None:
    torch._check(input.dim() == 4, lambda: f"{op}: input must be a 4-D tensor [N, C, H, W], got {input.dim()}-D")
    torch._check(
        rois.dim() == 2 and rois.size(1) == 5,
        lambda: f"{op}: rois must have shape [K, 5] (batch index, x1, y1, x2, y2), got {list(rois.shape)}",
    )
    check_roi_dtypes(op, input, rois)


def ps_channels_out(op: str, channels: int, pooled_height: int, pooled_width: int) -> int:
    torch._check(
        pooled_height > 0 and pooled_width > 0 and channels % (pooled_height * pooled_width) == 0,
        lambda: (
            f"{op}: input channels ({channels}) must be a multiple of pooled_height * pooled_width "
            f"({pooled_height} * {pooled_width})"
        ),
    )
    return channels // (pooled_height * pooled_width)


def empty_like_layout(like: torch.Tensor, shape, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A new tensor in `like`'s memory format, as the C++ kernels return their outputs."""
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device, memory_format=suggest_memory_format(like))


def pooled_with_indices(
    op: str, input: torch.Tensor, rois: torch.Tensor, channels: int, pooled_height: int, pooled_width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fake outputs of roi_pool and the position-sensitive ops: values and their int32 indices."""
    check_roi_inputs(op, input, rois)
    shape = (rois.size(0), channels, pooled_height, pooled_width)
    return empty_like_layout(input, shape), empty_like_layout(input, shape, torch.int32)


def grad_input_like(
    op: str, grad: torch.Tensor, rois: torch.Tensor, batch_size: int, channels: int, height: int, width: int
) -> torch.Tensor:
    """Fake output of every `_..._backward` op: grad_input in grad's memory format."""
    check_roi_dtypes(op, grad, rois)
    return empty_like_layout(grad, (batch_size, channels, height, width))


def autocast_rule(op: str) -> Callable[..., object]:
    """AutocastCPU rule of a RoI op: the input keeps its dtype (a bf16 feature map stays bf16,
    where torchvision's rule casts it to fp32 and back), rois go to fp32 (bf16 cannot hold
    pixel coordinates); float64 runs untouched."""
    kernel = getattr(torch.ops.torchvision, op)

    def rule(input: torch.Tensor, rois: torch.Tensor, *args):
        with torch._C._ExcludeDispatchKeyGuard(AUTOCAST_CPU_KEYS):
            if input.dtype != torch.float64 and rois.is_floating_point():
                rois = rois.float()
            return kernel(input, rois, *args)

    rule.__name__ = f"autocast_{op}"
    return rule
