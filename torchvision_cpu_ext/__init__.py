"""Fast CPU kernels for torchvision's detection ops.

`import torchvision_cpu_ext` puts vectorized, parallel kernels (NCHW and channels_last, fp32,
bf16, fp16) behind torchvision.ops.* and everything built on it. `disable()` / `enable()` switch
back and forth in one process; TORCHVISION_CPU_EXT_OVERRIDE=0 imports without overriding.
`optimize(model)` swaps a model's depthwise convolutions for the package's op and folds its frozen
batch norms into the convolutions before them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from . import _loader, _registry
from ._info import depthwise_path, info
from .ops import depthwise_conv1d, depthwise_conv2d

_LOADED = _loader.load()
_registry.setup()
if _registry.mode() == _registry.MODE_FALLBACK or _registry.env_wants_override():
    # In fallback mode torchvision has no kernels of its own: ours are the only ones.
    _registry.enable()

from ._optimize import DepthwiseConv1d, DepthwiseConv2d, optimize  # noqa: E402  (needs the library loaded)


def enable() -> None:
    """Route torchvision's CPU ops to this package's kernels (the default after import)."""
    _registry.enable()


def disable() -> None:
    """Give torchvision's own CPU kernels, fake kernels and autocast rules back."""
    _registry.disable()


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """torchvision's own CPU kernels inside the block (e.g. to compare with them); the state
    before it afterwards."""
    was = is_enabled()
    disable()
    try:
        yield
    finally:
        if was:
            enable()


def is_enabled() -> bool:
    """Whether torchvision's CPU ops currently run on this package's kernels."""
    return _registry.is_enabled()


def empty_cache() -> int:
    """Frees the blocks our kernels keep for reuse by large outputs (see NOTE [ output pool ] in
    csrc/cpu/memory.h; capped by TORCHVISION_CPU_EXT_POOL_MB, default 256). Returns the bytes freed."""
    import torch

    cached = torch.ops.torchvision_cpu_ext._output_pool_stats()[0]
    torch.ops.torchvision_cpu_ext._empty_output_pool()
    return int(cached)


def loaded_library() -> _loader.Loaded:
    """The kernel library of this process: its ISA variant, path and how it was obtained."""
    return _LOADED


__all__ = [
    "DepthwiseConv1d",
    "DepthwiseConv2d",
    "depthwise_conv1d",
    "depthwise_conv2d",
    "depthwise_path",
    "disable",
    "disabled",
    "empty_cache",
    "enable",
    "info",
    "is_enabled",
    "loaded_library",
    "optimize",
]
