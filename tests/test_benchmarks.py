"""The benchmark command's machinery runs every op on a tiny case (no timing is asserted)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import NATIVE

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import bench_ops  # noqa: E402

# The benchmark compares with torchvision's kernels, which only the native configuration has.
pytestmark = pytest.mark.skipif(not NATIVE, reason="torchvision's compiled kernels are not loaded")


@pytest.mark.parametrize("op", sorted(bench_ops.STATEMENTS))
def test_bench_case_runs(op):
    channels = 2 * 3 * 3 if op.startswith("ps_") else 8
    case = bench_ops.Case(op, f"tiny {op}", (2, channels, 12, 14), 6, 0.25, 3)
    rows = bench_ops.bench_case(case, 1, 0.001, ["nchw", "channels_last"], [torch.float32, torch.bfloat16])
    # torchvision (fp32 only) and ours (fp32, bf16), both layouts, forward and backward.
    assert len(rows) == 2 * (2 + 4)
    assert all(r["ms"] > 0 and r["speedup_vs_torchvision_fp32_nchw"] > 0 for r in rows)


def test_bench_nms_runs(monkeypatch):
    monkeypatch.setattr(bench_ops, "NMS_CASES", [(50, False, 0.5), (50, True, 0.7)])
    rows = bench_ops.bench_nms(1, 0.001)
    assert [r["impl"] for r in rows] == ["torchvision", "ours"] * 3
    limits = dict.fromkeys(
        ["copy_gb_s_1t", "copy_gb_s_2t", "sgemm_gflop_s_1t", "sgemm_gflop_s_2t", "alloc_touch_50mb_ms"], 1.0
    )
    meta = dict.fromkeys(["cpu", "aten_cpu_capability", "isa_variant", "torch", "torchvision", "python", "command"], "")
    table = bench_ops.markdown({**meta, "limits": limits}, rows)
    assert table.count("| nms") == 4 and table.count("| batched_nms") == 2
