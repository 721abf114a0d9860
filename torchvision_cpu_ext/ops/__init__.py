"""Python-side registrations (fake kernels, autocast rules) of the ops we implement."""

from __future__ import annotations

import torch

from . import ps_roi_align, ps_roi_pool, roi_align, roi_pool

# Each module registers the Meta and AutocastCPU kernels of its ops on a torchvision IMPL library.
_MODULES = [roi_align, roi_pool, ps_roi_align, ps_roi_pool]


def register_all(lib: torch.library.Library) -> None:
    for m in _MODULES:
        m.register(lib)
