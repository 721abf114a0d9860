"""Op benchmarks: our kernels against torchvision's, in the same process, on shapes from real models.

    python benchmarks/bench_ops.py [--quick] [--threads 1 2] [--out benchmarks/out]

Every row times one op call with torch.utils.benchmark (median of blocked runs) at a fixed,
reported thread count; torchvision's kernel runs in the same process through
torchvision_cpu_ext.disable(). The speedup column is always against torchvision's fp32 NCHW
kernel of the same case and direction. Writes JSON and a markdown table (with the machine's
CPU, ISA, versions and measured limits) to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch.utils import benchmark

import torchvision_cpu_ext

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_limits  # noqa: E402


@dataclass
class Case:
    op: str  # roi_align, roi_pool, ps_roi_align or ps_roi_pool
    name: str
    shape: tuple[int, int, int, int]  # N, C, H, W of the feature map
    boxes: int
    scale: float
    pooled: int
    sampling_ratio: int = 2


# FPN levels of a Faster R-CNN R50-FPN at 800x1088 input, the Mask R-CNN mask head, and an
# R-FCN head (490 = 10 x 7 x 7 position-sensitive channels at stride 8).
CASES = [
    Case("roi_align", "roi_align P2 (1/4), 1000 boxes, 7x7", (2, 256, 200, 272), 1000, 0.25, 7),
    Case("roi_align", "roi_align P4 (1/16), 1000 boxes, 7x7", (2, 256, 50, 68), 1000, 1 / 16, 7),
    Case("roi_align", "roi_align mask head P2, 100 boxes, 14x14", (2, 256, 200, 272), 100, 0.25, 14),
    Case("roi_pool", "roi_pool P2 (1/4), 1000 boxes, 7x7", (2, 256, 200, 272), 1000, 0.25, 7),
    Case("ps_roi_align", "ps_roi_align R-FCN (1/8), 300 boxes, 7x7", (2, 490, 100, 136), 300, 1 / 8, 7),
    Case("ps_roi_pool", "ps_roi_pool R-FCN (1/8), 300 boxes, 7x7", (2, 490, 100, 136), 300, 1 / 8, 7),
]

# Forward and backward calls of each op; `aux` is the argmax / channel_mapping the forward made.
STATEMENTS = {
    "roi_align": (
        "torch.ops.torchvision.roi_align(x, rois, s, p, p, sr, True)",
        "torch.ops.torchvision._roi_align_backward(g, rois, s, p, p, n, c, h, w, sr, True)",
    ),
    "roi_pool": (
        "torch.ops.torchvision.roi_pool(x, rois, s, p, p)",
        "torch.ops.torchvision._roi_pool_backward(g, rois, aux, s, p, p, n, c, h, w)",
    ),
    "ps_roi_align": (
        "torch.ops.torchvision.ps_roi_align(x, rois, s, p, p, sr)",
        "torch.ops.torchvision._ps_roi_align_backward(g, rois, aux, s, p, p, sr, n, c, h, w)",
    ),
    "ps_roi_pool": (
        "torch.ops.torchvision.ps_roi_pool(x, rois, s, p, p)",
        "torch.ops.torchvision._ps_roi_pool_backward(g, rois, aux, s, p, p, n, c, h, w)",
    ),
}


def proposal_boxes(case: Case, seed: int = 0) -> torch.Tensor:
    """Proposal-like boxes in image coordinates: centres uniform over the image, sides
    log-uniform in [16, 512] px, aspect ratios in [1/2, 2]; both images of the batch."""
    g = torch.Generator().manual_seed(seed)
    n, _, h, w = case.shape
    img_h, img_w = h / case.scale, w / case.scale
    k = case.boxes
    side = torch.exp(torch.empty(k).uniform_(math.log(16), math.log(512), generator=g))
    ratio = torch.exp(torch.empty(k).uniform_(math.log(0.5), math.log(2.0), generator=g))
    bw, bh = side * ratio.sqrt(), side / ratio.sqrt()
    cx, cy = torch.rand(k, generator=g) * img_w, torch.rand(k, generator=g) * img_h
    b = torch.randint(0, n, (k,), generator=g).float()
    x1, y1 = (cx - bw / 2).clamp(0, img_w), (cy - bh / 2).clamp(0, img_h)
    x2, y2 = (cx + bw / 2).clamp(0, img_w), (cy + bh / 2).clamp(0, img_h)
    return torch.stack([b, x1, y1, x2, y2], 1)


def median_seconds(stmt: str, env: dict, min_run_time: float) -> float:
    # Timer runs at its own num_threads (default 1), so pass the thread count of the case.
    t = benchmark.Timer(stmt, globals=env, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_run_time
    )
    return t.median


def bench_case(case: Case, threads: int, min_time: float, layouts, dtypes) -> list[dict]:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    x32 = torch.randn(case.shape)
    rois = proposal_boxes(case)
    p = case.pooled
    n, c, h, w = case.shape
    c_out = c // (p * p) if case.op.startswith("ps_") else c
    grad32 = torch.randn(case.boxes, c_out, p, p)
    # Multiply-adds of the bilinear sampling (4 per sample and output element); pooling has none.
    fmas = case.boxes * c_out * p * p * case.sampling_ratio**2 * 4 if case.op.endswith("align") else 0
    rows = []
    for direction, stmt in zip(("forward", "backward"), STATEMENTS[case.op], strict=True):
        baseline = None
        for impl in ("torchvision", "ours"):
            for layout in layouts:
                for dtype in dtypes:
                    if impl == "torchvision" and dtype != torch.float32:
                        continue  # torchvision's CPU kernels of these ops have no bfloat16
                    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
                    x = x32.to(dtype).contiguous(memory_format=fmt)
                    fwd_args = (x, rois, case.scale, p, p) + ((case.sampling_ratio,) if "align" in case.op else ())
                    fwd_args += (True,) if case.op == "roi_align" else ()  # aligned
                    (torchvision_cpu_ext.disable if impl == "torchvision" else torchvision_cpu_ext.enable)()
                    try:
                        out = getattr(torch.ops.torchvision, case.op)(*fwd_args)
                        env = {
                            "torch": torch,
                            "x": x,
                            "g": grad32.to(dtype).contiguous(memory_format=fmt),
                            "aux": out[1] if isinstance(out, tuple) else None,
                            "rois": rois,
                            "s": case.scale,
                            "p": p,
                            "sr": case.sampling_ratio,
                            "n": n,
                            "c": c,
                            "h": h,
                            "w": w,
                        }
                        del out
                        sec = median_seconds(stmt, env, min_time)
                    finally:
                        torchvision_cpu_ext.enable()
                    if impl == "torchvision" and layout == "nchw":
                        baseline = sec
                    rows.append(
                        {
                            "op": case.op,
                            "case": case.name,
                            "direction": direction,
                            "impl": impl,
                            "layout": layout,
                            "dtype": str(dtype).replace("torch.", ""),
                            "threads": threads,
                            "ms": sec * 1e3,
                            "speedup_vs_torchvision_fp32_nchw": baseline / sec if baseline else None,
                            "gfma_per_s": fmas / sec / 1e9 if fmas else None,
                        }
                    )
                    print(
                        f"  {direction:8s} {impl:11s} {layout:13s} {rows[-1]['dtype']:8s} {threads}T "
                        f"{sec * 1e3:9.2f} ms  x{rows[-1]['speedup_vs_torchvision_fp32_nchw'] or 0:6.1f}",
                        flush=True,
                    )
    return rows


def nms_boxes(n: int, crowded: bool, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random boxes (centres uniform in 1000x1000, sides uniform in [1, 201]) or crowded ones
    (jittered around 40 centres, as proposals around objects), with uniform scores."""
    g = torch.Generator().manual_seed(seed)
    if crowded:
        centres = torch.rand(40, 2, generator=g) * 1000
        ctr = centres[torch.randint(0, 40, (n,), generator=g)] + torch.randn(n, 2, generator=g) * 8
        wh = 60 + torch.randn(n, 2, generator=g) * 5
    else:
        ctr = torch.rand(n, 2, generator=g) * 1000
        wh = torch.rand(n, 2, generator=g) * 200 + 1
    return torch.cat([ctr - wh / 2, ctr + wh / 2], 1), torch.rand(n, generator=g)


