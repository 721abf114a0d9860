"""The one list of sources and flags, shared by setup.py (ahead of time) and the JIT loader.

Kept free of package imports so that setup.py can load it by path before anything is built.

Where the sources are: a checkout (or an editable install) has them in csrc/cpu/ at the top of
the repository, and its library names hash them as they are now. A wheel has no such directory:
setup.py writes the digests into the package (MANIFEST) and a copy of csrc/cpu/ into
torchvision_cpu_ext/csrc/cpu/, which only a JIT build (no prebuilt variant fits) compiles.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
from pathlib import Path

PKG_DIR = Path(__file__).resolve().parent
ROOT = PKG_DIR.parent
CSRC = ROOT / "csrc" / "cpu"
PACKAGED_CSRC = PKG_DIR / "csrc" / "cpu"
MANIFEST = PKG_DIR / "_prebuilt.json"


def _load_op_table():
    """The op table (_op_table.py), loaded by path: it imports nothing from the package."""
    name = "_torchvision_cpu_ext_op_table"
    if name not in sys.modules:  # dataclasses look their module up there
        spec = importlib.util.spec_from_file_location(name, PKG_DIR / "_op_table.py")
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


# One op, one kernel file (a row of the op table each); override.cpp holds the switch between
# our kernels and torchvision's.
SOURCES = ["override.cpp"] + [f"{op.kernel}_kernel.cpp" for op in _load_op_table().OPS if op.kernel]

# -ffp-contract=off: scalar code must round exactly like torchvision's (no silent FMA
# contraction of a*b+c); the vector code asks for FMA explicitly through at::vec::fmadd.
COMMON_FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fopenmp"]

# at::parallel_for is inline OpenMP code in torch's CPU builds: without -fopenmp it runs on
# one thread. Linking -fopenmp names libgomp.so.1, which resolves to the copy torch loaded.
# --wrap: this library's calls of at::init_num_threads go to its own wrapper (NOTE [ thread count
# on first use ] in csrc/cpu/override.cpp).
LDFLAGS = ["-fopenmp", "-Wl,--wrap=_ZN2at16init_num_threadsEv"]

# The opt-in sanitizer build (TORCHVISION_CPU_EXT_SANITIZE=1; scripts/sanitize.sh runs the tests
# on it): AddressSanitizer and UndefinedBehaviorSanitizer in every translation unit, the first
# report fatal. Its flags are part of the digest, so it is a library of its own name; it needs
# the ASan runtime preloaded into Python (the loader says how when it is not).
SANITIZE_ENV = "TORCHVISION_CPU_EXT_SANITIZE"
SANITIZE_FLAGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g"]


def sanitize() -> bool:
    return os.environ.get(SANITIZE_ENV, "") not in ("", "0")


# Ahead of time only. setuptools compiles with Python's own CFLAGS, which carry -g: debug
# information was most of each shipped library. -s drops the static symbol table too (the
# dynamic symbols the loader needs stay). Neither changes the generated code, so they are not
# part of the digest; a JIT build keeps its symbols for profilers and backtraces.
AOT_CFLAGS = ["-g0"]
AOT_LDFLAGS = ["-s"]

# at::vec is only SIMD when a translation unit is compiled with these macros and the matching
# -m flags (the same as ATen's own per-capability builds); without them it is scalar code.
# The keys are the values of torch.backends.cpu.get_cpu_capability().
ISA_FLAGS: dict[str, list[str]] = {
    "AVX512": [
        "-DCPU_CAPABILITY=AVX512",
        "-DCPU_CAPABILITY_AVX512",
        "-mavx512f",
        "-mavx512bw",
        "-mavx512vl",
        "-mavx512dq",
        "-mfma",
        "-mf16c",
    ],
    "AVX2": ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"],
    "DEFAULT": ["-DCPU_CAPABILITY=DEFAULT"],
}

# The library headers every kernel file includes (directly or through csrc/cpu's own headers),
# compiled once per build into a precompiled header that each translation unit gets with
# -include: parsing them was ~14 of the ~15-35 CPU-seconds of every file. Only torch and standard
# headers: the project's own headers change with the kernels and stay textual. A precompiled
# header changes parse time, not code: each variant's is built with that variant's flags, and
# GCC silently parses the text instead if a flag differs (-Winvalid-pch says so).
PCH_HEADERS = [
    "ATen/ATen.h",
    "ATen/Dispatch.h",
    "ATen/EmptyTensor.h",
    "ATen/OpMathType.h",
    "ATen/Parallel.h",
    "ATen/core/dispatch/Dispatcher.h",
    "ATen/cpu/vec/functional.h",
    "ATen/cpu/vec/vec.h",
    "c10/core/Allocator.h",
    "c10/core/impl/alloc_cpu.h",
    "c10/util/SmallVector.h",
    "torch/library.h",
    "algorithm",
    "atomic",
    "cmath",
    "cstdint",
    "cstring",
    "limits",
    "mutex",
    "type_traits",
    "vector",
]
PCH_NAME = "tvce_pch.h"


def pch_text() -> str:
    return "".join(f"#include <{h}>\n" for h in PCH_HEADERS)


# Best first: a CPU that reports a capability can run it and everything after it.
ISA_ORDER = ["AVX512", "AVX2", "DEFAULT"]

# setup.py builds these variants, or those named in it (comma-separated), e.g. to build only
# the one a CI machine tests.
VARIANTS_ENV = "TORCHVISION_CPU_EXT_VARIANTS"


def _complete(csrc: Path) -> bool:
    return all((csrc / s).is_file() for s in SOURCES)


def source_dir() -> Path | None:
    """The kernel sources to compile: the checkout's, else the copy a wheel carries."""
    for csrc in (CSRC, PACKAGED_CSRC):
        if _complete(csrc):
            return csrc
    return None


