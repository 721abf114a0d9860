"""How our kernels get in front of torchvision's, in both situations a user can be in.

- "override": torchvision's compiled ops loaded. Our C++ kernels are registered on the CPU key
  of torchvision's own ops (forward and `_..._backward`), our fake kernels on Meta and our
  autocast rules on AutocastCPU; disable() drops all three and torchvision's come back.
- "fallback": torchvision's compiled ops cannot load (e.g. torch 2.13.0+cpu with a torchvision
  built for another torch: `operator torchvision::nms does not exist`). We define torchvision's
  op schemas ourselves, register our kernels, and let torchvision's Python side believe its
  extension loaded, so it calls torch.ops.torchvision.* and registers its autograd. Ops we do
  not implement yet raise NotImplementedError naming the op.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import warnings
from pathlib import Path

import torch

from . import _op_table
from . import ops as _ops

TORCHVISION_SCHEMAS = _op_table.TORCHVISION_SCHEMAS

MODE_OVERRIDE = "override"
MODE_FALLBACK = "fallback"

_state: dict[str, object] = {"mode": None, "py_lib": None, "fallback_lib": None}


def _op_exists(name: str) -> bool:
    try:
        getattr(torch.ops.torchvision, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def _torchvision_libraries() -> list[Path]:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("torchvision_cpu_ext needs torchvision installed (`pip install torchvision`)")
    root = Path(next(iter(spec.submodule_search_locations)))
    return sorted(p for p in root.glob("_C*.so"))


def _torchvision_ops_load() -> bool:
    """Whether torchvision's compiled ops load in this process (loading them if so).

    Decided before torchvision itself is imported: if they cannot load, its import fails
    unless we first define its schemas.
    """
    if "torchvision" in sys.modules:
        import torchvision.extension

        return bool(torchvision.extension._has_ops())
    for lib in _torchvision_libraries():
        try:
            torch.ops.load_library(str(lib))
        except (OSError, ImportError, RuntimeError):
            continue
        if _op_exists("roi_align"):
            return True
    return False


def _not_implemented(name: str):
    def kernel(*args, **kwargs):
        raise NotImplementedError(
            f"torchvision::{name}: torchvision's compiled ops did not load in this environment and "
            f"torchvision_cpu_ext does not implement {name} yet"
        )

    return kernel


def _define_torchvision_schemas() -> None:
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for name, schema in TORCHVISION_SCHEMAS.items():
        if not _op_exists(name):
            lib.define(schema)
    lib.impl("_cuda_version", lambda: -1, "CompositeExplicitAutograd")
    for name in _op_table.not_implemented():
        lib.impl(name, _not_implemented(name), "CPU")
    _state["fallback_lib"] = lib


def _import_torchvision_with_our_ops() -> None:
    """Imports torchvision so that its extension module reports that its ops are present.

    torchvision decides once, at import, whether it has ops (extension._has_ops()); only then
    does its Python side call torch.ops.torchvision.*, register fake kernels and autograd.
    Its attempt to load its own compiled library is the one thing that fails here, so for the
    duration of the import that attempt is answered with the ops we already defined.
    """
    libs = {str(p) for p in _torchvision_libraries()}
    real = torch.ops.load_library

    def load_library(path):
        if str(path) in libs:
            return None
        return real(path)

    torch.ops.load_library = load_library
    try:
        import torchvision  # noqa: F401
    finally:
        torch.ops.load_library = real


def setup() -> str:
    """Called once at import: decides the mode and defines what the mode needs."""
    _ops.check(list(torch.ops.torchvision_cpu_ext._cpu_override_ops()))
    if _torchvision_ops_load():
        mode = MODE_OVERRIDE
        import torchvision  # noqa: F401  (its _C first: the last registration wins)
    else:
        if "torchvision" in sys.modules:
            raise ImportError(
                "torchvision was imported before torchvision_cpu_ext without its compiled ops; "
                "import torchvision_cpu_ext first so that it can supply them"
            )
        mode = MODE_FALLBACK
        _define_torchvision_schemas()
        _import_torchvision_with_our_ops()
    _state["mode"] = mode
    return mode


def mode() -> str:
    return str(_state["mode"])


def is_enabled() -> bool:
    return _state["py_lib"] is not None


def enable() -> None:
    if is_enabled():
        return
    # Replacing torchvision's kernels is this package's purpose, so the dispatcher's warning
    # about it is filtered here, for these registrations only.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="(?s).*Overriding a previously registered kernel")
        torch.ops.torchvision_cpu_ext._set_cpu_override(True)
        lib = torch.library.Library("torchvision", "IMPL")
        _ops.register_all(lib)
    _state["py_lib"] = lib


def disable() -> None:
    if _state["mode"] == MODE_FALLBACK:
        raise RuntimeError(
            "torchvision_cpu_ext.disable(): torchvision's compiled ops did not load in this "
            "environment, so there are no torchvision kernels to give back"
        )
    lib = _state["py_lib"]
    if lib is None:
        return
    torch.ops.torchvision_cpu_ext._set_cpu_override(False)
    lib._destroy()
    _ops.unregister_all()
    _state["py_lib"] = None


def env_wants_override() -> bool:
    return os.environ.get("TORCHVISION_CPU_EXT_OVERRIDE", "1").strip().lower() not in ("0", "false", "no", "off")
