"""Checks, fake-kernel helpers and the autocast rule shared by the RoI ops' Python registrations."""

from __future__ import annotations

import torch
from torch._prims_common import suggest_memory_format

AUTOCAST_CPU_KEYS = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)

_REDUCED = (torch.bfloat16, torch.float16)


def check_roi_dtypes(op: str, input: torch.Tensor, rois: torch.Tensor, float_rois_ok: bool = False) -> None:
    """rois share the input's dtype (as torchvision requires); with `float_rois_ok`, float32 rois
    with a bfloat16/float16 input are taken too (roi_align's autocast path, as in C++)."""
    mixed_ok = float_rois_ok and input.dtype in _REDUCED
    ok = rois.dtype == input.dtype or (mixed_ok and rois.dtype == torch.float32)
    torch._check(
        ok,
        lambda: (
            f"{op}: rois must have the dtype of input"
            + (" or float32" if mixed_ok else "")
            + f", got input {input.dtype} and rois {rois.dtype}"
        ),
    )


def check_roi_inputs(op: str, input: torch.Tensor, rois: torch.Tensor, float_rois_ok: bool = False) -> None:
    torch._check(input.dim() == 4, lambda: f"{op}: input must be a 4-D tensor [N, C, H, W], got {input.dim()}-D")
    torch._check(
        rois.dim() == 2 and rois.size(1) == 5,
        lambda: f"{op}: rois must have shape [K, 5] (batch index, x1, y1, x2, y2), got {list(rois.shape)}",
    )
    check_roi_dtypes(op, input, rois, float_rois_ok)


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
    op: str,
    grad: torch.Tensor,
    rois: torch.Tensor,
    batch_size: int,
    channels: int,
    height: int,
    width: int,
    float_rois_ok: bool = False,
) -> torch.Tensor:
    """Fake output of every `_..._backward` op: grad_input in grad's memory format."""
    check_roi_dtypes(op, grad, rois, float_rois_ok)
    return empty_like_layout(grad, (batch_size, channels, height, width))


def autocast_cast(t: torch.Tensor) -> torch.Tensor:
    """What torchvision's CPU autocast rules do to each tensor argument (at::autocast::cached_cast
    to float32): a floating tensor other than float64 becomes float32, anything else is kept."""
    return t.float() if t.is_floating_point() and t.dtype != torch.float64 else t
