"""Debug overrides of the kernels' internal size thresholds (NOTE [ debug thresholds ] in
csrc/cpu/debug_thresholds.h), so that tests reach every path with small tensors.

    with torchvision_cpu_ext._debug.thresholds(stream_grad_bytes=0, grad_band_bytes=1024):
        ...  # every backward streams its gradient, channels_last bands of ~1 KiB

Each keyword is a threshold's name (names() lists them) and its value in the threshold's unit
(bytes, boxes, work units; nchw_transpose: 0 direct loops, 1 transposed blocks). On exit every
overridden threshold is back to what it was before the block. Not for production use: the
overrides are process-wide, shared by every thread.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def names() -> list[str]:
    """The thresholds that can be overridden."""
    return list(torch.ops.torchvision_cpu_ext._debug_threshold_names())


def set_threshold(name: str, value: int | None) -> int | None:
    """Overrides one threshold (None: back to the kernel's own); returns the previous override."""
    old = int(torch.ops.torchvision_cpu_ext._set_debug_threshold(name, -1 if value is None else int(value)))
    return None if old < 0 else old


@contextlib.contextmanager
def thresholds(**overrides: int) -> Iterator[None]:
    """Overrides the named thresholds inside the block, restoring the previous values after."""
    known = names()
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise ValueError(f"unknown debug thresholds {unknown}; known: {known}")
    for name, value in overrides.items():
        if value is None or int(value) < 0:
            raise ValueError(f"debug threshold {name} must be a non-negative integer, got {value!r}")
    previous: dict[str, int | None] = {}
    try:
        for name, value in overrides.items():
            previous[name] = set_threshold(name, value)
        yield
    finally:
        for name, old in previous.items():
            set_threshold(name, old)