def sources(csrc: Path | None = None) -> list[str]:
    csrc = csrc or source_dir()
    if csrc is None:
        raise RuntimeError(f"torchvision_cpu_ext: the kernel sources are neither in {CSRC} nor in {PACKAGED_CSRC}")
    return [str(csrc / s) for s in SOURCES]


def headers(csrc: Path | None = None) -> list[str]:
    csrc = csrc or source_dir()
    return sorted(str(p) for p in csrc.glob("*.h")) if csrc else []


def cflags(isa: str) -> list[str]:
    return COMMON_FLAGS + ISA_FLAGS[isa] + (SANITIZE_FLAGS if sanitize() else [])


def ldflags() -> list[str]:
    return LDFLAGS + (SANITIZE_FLAGS if sanitize() else [])


def source_hash(isa: str, csrc: Path | None = None) -> str:
    """A digest of everything that goes into a variant: sources, headers and flags."""
    h = hashlib.sha256()
    for path in sources(csrc) + headers(csrc):
        h.update(Path(path).name.encode())
        h.update(Path(path).read_bytes())
    h.update(" ".join(cflags(isa) + ldflags()).encode())
    return h.hexdigest()[:10]


def read_manifest() -> dict | None:
    """What setup.py recorded in a built package: torch version, digests, variants built."""
    try:
        return json.loads(MANIFEST.read_text())
    except FileNotFoundError:
        return None


def digest(isa: str) -> str:
    """The checkout's live sources when there is one (an edit changes every name), else the
    digest recorded when the installed package was built."""
    if _complete(CSRC):
        return source_hash(isa, CSRC)
    manifest = read_manifest()
    if manifest is not None:
        return manifest["digests"][isa]
    return source_hash(isa)


def library_name(isa: str, torch_version: str, digest_: str | None = None) -> str:
    """A name that carries the torch version, the ISA and the source digest, so that neither
    a prebuilt library nor the JIT cache can serve a stale or foreign build."""
    tag = "".join(ch if ch.isalnum() else "_" for ch in torch_version)
    return f"tvce_{isa.lower()}_torch{tag}_{digest_ or digest(isa)}"


def variants_to_build(env_value: str | None) -> list[str]:
    """The variants setup.py builds: all by default, or the comma-separated list given."""
    if not env_value or not env_value.strip():
        return list(ISA_ORDER)
    wanted = [v.strip().upper() for v in env_value.split(",") if v.strip()]
    unknown = [v for v in wanted if v not in ISA_FLAGS]
    if unknown:
        raise ValueError(f"{VARIANTS_ENV}: unknown variant(s) {', '.join(unknown)}; choose from {', '.join(ISA_ORDER)}")
    return [v for v in ISA_ORDER if v in wanted]


def manifest(torch_version: str, built: list[str]) -> dict:
    """The record setup.py writes into a built package (see read_manifest)."""
    return {
        "torch": torch_version,
        "variants": built,
        "digests": {isa: source_hash(isa, CSRC) for isa in ISA_ORDER},
    }