NMS_CASES = [(1000, False, 0.5), (1000, False, 0.7), (5000, False, 0.7), (20000, False, 0.7), (5000, True, 0.5)]


def bench_nms(threads: int, min_time: float) -> list[dict]:
    torch.set_num_threads(threads)
    rows = []
    cases = [(f"nms {n} {'crowded' if c else 'random'} boxes @{t}", n, c, t, None) for n, c, t in NMS_CASES]
    cases.append(("batched_nms 5000 boxes, 80 classes @0.5", 5000, True, 0.5, 80))
    for name, n, crowded, thr, classes in cases:
        boxes, scores = nms_boxes(n, crowded)
        env = {"torchvision": torchvision, "torch": torch, "b": boxes, "s": scores, "t": thr}
        if classes:
            env["i"] = torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(1))
            stmt = "torchvision.ops.batched_nms(b, s, i, t)"
        else:
            stmt = "torch.ops.torchvision.nms(b, s, t)"
        baseline = None
        for impl in ("torchvision", "ours"):
            (torchvision_cpu_ext.disable if impl == "torchvision" else torchvision_cpu_ext.enable)()
            try:
                sec = median_seconds(stmt, env, min_time)
            finally:
                torchvision_cpu_ext.enable()
            baseline = baseline or sec
            row = {
                "op": "nms",
                "case": name,
                "direction": "forward",
                "impl": impl,
                "layout": "-",
                "dtype": "float32",
                "threads": threads,
                "ms": sec * 1e3,
                "speedup_vs_torchvision_fp32_nchw": baseline / sec,
                "gfma_per_s": None,
            }
            rows.append(row)
            print(f"  {name:42s} {impl:11s} {threads}T {sec * 1e3:9.3f} ms  x{baseline / sec:6.1f}", flush=True)
    return rows


