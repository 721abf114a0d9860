"""Checks and constants shared by the Python-side registrations of the RoI ops."""

from __future__ import annotations

import torch

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
