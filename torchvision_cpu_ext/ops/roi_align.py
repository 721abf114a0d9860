"""Python-side registrations of roi_align: its fake (Meta) kernels and its AutocastCPU rule.

The C++ kernels live in csrc/cpu/roi_align_kernel.cpp.
"""

from __future__ import annotations

import torch
from torch._prims_common import suggest_memory_format

from ._common import AUTOCAST_CPU_KEYS, check_roi_dtypes


def meta_roi_align(
    input: torch.Tensor,
    rois: torch.Tensor,
    spatial_scale: float,
    pooled_height: int,
    pooled_width: int,
    sampling_ratio: int,
    aligned: bool,
) -> torch.Tensor:
    torch._check(input.dim() == 4, lambda: f"roi_align: input must be a 4-D tensor [N, C, H, W], got {input.dim()}-D")
    torch._check(
        rois.dim() == 2 and rois.size(1) == 5,
        lambda: f"roi_align: rois must have shape [K, 5] (batch index, x1, y1, x2, y2), got {list(rois.shape)}",
    )
    check_roi_dtypes("roi_align", input, rois)
    # Unlike torchvision's fake kernel: fp32 rois with bf16/fp16 input (the autocast rule's
    # case), and the output in the input's memory format, as the CPU kernel returns it.
    return torch.empty(
        (rois.size(0), input.size(1), pooled_height, pooled_width),
        dtype=input.dtype,
        device=input.device,
        memory_format=suggest_memory_format(input),
    )


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
    check_roi_dtypes("_roi_align_backward", grad, rois)
    return torch.empty(
        (batch_size, channels, height, width),
        dtype=grad.dtype,
        device=grad.device,
        memory_format=suggest_memory_format(grad),
    )


def autocast_roi_align(
    input: torch.Tensor,
    rois: torch.Tensor,
    spatial_scale: float,
    pooled_height: int,
    pooled_width: int,
    sampling_ratio: int,
    aligned: bool,
) -> torch.Tensor:
    # torchvision's rule casts everything to fp32 and the result back: under bf16 autocast a
    # bf16 feature map would make a round trip through fp32. Ours keeps the input's dtype and
    # puts rois in fp32, which bf16 could not hold pixel coordinates in; float64 is untouched.
    with torch._C._ExcludeDispatchKeyGuard(AUTOCAST_CPU_KEYS):
        if input.dtype != torch.float64 and rois.is_floating_point():
            rois = rois.float()
        return torch.ops.torchvision.roi_align(
            input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned
        )


def register(lib: torch.library.Library) -> None:
    lib.impl("roi_align", meta_roi_align, "Meta")
    lib.impl("_roi_align_backward", meta_roi_align_backward, "Meta")
    lib.impl("roi_align", autocast_roi_align, "AutocastCPU")