def markdown(meta: dict, rows: list[dict]) -> str:
    lim = meta["limits"]
    out = [
        "## torchvision_cpu_ext vs torchvision",
        "",
        f"- CPU: {meta['cpu']}, ATen capability {meta['aten_cpu_capability']}, our variant {meta['isa_variant']}",
        f"- torch {meta['torch']}, torchvision {meta['torchvision']}, Python {meta['python']}",
        f"- machine limits (measured by this command): copy bandwidth {lim['copy_gb_s_1t']:.1f} GB/s "
        f"(1 thread) / {lim['copy_gb_s_2t']:.1f} GB/s (2 threads); fp32 FMA peak (MKL sgemm) "
        f"{lim['sgemm_gflop_s_1t'] / 2:.0f} GFMA/s (1 thread) / {lim['sgemm_gflop_s_2t'] / 2:.0f} GFMA/s "
        f"(2 threads); allocating and first touching a 50 MB tensor {lim['alloc_touch_50mb_ms']:.1f} ms",
        f"- command: `{meta['command']}`",
        "",
        "| case | dir | impl | layout | dtype | threads | ms (median) | speedup vs tv fp32 NCHW | GFMA/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        sp = r["speedup_vs_torchvision_fp32_nchw"]
        gfma = "" if r["gfma_per_s"] is None else f"{r['gfma_per_s']:.1f}"
        out.append(
            f"| {r['case']} | {r['direction']} | {r['impl']} | {r['layout']} | {r['dtype']} | {r['threads']} "
            f"| {r['ms']:.2f} | {sp:.1f}x | {gfma} |"
        )
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="P4 case only, short timing: a smoke run")
    ap.add_argument("--ops", nargs="+", default=[*sorted(STATEMENTS), "nms"], help="ops to run (default: all)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--min-time", type=float, default=None, help="seconds of timing per row")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    a = ap.parse_args()
    cases = [c for c in (CASES[1:2] if a.quick else CASES) if c.op in a.ops]
    min_time = a.min_time if a.min_time is not None else (0.2 if a.quick else 1.5)
    t0 = time.time()
    info = torchvision_cpu_ext.info()
    meta = {
        "cpu": info["cpu"],
        "aten_cpu_capability": info["aten_cpu_capability"],
        "isa_variant": info["isa_variant"],
        "torch": info["torch"],
        "torchvision": info["torchvision"],
        "python": platform.python_version(),
        "command": "python " + " ".join(sys.argv),
        "limits": machine_limits(quick=a.quick),
    }
    rows = []
    for case in cases:
        for threads in a.threads:
            print(f"{case.name} ({threads} thread{'s' if threads > 1 else ''})", flush=True)
            rows += bench_case(case, threads, min_time, ["nchw", "channels_last"], [torch.float32, torch.bfloat16])
    if "nms" in a.ops:
        for threads in a.threads:
            print(f"nms ({threads} thread{'s' if threads > 1 else ''})", flush=True)
            rows += bench_nms(threads, min_time)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "ops.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    md = markdown(meta, rows)
    (a.out / "ops.md").write_text(md)
    print()
    print(md)
    print(f"wrote {a.out / 'ops.json'} and {a.out / 'ops.md'} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
