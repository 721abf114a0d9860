"""Python-side registrations (fake kernels, autocast rules, batched_nms) of the ops we implement."""

from __future__ import annotations

import torch

from . import frozen_batch_norm, nms, ps_roi_align, ps_roi_pool, roi_align, roi_pool

# Each module registers the Meta and AutocastCPU kernels of its ops on a torchvision IMPL library.
_MODULES = [roi_align, roi_pool, ps_roi_align, ps_roi_pool, nms, frozen_batch_norm]


def register_all(lib: torch.library.Library) -> None:
    for m in _MODULES:
        m.register(lib)


def unregister_all() -> None:
    """Undoes what register_all did outside the dispatcher (the library object holds the rest)."""
    for m in _MODULES:
        if hasattr(m, "unregister"):
            m.unregister()
