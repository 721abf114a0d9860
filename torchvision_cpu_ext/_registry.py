"""How our kernels get in front of torchvision's, in both situations a user can be in.

- "override": torchvision's compiled ops loaded. Our C++ kernels are registered on the CPU key
  of torchvision's own ops (forward and `_..._backward`), our fake kernels on Meta and our
  autocast rules on AutocastCPU; disable() drops all three and torchvision's come back.
- "fallback": torchvision's compiled ops cannot load (e.g. torch 2.13.0+cpu with a torchvision
  built for another torch: `operator torchvision::nms does not exist`). We define torchvision's
  op schemas ourselves, register our kernels, and let torchvision's Python side believe its
  extension loaded, so it calls torch.ops.torchvision.* and registers its autograd. Ops we do
  not implement yet raise NotImplementedError naming the op.

Threads (README, "Threads"): enable() and disable() change registrations in PyTorch's dispatcher,
which does not support a kernel being unregistered (or replaced) while another thread is calling
it: the caller may still be reading the entry being rewritten or the kernel object being freed.
So switching is allowed only while no other thread runs torchvision ops. It is guarded, not made
safe: a lock makes each switch atomic with respect to other switches, and a switch that would
change something raises if another thread is inside a torchvision or torchvision_cpu_ext op, or in
the Python code of torchvision.ops or of this package's ops (threads_in_ops). That check reads the
other threads' Python stacks, so it costs the op calls nothing; it cannot see a thread that is
between two calls, in an autograd backward pass, or a C++ thread without Python frames.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import threading
import warnings
from pathlib import Path

import torch

from . import _op_table
from . import ops as _ops

TORCHVISION_SCHEMAS = _op_table.TORCHVISION_SCHEMAS

MODE_OVERRIDE = "override"
MODE_FALLBACK = "fallback"

_state: dict[str, object] = {"mode": None, "py_lib": None, "fallback_lib": None}
_switch_lock = threading.Lock()
_OP_NAMESPACES = ("torchvision", "torchvision_cpu_ext")


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


def _op_dirs() -> tuple[str, ...]:
    """torchvision/ops/ and torchvision_cpu_ext/ops/, as frames' file names begin."""
    spec = importlib.util.find_spec("torchvision")
    roots = [os.path.dirname(__file__), *(spec.submodule_search_locations or [] if spec else [])]
    return tuple(os.path.join(root, "ops", "") for root in roots)


def _in_op(frame, op_dirs: tuple[str, ...]) -> bool:
    """Whether a Python frame is a call of a torchvision / torchvision_cpu_ext op (torch.ops'
    __call__, whose C++ call runs below it), or code of torchvision.ops or of our ops package."""
    code = frame.f_code
    if code.co_name == "__call__" and code.co_filename == torch._ops.__file__:
        return str(frame.f_locals.get("self")).split(".", 1)[0] in _OP_NAMESPACES
    return code.co_filename.startswith(op_dirs)


def threads_in_ops() -> list[str]:
    """The names of the other threads now inside a torchvision or torchvision_cpu_ext op (best
    effort, see the module's docstring)."""
    me, op_dirs = threading.get_ident(), _op_dirs()
    names = {t.ident: t.name for t in threading.enumerate()}
    busy = []
    for ident, frame in sys._current_frames().items():
        if ident == me:
            continue
        while frame is not None and not _in_op(frame, op_dirs):
            frame = frame.f_back
        if frame is not None:
            busy.append(names.get(ident, str(ident)))
    return sorted(busy)


def _check_no_ops_running(what: str) -> None:
    busy = threads_in_ops()
    if busy:
        raise RuntimeError(
            f"torchvision_cpu_ext.{what}() while other threads run torchvision ops ({', '.join(busy)}): "
            "switching kernels in PyTorch's dispatcher is not safe while they may be called; "
            f"call {what}() while no other thread runs torchvision ops (README, Threads)"
        )


def enable() -> None:
    with _switch_lock:
        _enable()


def disable() -> None:
    with _switch_lock:
        _disable()


def _enable() -> None:
    if is_enabled():
        return
    _check_no_ops_running("enable")
    # Replacing torchvision's kernels is this package's purpose, so the dispatcher's warning
    # about it is filtered here, for these registrations only.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="(?s).*Overriding a previously registered kernel")
        torch.ops.torchvision_cpu_ext._set_cpu_override(True)
        lib = torch.library.Library("torchvision", "IMPL")
        _ops.register_all(lib)
    _state["py_lib"] = lib


def _disable() -> None:
    if _state["mode"] == MODE_FALLBACK:
        raise RuntimeError(
            "torchvision_cpu_ext.disable(): torchvision's compiled ops did not load in this "
            "environment, so there are no torchvision kernels to give back"
        )
    lib = _state["py_lib"]
    if lib is None:
        return
    _check_no_ops_running("disable")
    torch.ops.torchvision_cpu_ext._set_cpu_override(False)
    lib._destroy()
    _ops.unregister_all()
    _state["py_lib"] = None


def env_wants_override() -> bool:
    return os.environ.get("TORCHVISION_CPU_EXT_OVERRIDE", "1").strip().lower() not in ("0", "false", "no", "off")
