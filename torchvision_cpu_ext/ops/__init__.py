"""Python-side registrations (fake kernels, autocast rules) of the ops we implement."""

from __future__ import annotations

import torch

from . import roi_align

# Each module registers the Meta and AutocastCPU kernels of its ops on a torchvision IMPL library.
_MODULES = [roi_align]


def register_all(lib: torch.library.Library) -> None:
    for m in _MODULES:
        m.register(lib)
