"""The one list of sources and flags, shared by setup.py (ahead of time) and the JIT loader.

Kept free of package imports so that setup.py can load it by path before anything is built.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc" / "cpu"

# One op, one kernel file; override.cpp holds the switch between our kernels and torchvision's.
SOURCES = [
    "override.cpp",
    "roi_align_kernel.cpp",
    "roi_pool_kernel.cpp",
    "ps_roi_align_kernel.cpp",
    "ps_roi_pool_kernel.cpp",
    "nms_kernel.cpp",
    "qnms_kernel.cpp",
    "qroi_align_kernel.cpp",
    "box_iou_rotated_kernel.cpp",
    "frozen_batch_norm_kernel.cpp",
]

# -ffp-contract=off: scalar code must round exactly like torchvision's (no silent FMA
# contraction of a*b+c); the vector code asks for FMA explicitly through at::vec::fmadd.
COMMON_FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fopenmp"]

# at::parallel_for is inline OpenMP code in torch's CPU builds: without -fopenmp it runs on
# one thread. Linking -fopenmp names libgomp.so.1, which resolves to the copy torch loaded.
LDFLAGS = ["-fopenmp"]

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

# Best first: a CPU that reports a capability can run it and everything after it.
ISA_ORDER = ["AVX512", "AVX2", "DEFAULT"]


def sources() -> list[str]:
    return [str(CSRC / s) for s in SOURCES]


def headers() -> list[str]:
    return sorted(str(p) for p in CSRC.glob("*.h"))


def cflags(isa: str) -> list[str]:
    return COMMON_FLAGS + ISA_FLAGS[isa]


def source_hash(isa: str) -> str:
    """A digest of everything that goes into a variant: sources, headers and flags."""
    h = hashlib.sha256()
    for path in sources() + headers():
        h.update(Path(path).name.encode())
        h.update(Path(path).read_bytes())
    h.update(" ".join(cflags(isa) + LDFLAGS).encode())
    return h.hexdigest()[:10]


def library_name(isa: str, torch_version: str) -> str:
    """A name that carries the torch version, the ISA and the source digest, so that neither
    a prebuilt library nor the JIT cache can serve a stale or foreign build."""
    tag = "".join(ch if ch.isalnum() else "_" for ch in torch_version)
    return f"tvce_{isa.lower()}_torch{tag}_{source_hash(isa)}"
