"""Finds or builds the kernel library for this torch version and CPU capability, and loads it.

Order: a prebuilt library next to this file (made by setup.py), else a JIT build with
torch.utils.cpp_extension (cached; rebuilt by it when a source changes).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import _build

PKG_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Loaded:
    isa: str  # variant loaded: AVX512, AVX2 or DEFAULT
    path: str  # the shared library
    how: str  # "prebuilt", "jit-built" or "jit-cache"


def cpu_variant() -> str:
    """The variant for this process: ATen's own choice, so ATEN_CPU_CAPABILITY=avx2 forces AVX2."""
    cap = torch.backends.cpu.get_cpu_capability()
    return cap if cap in _build.ISA_FLAGS else "DEFAULT"


def _prebuilt(name: str) -> Path | None:
    found = sorted(PKG_DIR.glob(f"{name}.*so")) + sorted(PKG_DIR.glob(f"{name}.so"))
    return found[0] if found else None


def _cache_dir(name: str) -> Path:
    root = os.environ.get("TORCHVISION_CPU_EXT_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "torchvision_cpu_ext"
    )
    path = Path(root) / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def _check_toolchain() -> None:
    from torch.utils import cpp_extension

    try:
        cpp_extension.verify_ninja_availability()
    except RuntimeError as e:
        raise RuntimeError(
            "torchvision_cpu_ext needs ninja to JIT-build its kernels: `pip install ninja` "
            "(or build ahead of time with `pip install --no-build-isolation -e .`)"
        ) from e
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise RuntimeError(
            f"torchvision_cpu_ext needs a C++17 compiler to JIT-build its kernels, and `{cxx}` "
            "was not found: install one (e.g. `apt-get install g++`) or set CXX"
        )


def load() -> Loaded:
    isa = cpu_variant()
    name = _build.library_name(isa, torch.__version__)
    pre = _prebuilt(name)
    if pre is not None:
        torch.ops.load_library(str(pre))
        return Loaded(isa, str(pre), "prebuilt")

    _check_toolchain()
    from torch.utils import cpp_extension

    build_dir = _cache_dir(name)
    target = build_dir / f"{name}.so"
    before = target.stat().st_mtime_ns if target.exists() else None
    t0 = time.perf_counter()
    path = cpp_extension.load(
        name=name,
        sources=_build.sources(),
        extra_cflags=_build.cflags(isa),
        extra_ldflags=list(_build.LDFLAGS),  # cpp_extension appends to the list it is given
        extra_include_paths=[str(_build.CSRC)],
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=bool(os.environ.get("TORCHVISION_CPU_EXT_VERBOSE")),
    )
    path = str(path) if path else str(target)
    built = not target.exists() or target.stat().st_mtime_ns != before
    if built:
        print(
            f"torchvision_cpu_ext: JIT-built {name} ({isa}) in {time.perf_counter() - t0:.1f} s -> {path}",
            file=sys.stderr,
        )
    return Loaded(isa, path, "jit-built" if built else "jit-cache")
