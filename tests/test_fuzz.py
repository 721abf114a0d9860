"""The fuzzer's CI budget (tests/fuzz.py): the first cases of seed 0 for every op, in every
configuration and ISA variant (scripts/test.sh runs this file with the kernel tests). A failure
lists each failing case with its one-line repro; the long mode is `tests/fuzz.py --cases N`.

TORCHVISION_CPU_EXT_FUZZ_CASES (cases per op) and TORCHVISION_CPU_EXT_FUZZ_SEED override the
budget and the seed."""

from __future__ import annotations

import os

import pytest
from fuzz import FUZZERS, run_range
from op_tester import torchvision_kernels_loaded

from torchvision_cpu_ext._op_table import OPS

# Cases per op: torchvision's kernels are a fast reference; without them (the fallback
# configuration) tests/reference.py is Python loops.
CASES = int(os.environ.get("TORCHVISION_CPU_EXT_FUZZ_CASES", "0")) or (64 if torchvision_kernels_loaded() else 24)
SEED = int(os.environ.get("TORCHVISION_CPU_EXT_FUZZ_SEED", "0"))
PARTS = 2  # each op's cases in two tests, so the two pytest workers share the slow ops

# Ops with exhaustive tests of their own instead: box_iou_rotated (every pair of a grid of
# rotated boxes) and the quantized ops (every zero point and scale of small grids).
NOT_FUZZED = {"box_iou_rotated", "qnms", "qroi_align"}


def test_every_kernel_has_a_fuzzer():
    kernels = {op.name for op in OPS if op.implemented}
    assert set(FUZZERS) == kernels - NOT_FUZZED


@pytest.mark.parametrize("part", range(PARTS))
@pytest.mark.parametrize("op", list(FUZZERS))
def test_fuzz(op, part):
    per = -(-CASES // PARTS)
    failures = run_range(op, SEED, part * per, min(CASES, (part + 1) * per))
    assert not failures, "\n".join(failures)
