"""Finds or builds the kernel library for this torch version and CPU capability, and loads it.

Order: the best prebuilt variant this CPU runs (made by setup.py, next to this file), else a
JIT build of ATen's own variant with torch.utils.cpp_extension, cached and loaded directly
from the cache once a build of the same name has completed.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from . import _build

PKG_DIR = Path(__file__).resolve().parent

# Written next to a cached library once cpp_extension.load returned it: the library is then
# complete (a concurrent build links in place) and, as its name carries the digest of its
# sources and flags, up to date.
_BUILT_STAMP = ".built"


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
    return Path(root) / name


class _DropNoCudaRuntime(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No CUDA runtime is found")


def _cpp_extension() -> ModuleType:
    """torch.utils.cpp_extension, imported without its `No CUDA runtime is found, using
    CUDA_HOME=...` warning, which it logs on import where a CUDA toolkit is installed but no GPU
    is visible: we build CPU code only. The filter holds that one message, during that import."""
    log = logging.getLogger("torch.utils.cpp_extension")
    drop = _DropNoCudaRuntime()
    log.addFilter(drop)
    try:
        from torch.utils import cpp_extension
    finally:
        log.removeFilter(drop)
    return cpp_extension


def _check_toolchain(why: str = "") -> None:
    cpp_extension = _cpp_extension()
    try:
        cpp_extension.verify_ninja_availability()
    except RuntimeError as e:
        raise RuntimeError(
            f"{why}torchvision_cpu_ext needs ninja to JIT-build its kernels: `pip install ninja` "
            "(or build ahead of time with `pip install --no-build-isolation .`)"
        ) from e
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise RuntimeError(
            f"{why}torchvision_cpu_ext needs a C++17 compiler to JIT-build its kernels, and `{cxx}` "
            "was not found: install one (e.g. `apt-get install g++`) or set CXX"
        )


def _no_prebuilt_reason(isa: str) -> str:
    """Why an installed (not checked-out) package has to build: said before any toolchain error."""
    manifest = _build.read_manifest()
    if manifest is None:
        return ""
    return (
        f"The prebuilt kernels of this install are for torch {manifest['torch']}, variants "
        f"{', '.join(manifest['variants']) or 'none'}; none fits torch {torch.__version__} with CPU "
        f"capability {isa}. Reinstall torchvision-cpu-ext for this torch and CPU, or: "
    )


def _precompiled_header(build_dir: Path, name: str, isa: str, csrc: Path, cpp_extension: ModuleType) -> list[str]:
    """Builds the precompiled header of _build.PCH_HEADERS in build_dir, with the flags that
    cpp_extension.load gives every translation unit of this build (its ninja file's cflags), and
    returns the flags that make each unit start from it. It only saves parse time: a unit that
    cannot use it (a flag differs, the build failed) parses the same headers as text, so the
    generated code is the same either way. Returns [] if the compiler is not GCC."""
    cxx = os.environ.get("CXX", "c++")
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    except OSError:
        return []
    if "clang" in version.lower():  # clang's .pch needs -include-pch; keep the plain build there
        return []
    system = cpp_extension.include_paths("cpu") + [sysconfig.get_path("include", scheme="posix_prefix")]
    flags = [f"-DTORCH_EXTENSION_NAME={name}", "-DTORCH_API_INCLUDE_EXTENSION_H", f"-I{csrc.resolve()}"]
    flags += [f for path in system for f in ("-isystem", path)]
    flags += ["-fPIC", "-std=c++20", *_build.cflags(isa)]
    header = build_dir / _build.PCH_NAME
    gch = build_dir / (_build.PCH_NAME + ".gch")
    signature = "\n".join([version, _build.pch_text(), *flags])
    stamp = build_dir / ".pch-signature"
    use = ["-include", str(header), "-Winvalid-pch"]
    if gch.is_file() and header.is_file() and stamp.is_file() and stamp.read_text() == signature:
        return use
    header.write_text(_build.pch_text())
    tmp = gch.with_name(f"{gch.name}.{os.getpid()}.tmp")
    res = subprocess.run([cxx, "-x", "c++-header", *flags, str(header), "-o", str(tmp)], capture_output=True, text=True)
    if res.returncode != 0:
        tmp.unlink(missing_ok=True)
        return []  # the units include the headers themselves; the build reports real errors
    os.replace(tmp, gch)  # whole or not at all: a concurrent unit never sees half a file
    stamp.write_text(signature)
    return use


def _check_sanitizer_runtime() -> None:
    """The sanitizer build aborts the process at load unless the ASan runtime came first."""
    with open("/proc/self/maps") as maps:
        if "libasan" in maps.read():
            return
    raise RuntimeError(
        f"torchvision_cpu_ext: {_build.SANITIZE_ENV}=1 loads a build with AddressSanitizer, whose runtime "
        'must be preloaded into Python: run with LD_PRELOAD="$(c++ -print-file-name=libasan.so) '
        '$(c++ -print-file-name=libubsan.so)" (scripts/sanitize.sh does)'
    )


def load() -> Loaded:
    isa = cpu_variant()
    if _build.sanitize():
        _check_sanitizer_runtime()
    # A lower variant runs on this CPU too, and needs no compiler (not the sanitizer build's).
    for variant in _build.ISA_ORDER[_build.ISA_ORDER.index(isa) :] if not _build.sanitize() else ():
        pre = _prebuilt(_build.library_name(variant, torch.__version__))
        if pre is not None:
            torch.ops.load_library(str(pre))
            return Loaded(variant, str(pre), "prebuilt")

    csrc = _build.source_dir()
    if csrc is None:
        raise RuntimeError(
            f"{_no_prebuilt_reason(isa)}torchvision_cpu_ext has no kernel sources to build from "
            f"(looked in {_build.CSRC} and {_build.PACKAGED_CSRC})"
        )
    name = _build.library_name(isa, torch.__version__, _build.source_hash(isa, csrc))
    build_dir = _cache_dir(name)
    target = build_dir / f"{name}.so"
    if (build_dir / _BUILT_STAMP).is_file() and target.is_file():
        torch.ops.load_library(str(target))
        return Loaded(isa, str(target), "jit-cache")

    _check_toolchain(_no_prebuilt_reason(isa))
    cpp_extension = _cpp_extension()
    build_dir.mkdir(parents=True, exist_ok=True)
    before = target.stat().st_mtime_ns if target.exists() else None
    t0 = time.perf_counter()
    pch = _precompiled_header(build_dir, name, isa, csrc, cpp_extension)
    path = cpp_extension.load(
        name=name,
        sources=_build.sources(csrc),
        extra_cflags=_build.cflags(isa) + pch,
        extra_ldflags=_build.ldflags(),  # a new list: cpp_extension appends to the one it is given
        extra_include_paths=[str(csrc)],
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=bool(os.environ.get("TORCHVISION_CPU_EXT_VERBOSE")),
    )
    path = str(path) if path else str(target)
    (build_dir / _BUILT_STAMP).touch()
    built = not target.exists() or target.stat().st_mtime_ns != before
    if built:
        print(
            f"torchvision_cpu_ext: JIT-built {name} ({isa}) in {time.perf_counter() - t0:.1f} s -> {path}",
            file=sys.stderr,
        )
    return Loaded(isa, path, "jit-built" if built else "jit-cache")
