"""The Python side of the ops in the op table (torchvision_cpu_ext/_op_table.py).

`_rules` holds every fake kernel and autocast rule; a row's `module` (here) holds the rest of
its Python side: patches of torchvision functions and autograd of the package's own ops, each
module with register() / unregister() / owners().
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

from .. import _op_table
from . import _rules
from .depthwise_conv import depthwise_conv1d, depthwise_conv2d

__all__ = ["depthwise_conv1d", "depthwise_conv2d"]


def modules() -> list[ModuleType]:
    return [importlib.import_module(f"{__name__}.{op.module}") for op in _op_table.OPS if op.module]


def check(cpp_ops: list[str]) -> None:
    """The op table agrees with the C++ registrars and with _rules' decorators."""
    _op_table.check(cpp_ops, _rules.FAKES, _rules.AUTOCASTS)


def register_all(lib: torch.library.Library) -> None:
    """Registers the rules of torchvision's ops on `lib` (torchvision IMPL, dropped by
    disable()), the package's own ops' rules (once), and the rows' Python modules."""
    _rules.register_torchvision(lib)
    _rules.register_own()
    for m in modules():
        m.register()


def unregister_all() -> None:
    """Undoes what register_all did outside the dispatcher (the library object holds the rest)."""
    for m in modules():
        m.unregister()


def owners() -> dict[str, str]:
    """Who provides each torchvision Python function the rows' modules replace."""
    out: dict[str, str] = {}
    for m in modules():
        out.update(m.owners())
    return out
