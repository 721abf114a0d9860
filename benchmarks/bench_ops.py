"""Op benchmarks: our kernels against torchvision's, in the same process, on shapes from real models.

    python benchmarks/bench_ops.py [--quick] [--threads 1 2] [--out benchmarks/out]

Every row times one op call with torch.utils.benchmark at a fixed, reported thread count;
torchvision's kernel runs in the same process through torchvision_cpu_ext.disable(), and the
configurations of a case (torchvision's and ours) are timed in turn, ROUNDS times each, a row
being the median of its rounds' medians (interleaved_seconds). The speedup column is always
against torchvision's fp32 NCHW kernel of the same case and direction, but for depthwise_conv,
which torchvision has no kernel of: its rows (bench_depthwise) are against ATen's eager
F.conv1d/2d of the same layout and dtype, with torch.compile, ONNX Runtime and OpenVINO timed in
the same rounds where they import, and an empty op of the same schema. Writes JSON and a
markdown table (with the machine's CPU, ISA, versions and measured limits) to --out. Every row
also carries `bytes` and `flops` (the model is WORK_MODEL below), which benchmarks/report.py
places on a roofline. For deform_conv2d it also measures the extra peak memory of one call of
case (b) (deform_memory; at 2 threads, and 1 for ours, whatever --threads; --no-memory skips it):
ops.json's "memory", and a table after the timings.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch.utils import benchmark

import torchvision_cpu_ext
from torchvision_cpu_ext import _op_table

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


# The traffic and work model of every row, which places it on the report's roofline. `bytes` is
# a lower bound on the memory traffic (each byte the op must read or write, counted once, as if
# the caches were perfect); `flops` counts the arithmetic that the op's definition needs.
WORK_MODEL = """\
bytes (a lower bound on memory traffic: every byte the op must read or write, counted once):
- RoI op forward: the output written (values, plus the int32 argmax / channel_mapping that
  roi_pool, ps_roi_align and ps_roi_pool return) + the rois read + the input elements the boxes
  touch, each once: the union over all boxes of the pixels the kernel reads (align ops: the
  bilinear taps of non-zero weight of every sample point; pool ops: every pixel of every bin)
  times the channels read there (all C for roi_align / roi_pool, the c_out channels of the bin's
  group for the ps ops). So never more than the input map once.
- RoI op backward: grad_input written once (N*C*H*W) + grad_output read + rois read (+ the
  argmax read by roi_pool; the ps ops' channel_mapping is recomputable, so not counted).
- nms: boxes and scores read (+ class indices for batched_nms) + the kept indices written.
- depthwise_conv forward: input + output + weights (+ bias) once each; backward (input and weight
  gradients): the output gradient, input and weights read, the input and weight gradients
  written. The empty op has no bytes or flops. A row is "large" (the issue's roofline goal,
  >= 80% of the copy bandwidth) when its bytes exceed the last-level cache (llc_bytes).
flops:
- align ops: 2 x the multiply-adds of bilinear sampling (4 per sample point, channel and bin),
  forward and backward alike; the sample weights are not counted.
- pool ops: 1 op (compare or add) per input pixel read per output element; roi_pool backward:
  1 add per output element (its scatter to the argmax); ps_roi_pool backward: 1 add per pixel
  of each bin, as its forward.
- depthwise_conv: 2 per tap and output element (a multiply-add); the backward twice that.
- nms: 10 x the IoU pairs greedy NMS compares (each kept box against every later box not yet
  suppressed when it is reached; per class for batched_nms); the sort is not counted.
line-read floor (--line-floor, RoI forwards): the time to read one byte of each 64-byte line of
the input (in the row's layout and dtype) that holds an element the forward reads, lines in
ascending address order, one contiguous run per thread, timed in turn with the row. It is what
fetching the footprint costs with nothing else to do and the best order for the hardware's
prefetchers: a practical floor for the memory-bound forwards, not a proven bound. "tv fp32 NCHW /
floor" is the speedup over torchvision that a kernel running at the floor would show in that run.
roofs: the copy bandwidth (bytes read + written by a 256 MiB copy) and MKL sgemm GFLOP/s,
measured by the same command at 1 and 2 threads. bf16 rows are measured against the fp32 peak,
and the pool ops' and nms' "flops" are comparisons, not FMAs.
"""


def _round_half_away(v: torch.Tensor) -> torch.Tensor:
    return torch.sign(v) * torch.floor(v.abs() + 0.5)  # std::round


def _pool_ranges(lo: torch.Tensor, hi: torch.Tensor, plus: int, p: int, clip: int) -> tuple[np.ndarray, np.ndarray]:
    """[start, end) of each bin along one axis ([K, p] each), by torchvision's pool geometry."""
    start, end = _round_half_away(lo), _round_half_away(hi)
    size = (end - start + plus).clamp(min=1) / p
    i = torch.arange(p + 1, dtype=lo.dtype)
    a = torch.floor(i[:-1] * size[:, None]) + start[:, None]
    b = torch.ceil(i[1:] * size[:, None]) + start[:, None]
    return a.clamp(0, clip).long().numpy(), b.clamp(0, clip).long().numpy()


def _align_taps(lo: torch.Tensor, length: torch.Tensor, p: int, sr: int, n: int) -> np.ndarray:
    """Per box and bin ([K, p]) the set of pixel indices along one axis that bilinear sampling
    reads with a non-zero weight, as a [K, p, n] bool array (torchvision's sample points)."""
    b = length / p
    v = lo[:, None, None] + torch.arange(p)[None, :, None] * b[:, None, None]
    v = v + (torch.arange(sr)[None, None, :] + 0.5) * b[:, None, None] / sr
    valid = (v >= -1) & (v <= n)
    v = v.clamp(min=0)
    low = torch.floor(v)
    collapse = low >= n - 1
    low = torch.where(collapse, torch.full_like(low, n - 1), low)
    high_used = valid & ~collapse & (v > low)
    taps = np.zeros((*v.shape[:2], n + 1), dtype=bool)
    k, i, s = np.nonzero(valid.numpy())
    taps[k, i, low.long().numpy()[k, i, s]] = True
    k, i, s = np.nonzero(high_used.numpy())
    taps[k, i, low.long().numpy()[k, i, s] + 1] = True
    return taps[..., :n]


def footprint(case: Case, rois: torch.Tensor) -> tuple[np.ndarray, int]:
    """The pixels the forward of `case` reads, as [groups, N, H, W] bool masks (a mask per bin
    for the ps ops, each bin reading its own channel group; one for the others, which read every
    channel), and for the pool ops the pixel reads summed over all output elements."""
    n, c, h, w = case.shape
    p = case.pooled
    ps = case.op.startswith("ps_")
    c_read = c // (p * p) if ps else c  # channels an output bin reads at one pixel
    batch = rois[:, 0].long().numpy()
    # One footprint mask per bin of the ps ops (each reads its own channel group), else one.
    masks = np.zeros((p * p if ps else 1, n, h, w), dtype=bool)
    pool_reads = 0
    if case.op.endswith("pool"):
        plus, clip_h, clip_w = (0, h - 1, w - 1) if ps else (1, h, w)  # ps_roi_pool never pools the last row
        s = rois[:, 1:].float() * torch.tensor(case.scale, dtype=torch.float32)
        h0, h1 = _pool_ranges(s[:, 1], s[:, 3], plus, p, clip_h)
        w0, w1 = _pool_ranges(s[:, 0], s[:, 2], plus, p, clip_w)
        rows, cols = np.maximum(h1 - h0, 0), np.maximum(w1 - w0, 0)
        pool_reads = int((rows.sum(1) * cols.sum(1)).sum()) * c_read
        for k, b in enumerate(batch):
            if ps:
                for i in range(p):
                    for j in range(p):
                        masks[i * p + j, b, h0[k, i] : h1[k, i], w0[k, j] : w1[k, j]] = True
            else:  # the bins of a box tile one rectangle
                masks[0, b, h0[k, 0] : h1[k, -1], w0[k, 0] : w1[k, -1]] = True
    else:
        r = rois[:, 1:].double() * case.scale - 0.5  # aligned=True for roi_align, always for ps
        ty = _align_taps(r[:, 1], r[:, 3] - r[:, 1], p, case.sampling_ratio, h)
        tx = _align_taps(r[:, 0], r[:, 2] - r[:, 0], p, case.sampling_ratio, w)
        if not ps:  # the box's sample grid is a product, so its taps are too
            ty, tx = ty.any(1, keepdims=True), tx.any(1, keepdims=True)
        for k, b in enumerate(batch):
            rows = [np.flatnonzero(t) for t in ty[k]]
            cols = [np.flatnonzero(t) for t in tx[k]]
            for i, ri in enumerate(rows):
                for j, cj in enumerate(cols):
                    masks[i * p + j if ps else 0, b][np.ix_(ri, cj)] = True
    return masks, pool_reads


def work_model(case: Case, rois: torch.Tensor) -> dict[str, int]:
    """The input elements the forward of `case` reads at least once (`input_elems`) and, for the
    pool ops, the pixel reads summed over all output elements (`pool_reads`); see WORK_MODEL."""
    masks, pool_reads = footprint(case, rois)
    p = case.pooled
    c_read = case.shape[1] // (p * p) if case.op.startswith("ps_") else case.shape[1]
    return {"input_elems": int(masks.sum()) * c_read, "pool_reads": pool_reads}


LINE = 64  # bytes per cache line


def input_lines(case: Case, masks: np.ndarray, layout: str, element_size: int) -> torch.Tensor:
    """Byte offsets (ascending, int64) of the cache lines of the input, in `layout`, that hold an
    element the forward of `case` reads (`masks`: footprint's): the lines the line-read floor
    reads. Assumes a line-aligned input (ATen's CPU allocator aligns to 64 bytes)."""
    n, c, h, w = case.shape
    groups = masks.shape[0]
    # Input channel ch = j * groups + g for the ps ops (bin g's group), every channel otherwise.
    elems = np.broadcast_to(masks.transpose(1, 0, 2, 3)[:, None], (n, c // groups, groups, h, w)).reshape(n, c, h, w)
    if layout == "channels_last":
        elems = elems.transpose(0, 2, 3, 1)
    per_line = LINE // element_size
    flat = np.ascontiguousarray(elems).reshape(-1)
    flat = np.concatenate([flat, np.zeros(-len(flat) % per_line, dtype=bool)])
    return torch.from_numpy(np.flatnonzero(flat.reshape(-1, per_line).any(1)) * LINE)


@functools.cache
@functools.cache
def line_floor_module():
    """benchmarks/line_floor.cpp, built on first use (torch.utils.cpp_extension's cache): its
    ops, `read_lines` among them."""
    from torch.utils.cpp_extension import load

    src = str(Path(__file__).with_name("line_floor.cpp"))
    load("tvce_bench_line_floor", [src], extra_cflags=["-O3"], is_python_module=False)
    return torch.ops.tvce_bench


def median_seconds(stmt: str, env: dict, min_run_time: float) -> float:
    # Timer runs at its own num_threads (default 1), so pass the thread count of the case.
    t = benchmark.Timer(stmt, globals=env, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_run_time
    )
    return t.median


# Each case's configurations (torchvision's and ours, every layout and dtype) are timed in turn,
# ROUNDS times each for min_time / ROUNDS, and a row is the median of its rounds: a drift of the
# machine's speed during a case (torchvision's own time moved up to 2x between runs on the
# shared VM) then falls on torchvision and on us alike instead of on one of them.
ROUNDS = 5


def interleaved_seconds(configs: list[tuple[str, str, dict]], min_time: float, inference: bool = False) -> list[float]:
    """Median seconds per call of each (impl, stmt, env) configuration, timed in turn (ROUNDS)."""
    rounds: list[list[float]] = [[] for _ in configs]
    for _ in range(ROUNDS):
        for times, (impl, stmt, env) in zip(rounds, configs, strict=True):
            kernels = torchvision_cpu_ext.disabled() if impl == "torchvision" else contextlib.nullcontext()
            with kernels, torch.inference_mode() if inference else contextlib.nullcontext():
                times.append(median_seconds(stmt, env, min_time / ROUNDS))
    return [statistics.median(t) for t in rounds]


def case_inputs(case: Case) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A RoI case's seeded float32 inputs: the feature map, its boxes and an output gradient
    (its ops' outputs have C, or C / pooled^2 for the ps ops, channels)."""
    torch.manual_seed(0)
    x32 = torch.randn(case.shape)
    rois = proposal_boxes(case)
    p, c = case.pooled, case.shape[1]
    c_out = c // (p * p) if case.op.startswith("ps_") else c
    return x32, rois, torch.randn(case.boxes, c_out, p, p)


def bench_case(case: Case, threads: int, min_time: float, layouts, dtypes, line_floor: bool = False) -> list[dict]:
    """Every configuration of `case` at `threads` threads, forward and backward; with `line_floor`
    the forward rows also carry `line_floor_ms`, the line-read floor of their layout and dtype
    (WORK_MODEL), timed in turn with them."""
    torch.set_num_threads(threads)
    x32, rois, grad32 = case_inputs(case)
    p = case.pooled
    n, c, h, w = case.shape
    c_out = grad32.size(1)
    # Multiply-adds of the bilinear sampling (4 per sample and output element); pooling has none.
    fmas = case.boxes * c_out * p * p * case.sampling_ratio**2 * 4 if case.op.endswith("align") else 0
    work = work_model(case, rois)
    out_elems = case.boxes * c_out * p * p
    rows = []
    for direction, stmt in zip(("forward", "backward"), STATEMENTS[case.op], strict=True):
        configs, labels = [], []
        for impl in ("torchvision", "ours"):
            for layout in layouts:
                for dtype in dtypes:
                    if impl == "torchvision" and dtype != torch.float32:
                        continue  # torchvision's CPU kernels of these ops have no bfloat16
                    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
                    x = x32.to(dtype).contiguous(memory_format=fmt)
                    # A reduced map runs as under autocast: roi_align with float32 rois (its
                    # autocast path, the mixed op), the other ops with rois of the map's dtype.
                    mixed = case.op == "roi_align" and dtype != torch.float32
                    r = rois if dtype == torch.float32 or mixed else rois.to(dtype)
                    op_stmt = stmt.replace("torchvision.roi_align(", "torchvision_cpu_ext._roi_align_mixed(")
                    fwd_args = (x, r, case.scale, p, p) + ((case.sampling_ratio,) if "align" in case.op else ())
                    fwd_args += (True,) if case.op == "roi_align" else ()  # aligned
                    with contextlib.nullcontext() if impl == "ours" else torchvision_cpu_ext.disabled():
                        fwd = (
                            torch.ops.torchvision_cpu_ext._roi_align_mixed
                            if mixed
                            else getattr(torch.ops.torchvision, case.op)
                        )
                        out = fwd(*fwd_args)
                    env = {
                        "torch": torch,
                        "x": x,
                        "g": grad32.to(dtype).contiguous(memory_format=fmt),
                        "aux": out[1] if isinstance(out, tuple) else None,
                        "rois": r,
                        "s": case.scale,
                        "p": p,
                        "sr": case.sampling_ratio,
                        "n": n,
                        "c": c,
                        "h": h,
                        "w": w,
                    }
                    del out
                    configs.append((impl, op_stmt if mixed else stmt, env))
                    labels.append((impl, layout, dtype, x))
        floor_of = {}  # (layout, dtype) -> its line-read floor's configuration, after the labelled ones
        if line_floor and direction == "forward":
            masks = footprint(case, rois)[0]
            for impl, layout, dtype, x in labels:
                if impl == "ours":
                    off = input_lines(case, masks, layout, x.element_size())
                    floor_of[layout, dtype] = len(configs)
                    configs.append(("floor", "m.read_lines(x, off)", {"m": line_floor_module(), "x": x, "off": off}))
        all_secs = interleaved_seconds(configs, min_time)
        secs = all_secs[: len(labels)]
        floor_ms = {key: all_secs[i] * 1e3 for key, i in floor_of.items()}
        baseline = next(
            (
                sec
                for sec, (impl, layout, _, _) in zip(secs, labels, strict=True)
                if (impl, layout) == ("torchvision", "nchw")
            ),
            None,
        )
        for sec, (impl, layout, dtype, x) in zip(secs, labels, strict=True):
            e = x.element_size()
            if direction == "forward":  # output (+ int32 argmax / channel_mapping), rois, footprint
                nbytes = out_elems * (e + (4 if case.op != "roi_align" else 0))
                nbytes += rois.nbytes + work["input_elems"] * e
                flops = 2 * fmas if fmas else work["pool_reads"]
            else:  # grad_input written, grad_output (+ roi_pool's argmax) and rois read
                nbytes = n * c * h * w * e + out_elems * (e + (4 if case.op == "roi_pool" else 0))
                nbytes += rois.nbytes
                flops = 2 * fmas if fmas else out_elems if case.op == "roi_pool" else work["pool_reads"]
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
                    "bytes": nbytes,
                    "flops": flops,
                }
            )
            floor = ""
            if (layout, dtype) in floor_ms:
                rows[-1]["line_floor_ms"] = floor_ms[layout, dtype]
                floor = f"  (line-read floor {floor_ms[layout, dtype]:.2f} ms)"
            print(
                f"  {direction:8s} {impl:11s} {layout:13s} {rows[-1]['dtype']:8s} {threads}T "
                f"{sec * 1e3:9.2f} ms  x{rows[-1]['speedup_vs_torchvision_fp32_nchw'] or 0:6.1f}{floor}",
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


def nms_pairs(boxes: torch.Tensor, scores: torch.Tensor, thr: float, idxs: torch.Tensor | None = None) -> int:
    """The IoU pairs greedy NMS compares (torchvision's loop): each box against every kept box
    ranked before it, up to and including the first that suppresses it; per class if idxs."""
    if idxs is not None:
        return sum(nms_pairs(boxes[idxs == k], scores[idxs == k], thr) for k in torch.unique(idxs))
    order = torch.sort(scores, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order))
    kept_ranks = torch.sort(rank[torchvision.ops.nms(boxes, scores, thr)]).values
    kept = boxes[order[kept_ranks]]
    pairs = 0
    for r0 in range(0, len(order), 1024):
        r = torch.arange(r0, min(r0 + 1024, len(order)))
        m = int(torch.searchsorted(kept_ranks, r[-1]))  # only kept boxes ranked before r matter
        sup = (torchvision.ops.box_iou(boxes[order[r]], kept[:m]) > thr) & (kept_ranks[None, :m] < r[:, None])
        first = torch.where(sup.any(1), sup.int().argmax(1), m)  # its suppressor, if any
        before = torch.searchsorted(kept_ranks, r)  # kept boxes ranked before it
        pairs += int(torch.minimum(before, first + 1).sum())
    return pairs


NMS_CASES = [(1000, False, 0.5), (1000, False, 0.7), (5000, False, 0.7), (20000, False, 0.7), (5000, True, 0.5)]


_NMS_WORK: dict[tuple, tuple[int, int]] = {}


def bench_nms(threads: int, min_time: float) -> list[dict]:
    torch.set_num_threads(threads)
    rows = []
    cases = [(f"nms {n} {'crowded' if c else 'random'} boxes @{t}", n, c, t, None) for n, c, t in NMS_CASES]
    cases.append(("batched_nms 5000 boxes, 80 classes @0.5", 5000, True, 0.5, 80))
    for name, n, crowded, thr, classes in cases:
        boxes, scores = nms_boxes(n, crowded)
        idxs = None
        if classes:
            idxs = torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(1))
        key = (n, crowded, thr, classes)
        if key not in _NMS_WORK:  # the same for every thread count
            pairs = nms_pairs(boxes, scores, thr, idxs)
            kept = len(
                torchvision.ops.batched_nms(boxes, scores, idxs, thr)
                if classes
                else torchvision.ops.nms(boxes, scores, thr)
            )
            # Boxes and scores (+ class indices) read, kept indices written; ~10 flops per IoU pair.
            _NMS_WORK[key] = (boxes.nbytes + scores.nbytes + (idxs.nbytes if classes else 0) + kept * 8, 10 * pairs)
        nbytes, flops = _NMS_WORK[key]
        env = {"torchvision": torchvision, "torch": torch, "b": boxes, "s": scores, "t": thr}
        if classes:
            env["i"] = idxs
            stmt = "torchvision.ops.batched_nms(b, s, i, t)"
        else:
            stmt = "torch.ops.torchvision.nms(b, s, t)"
        secs = interleaved_seconds([(impl, stmt, env) for impl in ("torchvision", "ours")], min_time)
        baseline = secs[0]
        for impl, sec in zip(("torchvision", "ours"), secs, strict=True):
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
                "bytes": nbytes,
                "flops": flops,
            }
            rows.append(row)
            print(f"  {name:42s} {impl:11s} {threads}T {sec * 1e3:9.3f} ms  x{baseline / sec:6.1f}", flush=True)
    return rows


# FrozenBatchNorm2d layers of the R50-FPN backbone at an 800x1216 input: the stem (after conv1),
# layer1 (its 64- and 256-channel maps) and layer3.
FBN_SHAPES = [(1, 64, 400, 608), (1, 256, 200, 304), (1, 64, 200, 304), (1, 1024, 50, 76)]


def bench_frozen_bn(threads: int, min_time: float, shapes=None) -> list[dict]:
    """torchvision.ops.FrozenBatchNorm2d's forward (inference): torchvision's expression against
    our fused kernel, NCHW and channels_last, float32 and bfloat16 input (float32 output in both:
    the promoted dtype, outside autocast)."""
    from torchvision.ops import FrozenBatchNorm2d

    torch.set_num_threads(threads)
    rows = []
    for shape in shapes or FBN_SHAPES:
        n, c, h, w = shape
        m = FrozenBatchNorm2d(c)
        for b in m.buffers():
            b.copy_(torch.rand(c) + 0.5)
        x32 = torch.randn(shape)
        name = f"frozen_batch_norm {list(shape)}"
        labels = [
            (impl, layout, dtype)
            for impl in ("torchvision", "ours")
            for layout in ("nchw", "channels_last")
            for dtype in (torch.float32, torch.bfloat16)
        ]
        xs = {
            (layout, dtype): x32.to(dtype).contiguous(
                memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format
            )
            for _, layout, dtype in labels
        }
        configs = [(impl, "m(x)", {"m": m, "x": xs[layout, dtype]}) for impl, layout, dtype in labels]
        secs = interleaved_seconds(configs, min_time, inference=True)
        baseline = secs[0]  # torchvision, NCHW, float32
        for sec, (impl, layout, dtype) in zip(secs, labels, strict=True):
            x = xs[layout, dtype]
            rows.append(
                {
                    "op": "frozen_batch_norm",
                    "case": name,
                    "direction": "forward",
                    "impl": impl,
                    "layout": layout,
                    "dtype": str(dtype).replace("torch.", ""),
                    "threads": threads,
                    "ms": sec * 1e3,
                    "speedup_vs_torchvision_fp32_nchw": baseline / sec,
                    "gfma_per_s": None,
                    # The input read and the float32 output written, once each; a multiply
                    # and an add per element.
                    "bytes": x.numel() * (x.element_size() + 4),
                    "flops": 2 * x.numel(),
                }
            )
            print(
                f"  {name:36s} {impl:11s} {layout:13s} {rows[-1]['dtype']:8s} {threads}T "
                f"{sec * 1e3:9.2f} ms  x{baseline / sec:6.1f}",
                flush=True,
            )
    return rows


# deform_conv2d (issue 18): (a) a 64-channel 3x3 layer, DCNv2 and DCNv1; (b) the deformable 3x3
# convolutions of detectron2's DCNv2 R50 (res3-res5 at an 800x1216 image), batch 1 and 2.
DEFORM_CASES = [
    ((1, 64, 64, 64), True),
    ((1, 64, 64, 64), False),
    *[((n, c, h, w), True) for n in (1, 2) for c, h, w in ((128, 100, 152), (256, 50, 76), (512, 25, 38))],
]


def deform_inputs(shape, use_mask: bool, seed: int = 0):
    """A 3x3, C -> C, stride 1, padding 1 layer's (input, weight, offset, mask, bias) in float32
    NCHW: offsets of a few pixels (fractional samples, some outside), mask in (0, 1)."""
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    x = torch.randn(shape, generator=g)
    weight = torch.randn(c, c, 3, 3, generator=g) / math.sqrt(9 * c)
    offset = torch.randn(n, 18, h, w, generator=g) * 2
    mask = torch.rand(n, 9, h, w, generator=g) if use_mask else torch.zeros(n, 1)
    return x, weight, offset, mask, torch.randn(c, generator=g)


def bench_deform_conv2d(threads: int, min_time: float, cases=None) -> list[dict]:
    """torchvision::deform_conv2d and its backward: torchvision's fp32 NCHW kernel, ours (NCHW and
    channels_last fp32, channels_last bf16), and ATen's plain convolution of the same shape
    (`aten_conv2d`: F.conv2d forward; convolution_backward for input and weight gradients)."""
    torch.set_num_threads(threads)
    rows = []
    labels = [
        ("torchvision", "nchw", torch.float32),
        ("ours", "nchw", torch.float32),
        ("ours", "channels_last", torch.float32),
        ("ours", "channels_last", torch.bfloat16),
        ("aten_conv2d", "nchw", torch.float32),
        ("aten_conv2d", "channels_last", torch.float32),
        ("aten_conv2d", "channels_last", torch.bfloat16),
    ]
    fwd = "torch.ops.torchvision.deform_conv2d(x, w, off, m, b, 1, 1, 1, 1, 1, 1, 1, 1, use_mask)"
    bwd = "torch.ops.torchvision._deform_conv2d_backward(g, x, w, off, m, b, 1, 1, 1, 1, 1, 1, 1, 1, use_mask)"
    conv_fwd = "torch.nn.functional.conv2d(x, w, b, 1, 1)"
    conv_bwd = (
        "torch.ops.aten.convolution_backward(g, x, w, [w.shape[0]], [1, 1], [1, 1], [1, 1], False, [0, 0], 1, "
        "[True, True, False])"
    )
    for shape, use_mask in cases or DEFORM_CASES:
        x32, w32, off, mask, b32 = deform_inputs(shape, use_mask)
        n, c, h, wd = shape
        name = f"deform_conv2d {list(shape)} 3x3 {'DCNv2' if use_mask else 'DCNv1'}"
        envs = {}
        for impl, layout, dtype in labels:
            fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            x = x32.to(dtype).contiguous(memory_format=fmt)
            env = {"torch": torch, "x": x, "w": w32.to(dtype), "b": b32.to(dtype), "use_mask": use_mask}
            env["off"], env["m"] = off.to(dtype), mask.to(dtype)
            env["g"] = torch.randn(n, c, h, wd).to(dtype).contiguous(memory_format=fmt)
            envs[impl, layout, dtype] = env
        for direction in ("forward", "backward"):
            _say(f"{name} {direction}", threads)
            stmts = {"aten_conv2d": conv_bwd if direction == "backward" else conv_fwd}
            configs = [
                (impl, stmts.get(impl, bwd if direction == "backward" else fwd), envs[impl, layout, dtype])
                for impl, layout, dtype in labels
            ]
            secs = interleaved_seconds(configs, min_time, inference=direction == "forward")
            baseline = secs[0]
            conv = {
                (layout, dtype): sec
                for sec, (impl, layout, dtype) in zip(secs, labels, strict=True)
                if impl == "aten_conv2d"
            }
            for sec, (impl, layout, dtype) in zip(secs, labels, strict=True):
                fma = n * c * c * 9 * h * wd * (2 if direction == "backward" else 1)
                rows.append(
                    {
                        "op": "deform_conv2d",
                        "case": name,
                        "direction": direction,
                        "impl": impl,
                        "layout": layout,
                        "dtype": str(dtype).replace("torch.", ""),
                        "threads": threads,
                        "ms": sec * 1e3,
                        "speedup_vs_torchvision_fp32_nchw": baseline / sec,
                        "vs_aten_conv2d": sec / conv[layout, dtype],
                        "gfma_per_s": fma / sec / 1e9,
                        # The input, output (and in the backward the gradients) once each.
                        "bytes": (2 if direction == "forward" else 4) * n * c * h * wd * x32.element_size(),
                        "flops": 2 * fma,
                    }
                )
                print(
                    f"  {impl:11s} {layout:13s} {rows[-1]['dtype']:8s} {threads}T {sec * 1e3:9.2f} ms"
                    f"  x{baseline / sec:6.1f} vs tv, {rows[-1]['vs_aten_conv2d']:5.2f}x conv2d",
                    flush=True,
                )
    return rows


def _bench_deform_conv2d(a: argparse.Namespace, threads: int, min_time: float) -> list[dict]:
    return bench_deform_conv2d(threads, min_time, [DEFORM_CASES[0], DEFORM_CASES[3]] if a.quick else None)


# Peak memory (issue 18: a call's extra memory bounded by a constant, not by batch x columns):
# case (b) only, forward and backward, torchvision's kernel and ours. One fresh process (under
# peak_memory.MALLOC_ENV) measures every configuration of every case in turn, each call after a
# warm-up call of the same configuration on a 16 x 16 map (lazy loading, thread pools: a
# full-size warm-up read the same to within 1 MiB, and doubled the time). Blocks of 128 KiB and more
# are unmapped on free in that process, and our output pool is emptied before each call, so an
# earlier configuration leaves nothing large for a later one to reuse.
DEFORM_MEMORY_CASES = [shape for shape, use_mask in DEFORM_CASES if use_mask and shape[1] >= 128]


def deform_memory_worker(shapes, warmup_hw: int | None = 16) -> dict:
    """In a MALLOC_ENV process: {"rows": the extra peak memory of each MEMORY_VARIANTS
    configuration's forward and backward call on the DCNv2 layers `shapes`, "calibration":
    peak_memory.calibration()}. Each call follows a warm-up call of its configuration on a
    warmup_hw x warmup_hw map (None: the same shape)."""
    from peak_memory import MEMORY_VARIANTS, calibration, extra_peak

    rows = []
    calib = calibration()
    for shape in shapes:
        rows += _deform_memory_case(tuple(shape), warmup_hw, MEMORY_VARIANTS, extra_peak)
    return {"rows": rows, "calibration": calib}


def _deform_call(direction: str, dtype: torch.dtype, fmt: torch.memory_format, inputs):
    """A DCNv2 layer's forward or backward call on `inputs` (deform_inputs') in `dtype` and `fmt`."""
    x32, w32, off32, mask32, b32 = inputs
    x = x32.to(dtype).contiguous(memory_format=fmt)
    w, off, m, b = (t.to(dtype) for t in (w32, off32, mask32, b32))
    tv, args = torch.ops.torchvision, (1, 1, 1, 1, 1, 1, 1, 1, True)
    if direction == "forward":
        return lambda: tv.deform_conv2d(x, w, off, m, b, *args)
    g = torch.randn(x.shape).to(dtype).contiguous(memory_format=fmt)
    return lambda: tv._deform_conv2d_backward(g, x, w, off, m, b, *args)


def _deform_memory_case(shape, warmup_hw, variants, extra_peak) -> list[dict]:
    n, c, h, wd = shape
    name = f"deform_conv2d {list(shape)} 3x3 DCNv2"
    full = deform_inputs(shape, True)
    small = deform_inputs((n, c, warmup_hw, warmup_hw), True) if warmup_hw else full
    rows = []
    for direction in ("forward", "backward"):
        for impl, layout, dtype_name, threads in variants:
            torch.set_num_threads(threads)
            dtype = getattr(torch, dtype_name)
            fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            call = _deform_call(direction, dtype, fmt, full)
            kernels = torchvision_cpu_ext.disabled() if impl == "torchvision" else contextlib.nullcontext()
            with kernels, torch.inference_mode() if direction == "forward" else contextlib.nullcontext():
                _deform_call(direction, dtype, fmt, small)()  # warm-up: lazy loading, thread pools, library state
                t0 = time.perf_counter()
                res = extra_peak(call, torchvision_cpu_ext.empty_cache)
                seconds = time.perf_counter() - t0
            del call
            rows.append(
                {
                    "op": "deform_conv2d",
                    "case": name,
                    "direction": direction,
                    "impl": impl,
                    "layout": layout,
                    "dtype": dtype_name,
                    "threads": threads,
                    **res,
                    # torchvision's im2col buffer (all N images: its parallel_imgs is min(N, 32) here).
                    "columns_bytes": c * 9 * h * wd * n * 4,
                    "call_ms": seconds * 1e3,
                }
            )
    return rows


def deform_memory(cases=None, processes: int = 1, warmup_hw: int | None = 16) -> dict:
    """deform_memory_worker of the cases (default DEFORM_MEMORY_CASES) in `processes` fresh
    processes (cases split in turn): {"rows": [...], "calibration": [one per process], "note":
    peak_memory.MEMORY_NOTE}."""
    import subprocess

    from peak_memory import MALLOC_ENV, MEMORY_NOTE, MIB

    paths = [str(Path(torchvision_cpu_ext.__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]
    rows, cals = [], []
    cases = [tuple(s) for s in cases or DEFORM_MEMORY_CASES]
    for part in [cases[i::processes] for i in range(processes) if cases[i::processes]]:
        print(f"deform_conv2d peak memory of {', '.join(str(list(s)) for s in part)} (a fresh process)", flush=True)
        code = (
            f"import sys; sys.path[:0] = {paths!r}; import json, bench_ops; "
            f"print('RESULT ' + json.dumps(bench_ops.deform_memory_worker({part!r}, {warmup_hw!r})))"
        )
        env = {**os.environ, **MALLOC_ENV}
        p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
        result = [line for line in p.stdout.splitlines() if line.startswith("RESULT ")]
        if p.returncode != 0 or not result:
            raise RuntimeError(f"peak-memory process for {part} failed ({p.returncode}):\n{p.stderr[-3000:]}")
        res = json.loads(result[-1][len("RESULT ") :])
        cals.append(res["calibration"])
        for r in res["rows"]:
            print(
                f"  {r['case'][14:32]:18s} {r['direction']:8s} {r['impl']:11s} {r['layout']:13s} {r['dtype']:8s} "
                f"{r['threads']}T "
                f"extra {r['extra_peak_bytes'] / MIB:8.1f} MiB (columns {r['columns_bytes'] / MIB:.1f})",
                flush=True,
            )
        rows += res["rows"]
    return {"rows": rows, "calibration": cals, "note": MEMORY_NOTE}


# Depthwise convolution (issue 19): our op against ATen's eager convolution of the same call
# (`F.conv1d/2d(..., groups=C)`) and the peers that install from the registry, all in one run.
@dataclass(frozen=True)
class DwCase:
    """A depthwise convolution, C -> C channels (groups = C), padding kernel // 2, dilation 1."""

    shape: tuple[int, ...]  # N, C, L (conv1d) or N, C, H, W (conv2d)
    kernel: int
    stride: int = 1
    bias: bool = False

    @property
    def dims(self) -> int:
        return len(self.shape) - 2

    @property
    def padding(self) -> int:
        return self.kernel // 2

    @property
    def name(self) -> str:
        k = "x".join([str(self.kernel)] * self.dims)
        return f"depthwise_conv{self.dims}d {list(self.shape)} k{k} s{self.stride}{' bias' if self.bias else ''}"

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.shape[1], 1) + (self.kernel,) * self.dims

    @property
    def out_shape(self) -> tuple[int, ...]:
        spatial = [(s + 2 * self.padding - self.kernel) // self.stride + 1 for s in self.shape[2:]]
        return (*self.shape[:2], *spatial)


# The seed case (issue 19: a small depthwise conv1d called in a tight eager loop) with kernels 5
# and 7 and batch 8, through an nn.Conv1d with bias; and the depthwise layers of
# MobileNetV2/V3 and EfficientNet-B0 at 224x224 (and seed 001's batched layer). torchvision's
# builds those without bias (Conv2dNormActivation: a batch norm follows), so the 2-D rows have none.
DW1D_CASES = [
    DwCase((1, 64, 96), 3, bias=True),
    DwCase((1, 64, 96), 5, bias=True),
    DwCase((1, 64, 96), 7, bias=True),
    DwCase((8, 64, 96), 3, bias=True),
]
DW2D_CASES = [
    DwCase((1, 32, 112, 112), 3),
    DwCase((1, 96, 112, 112), 3, stride=2),
    DwCase((1, 144, 56, 56), 3),
    DwCase((1, 240, 28, 28), 5),
    DwCase((1, 672, 14, 14), 5),
    DwCase((1, 960, 7, 7), 5),
    DwCase((8, 96, 112, 112), 3),
]
DW_FORWARD = [
    ("nchw", torch.float32),
    ("nchw", torch.bfloat16),
    ("channels_last", torch.float32),
    ("channels_last", torch.bfloat16),
]
DW_BACKWARD = [("nchw", torch.float32), ("channels_last", torch.float32)]
# Everything beyond ours and ATen eager, in the order a row lists them. The empty op is
# benchmarks/empty_op.cpp (built on first use); the peers run where they import (the `peers`
# extra of setup.py), ONNX Runtime and OpenVINO on float32 NCHW input only (an ONNX Conv's
# layout; both pick their own internal layout), and are skipped with a note otherwise.
DW_EXTRAS = ("empty_op", "torch.compile", "onnxruntime", "openvino")
DW_PEERS = ("torch.compile", "onnxruntime", "openvino")
# What each impl of a depthwise row calls; `{d}` is 1 or 2.
DW_CALLS = {
    "ours": "torchvision_cpu_ext.ops.depthwise_conv{d}d(x, w, b, stride, padding)",
    "ours_module": "torchvision_cpu_ext.optimize(nn.Conv{d}d(...))(x)",
    "ours_op": "torch.ops.torchvision_cpu_ext.depthwise_conv{d}d.default(x, w, b, [s], [p], [1])",
    "aten": "F.conv{d}d(x, w, b, stride, padding, 1, C)",
    "aten_module": "nn.Conv{d}d(C, C, k, stride, padding, groups=C)(x)",
    "empty_op": "an empty op of the same schema (C++ kernel: allocates the output), called as ours_op",
    "torch.compile": "torch.compile(F.conv{d}d(...), dynamic=False): Inductor, default mode, warmed up",
    "onnxruntime": "onnxruntime InferenceSession.run of the exported Conv (opset 17), CPU provider",
    "openvino": "openvino compiled model (from the same ONNX, f32 precision hint, latency hint) infer",
}


def _version(module: str) -> str | None:
    import importlib

    try:
        return importlib.import_module(module).__version__
    except ImportError:
        return None


def dw_peer_versions() -> dict[str, str | None]:
    """Each peer's version, None where it cannot run: it does not import, or (ONNX Runtime and
    OpenVINO) onnx, which torch's ONNX exporter needs, does not."""
    onnx = _version("onnx")
    return {"torch.compile": torch.__version__} | {p: onnx and _version(p) for p in ("onnxruntime", "openvino")}


def dw_peer_notes() -> list[str]:
    """Why a peer's rows are missing from a run, for the report."""
    missing = [name for name, version in dw_peer_versions().items() if version is None]
    why = {name: "not installed" if _version(name) is None else "no onnx (the export needs it)" for name in missing}
    return [f"{name}: {why[name]}, no rows (`pip install '.[peers]'` installs it)" for name in missing]


@functools.cache
def empty_op_module():
    """benchmarks/empty_op.cpp, built on first use (torch.utils.cpp_extension's cache)."""
    from torch.utils.cpp_extension import load

    src = str(Path(__file__).with_name("empty_op.cpp"))
    load("tvce_bench_empty_op", [src], extra_cflags=["-O3"], is_python_module=False)
    return torch.ops.tvce_bench_empty


def dw_inputs(case: DwCase, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """A case's seeded float32 (input, weight, bias or None, output gradient), contiguous."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(case.shape, generator=g)
    w = torch.randn(case.weight_shape, generator=g) / case.kernel**case.dims
    b = torch.randn(case.shape[1], generator=g) if case.bias else None
    return x, w, b, torch.randn(case.out_shape, generator=g)


def dw_work(case: DwCase, element_size: int, direction: str) -> tuple[int, int]:
    """(bytes, flops) of a call: forward input + output + weights (+ bias) once each; backward
    (input and weight gradients) the output gradient, input and weight read, the input and weight
    gradients written. A multiply-add per tap and output element, twice in the backward."""
    n_in, n_out, n_w = math.prod(case.shape), math.prod(case.out_shape), math.prod(case.weight_shape)
    fma = n_out * case.kernel**case.dims
    if direction == "forward":
        return (n_in + n_out + n_w + (case.shape[1] if case.bias else 0)) * element_size, 2 * fma
    return (n_out + 2 * n_in + 2 * n_w) * element_size, 4 * fma


class _DwConv(torch.nn.Module):
    """The single convolution the ONNX peers run (and export)."""

    def __init__(self, case: DwCase, w: torch.Tensor, b: torch.Tensor | None) -> None:
        super().__init__()
        self.case, self.w, self.b = case, torch.nn.Parameter(w), None if b is None else torch.nn.Parameter(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = torch.nn.functional.conv1d if self.case.dims == 1 else torch.nn.functional.conv2d
        return conv(x, self.w, self.b, self.case.stride, self.case.padding, 1, self.case.shape[1])


_DW_ONNX: dict[DwCase, bytes] = {}


def dw_onnx(case: DwCase, w: torch.Tensor, b: torch.Tensor | None) -> bytes:
    """The case's convolution exported to ONNX (opset 17, input "x", output "y"), once per case."""
    import io
    import warnings

    if case not in _DW_ONNX:
        buf = io.BytesIO()
        with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice
            warnings.simplefilter("ignore")
            torch.onnx.export(
                _DwConv(case, w, b).eval(),
                (torch.zeros(case.shape),),
                buf,
                opset_version=17,
                dynamo=False,
                input_names=["x"],
                output_names=["y"],
            )
        _DW_ONNX[case] = buf.getvalue()
    return _DW_ONNX[case]


def dw_peer_config(peer: str, case: DwCase, x: torch.Tensor, w, b, threads: int) -> tuple[str, dict]:
    """(statement, env) of an ONNX peer running the case on float32 NCHW `x` at `threads`."""
    model = dw_onnx(case, w, b)
    feed = x.numpy()
    if peer == "onnxruntime":
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        return "sess.run(None, feed)", {"sess": sess, "feed": {"x": feed}}
    import openvino as ov

    config = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
    core = ov.Core()
    req = core.compile_model(core.read_model(model), "CPU", config).create_infer_request()
    return "req.infer(feed, share_inputs=True)", {"req": req, "feed": {0: feed}}


@functools.cache
def dw_compiled(case: DwCase):
    """torch.compile (Inductor, default mode, static shapes) of the case's F.conv1d/2d call: one
    per case, its graphs (one per layout and dtype) compiled once for every thread count."""
    conv = torch.nn.functional.conv1d if case.dims == 1 else torch.nn.functional.conv2d
    s, p, c = case.stride, case.padding, case.shape[1]
    return torch.compile(lambda x, w, b: conv(x, w, b, s, p, 1, c), dynamic=False)


def dw_path(case: DwCase, layout: str, dtype: torch.dtype) -> str:
    """torchvision_cpu_ext.depthwise_path() of the case at the current thread count: which of our
    paths its forward takes."""
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.empty(case.shape, dtype=dtype, device="meta").contiguous(memory_format=fmt)
    w = torch.empty(case.weight_shape, dtype=dtype, device="meta")
    return torchvision_cpu_ext.depthwise_path(x, w, case.stride, case.padding)


def bench_depthwise(threads: int, min_time: float, cases=None, extras=DW_EXTRAS) -> list[dict]:
    """Each depthwise case (default DW1D_CASES + DW2D_CASES) at `threads`: ours, ATen eager and
    `extras` (of DW_EXTRAS; peers that do not import are left out), timed in turn
    (interleaved_seconds). conv1d cases: float32 forward, ours through an nn.Conv1d swapped by
    torchvision_cpu_ext.optimize() (the issue's measure) and the op called directly, ATen as
    F.conv1d and as nn.Conv1d. conv2d cases: the forward in every DW_FORWARD layout and dtype, the
    backward (input and weight gradients, through autograd of one retained graph) in DW_BACKWARD's.
    Forwards run in inference mode. Every row has `speedup_vs_aten`: ATen eager's (F.conv1d/2d)
    time over the row's, same case, direction, layout and dtype."""
    torch.set_num_threads(threads)
    available = {k for k, v in dw_peer_versions().items() if v is not None}
    extras = [e for e in extras if e not in DW_PEERS or e in available]
    rows = []
    # One compiled graph per case, layout and dtype, all of the same lambda's code.
    with torch._dynamo.config.patch(recompile_limit=1024, accumulated_recompile_limit=4096):
        for case in DW1D_CASES + DW2D_CASES if cases is None else cases:
            for direction in ("forward",) if case.dims == 1 else ("forward", "backward"):
                _say(f"{case.name} {direction}", threads)
                if direction == "forward":
                    labels, configs = _dw_forward_configs(case, threads, extras)
                else:
                    labels, configs = _dw_backward_configs(case)
                secs = interleaved_seconds(configs, min_time, inference=direction == "forward")
                rows += _dw_rows(case, direction, threads, labels, secs)
    return rows


def _dw_forward_configs(case: DwCase, threads: int, extras) -> tuple[list[tuple], list[tuple]]:
    """(labels, configurations) of a case's forward; a label is (impl, layout, dtype)."""
    from torch import nn

    import torchvision_cpu_ext.ops as ext_ops

    x32, w32, b32, _ = dw_inputs(case)
    d, s, p, c = case.dims, case.stride, case.padding, case.shape[1]
    conv = getattr(torch.nn.functional, f"conv{d}d")
    labels, configs = [], []

    def add(impl: str, layout: str, dtype: torch.dtype, stmt: str, env: dict) -> None:
        labels.append((impl, layout, dtype))
        configs.append((impl, stmt, env))

    for layout, dtype in DW_FORWARD if d == 2 else [("ncl", torch.float32)]:
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        x = x32.to(dtype).contiguous(memory_format=fmt)
        w, b = w32.to(dtype), None if b32 is None else b32.to(dtype)
        env = {"x": x, "w": w, "b": b, "s": [s] * d, "p": [p] * d, "d": [1] * d}
        first = layout in ("nchw", "ncl") and dtype == torch.float32
        if d == 1:
            module = nn.Conv1d(c, c, case.kernel, s, p, groups=c, bias=case.bias).eval()
            with torch.no_grad():
                module.weight.copy_(w)
                if b is not None:
                    module.bias.copy_(b)
            # Swapped inside a container, as optimize() swaps a model's layers.
            swapped = torchvision_cpu_ext.optimize(nn.Sequential(copy.deepcopy(module)).eval())[0]
            if type(swapped) is nn.Conv1d:
                raise RuntimeError("torchvision_cpu_ext.optimize() left a depthwise nn.Conv1d in place")
            add("ours_module", layout, dtype, "m(x)", {"m": swapped, "x": x})
            op = torch.ops.torchvision_cpu_ext.depthwise_conv1d.default
            add("ours_op", layout, dtype, "op(x, w, b, s, p, d)", {**env, "op": op})
        else:
            ours = getattr(ext_ops, f"depthwise_conv{d}d")
            add("ours", layout, dtype, f"ours(x, w, b, {s}, {p})", {**env, "ours": ours})
        add("aten", layout, dtype, f"conv(x, w, b, {s}, {p}, 1, {c})", {**env, "conv": conv})
        if d == 1:
            add("aten_module", layout, dtype, "m(x)", {"m": module, "x": x})
        if "empty_op" in extras and first:
            op = getattr(empty_op_module(), f"depthwise_conv{d}d").default
            add("empty_op", layout, dtype, "op(x, w, b, s, p, d)", {**env, "op": op})
        if "torch.compile" in extras:
            fn = dw_compiled(case)
            with torch.inference_mode():  # compiled and warmed up in the mode it is timed in
                fn(x, w, b)
                fn(x, w, b)
            add("torch.compile", layout, dtype, "fn(x, w, b)", {"fn": fn, "x": x, "w": w, "b": b})
        for peer in ("onnxruntime", "openvino"):
            if peer in extras and first:
                add(peer, layout, dtype, *dw_peer_config(peer, case, x, w, b, threads))
    return labels, configs


def _dw_backward_configs(case: DwCase) -> tuple[list[tuple], list[tuple]]:
    """(labels, configurations) of a conv2d case's backward: the input and weight gradients of
    ATen's and of our op, by autograd of one forward graph each (retained, run again and again)."""
    import torchvision_cpu_ext.ops as ext_ops

    x32, w32, _, g32 = dw_inputs(case)
    s, p, c = case.stride, case.padding, case.shape[1]
    labels, configs = [], []
    for layout, dtype in DW_BACKWARD:
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        g = g32.to(dtype).contiguous(memory_format=fmt)
        for impl in ("ours", "aten"):
            x = x32.to(dtype).contiguous(memory_format=fmt).requires_grad_()
            w = w32.to(dtype).requires_grad_()
            if impl == "ours":
                y = ext_ops.depthwise_conv2d(x, w, None, s, p)
            else:
                y = torch.nn.functional.conv2d(x, w, None, s, p, 1, c)
            env = {"torch": torch, "y": y, "x": x, "w": w, "g": g}
            labels.append((impl, layout, dtype))
            configs.append((impl, "torch.autograd.grad(y, (x, w), g, retain_graph=True)", env))
    return labels, configs


def _dw_rows(case: DwCase, direction: str, threads: int, labels: list[tuple], secs: list[float]) -> list[dict]:
    aten = {(layout, dtype): sec for sec, (impl, layout, dtype) in zip(secs, labels, strict=True) if impl == "aten"}
    best: dict[tuple, tuple[float, str]] = {}  # (layout, dtype) -> the fastest convolution (not the empty op)
    for sec, (impl, layout, dtype) in zip(secs, labels, strict=True):
        if impl != "empty_op" and sec < best.get((layout, dtype), (math.inf, ""))[0]:
            best[layout, dtype] = (sec, impl)
    rows = []
    for sec, (impl, layout, dtype) in zip(secs, labels, strict=True):
        element_size = torch.finfo(dtype).bits // 8
        nbytes, flops = dw_work(case, element_size, direction) if impl != "empty_op" else (None, None)
        rows.append(
            {
                "op": "depthwise_conv",
                "case": case.name,
                "direction": direction,
                "impl": impl,
                "layout": layout,
                "dtype": str(dtype).replace("torch.", ""),
                "threads": threads,
                "ms": sec * 1e3,
                "speedup_vs_torchvision_fp32_nchw": None,  # no torchvision kernel: see speedup_vs_aten
                "speedup_vs_aten": aten[layout, dtype] / sec,
                "fastest": best[layout, dtype][1],
                "gfma_per_s": flops / 2 / sec / 1e9 if flops else None,
                "bytes": nbytes,
                "flops": flops,
                "call": DW_CALLS[impl].format(d=case.dims),
            }
        )
        if impl.startswith("ours") and direction == "forward":
            rows[-1]["path"] = dw_path(case, layout, dtype)
        print(
            f"  {impl:13s} {layout:13s} {rows[-1]['dtype']:8s} {threads}T {sec * 1e6:10.1f} us"
            f"  x{rows[-1]['speedup_vs_aten']:6.2f} vs ATen",
            flush=True,
        )
    return rows


def _bench_depthwise(a: argparse.Namespace, threads: int, min_time: float) -> list[dict]:
    return bench_depthwise(threads, min_time, [DW1D_CASES[0], DW2D_CASES[5]] if a.quick else None)


def _say(what: str, threads: int) -> None:
    print(f"{what} ({threads} thread{'s' if threads > 1 else ''})", flush=True)


def bench_roi_op(op: str):
    def bench(a: argparse.Namespace, threads: int, min_time: float) -> list[dict]:
        rows = []
        for case in [c for c in (CASES[1:2] if a.quick else CASES) if c.op == op]:
            _say(case.name, threads)
            rows += bench_case(
                case, threads, min_time, ["nchw", "channels_last"], [torch.float32, torch.bfloat16], a.line_floor
            )
        return rows

    return bench


def _bench_nms(a: argparse.Namespace, threads: int, min_time: float) -> list[dict]:
    _say("nms", threads)
    return bench_nms(threads, min_time)


def _bench_frozen_bn(a: argparse.Namespace, threads: int, min_time: float) -> list[dict]:
    _say("frozen_batch_norm", threads)
    return bench_frozen_bn(threads, min_time, FBN_SHAPES[1:2] if a.quick else None)


# One entry per benchmarked row of the op table (torchvision_cpu_ext/_op_table.py), in its order.
BENCHES = {
    **{op: bench_roi_op(op) for op in STATEMENTS},
    "nms": _bench_nms,
    "frozen_batch_norm": _bench_frozen_bn,
    "deform_conv2d": _bench_deform_conv2d,
    "depthwise_conv": _bench_depthwise,
}
ALL_OPS = _op_table.benchmarked()
assert sorted(BENCHES) == sorted(ALL_OPS), f"benchmark cases {sorted(BENCHES)} != op table {sorted(ALL_OPS)}"


def markdown(meta: dict, rows: list[dict], memory: dict | None = None) -> str:
    """The timing table of `rows`, then deform_conv2d's peak-memory table if `memory`."""
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
        "| case | dir | impl | layout | dtype | threads | ms (median) | speedup vs tv fp32 NCHW | GFMA/s "
        "| line-read floor ms (tv fp32 NCHW / floor) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        sp = r["speedup_vs_torchvision_fp32_nchw"]
        gfma = "" if r["gfma_per_s"] is None else f"{r['gfma_per_s']:.1f}"
        floor = ""
        if r.get("line_floor_ms") and sp:
            floor = f"{r['line_floor_ms']:.2f} ({sp * r['ms'] / r['line_floor_ms']:.1f}x)"
        # Ops that torchvision has no kernel of (depthwise_conv) compare with ATen eager instead.
        speedup = f"{sp:.1f}x" if sp else f"{r['speedup_vs_aten']:.2f}x vs ATen" if r.get("speedup_vs_aten") else ""
        ms = f"{r['ms']:.2f}" if r["ms"] >= 0.1 else f"{r['ms']:.4f}"
        out.append(
            f"| {r['case']} | {r['direction']} | {r['impl']} | {r['layout']} | {r['dtype']} | {r['threads']} "
            f"| {ms} | {speedup} | {gfma} | {floor} |"
        )
    if memory:
        from peak_memory import memory_markdown

        out += ["", "## deform_conv2d: extra peak memory per call", "", memory_markdown(memory).rstrip()]
    return "\n".join(out) + "\n"


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The arguments that choose what is run (shared with benchmarks/report.py)."""
    ap.add_argument(
        "--quick", action="store_true", help="one or two cases per op (RoI ops: P4), short timing: a smoke run"
    )
    ap.add_argument("--ops", nargs="+", default=list(ALL_OPS), help="ops to run (default: all)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--min-time", type=float, default=None, help="seconds of timing per row")
    ap.add_argument(
        "--no-memory",
        action="store_true",
        help="skip deform_conv2d's peak-memory rows (a fresh process measuring case (b): 1-2 min here)",
    )
    ap.add_argument(
        "--line-floor",
        action="store_true",
        help="also time each RoI forward's line-read floor (builds benchmarks/line_floor.cpp on first use)",
    )


def json_info() -> dict:
    """torchvision_cpu_ext.info() in a JSON-serialisable form."""
    return json.loads(json.dumps(torchvision_cpu_ext.info(), default=str))


def run(a: argparse.Namespace) -> dict:
    """Measures the machine's limits and every row that `a` asks for: {"meta": ..., "rows": ...}."""
    min_time = a.min_time if a.min_time is not None else (0.2 if a.quick else 1.5)
    info = json_info()
    with torchvision_cpu_ext.disabled():  # whose kernels and Python functions the torchvision rows ran on
        disabled = json_info()
    ops_disabled = {**disabled["ops"], **disabled.get("python", {})}
    meta = {
        "cpu": info["cpu"],
        "aten_cpu_capability": info["aten_cpu_capability"],
        "isa_variant": info["isa_variant"],
        "torch": info["torch"],
        "torchvision": info["torchvision"],
        "python": platform.python_version(),
        "command": "python " + " ".join(sys.argv),
        "limits": machine_limits(quick=a.quick),
        "info": info,
        "ops_when_disabled": ops_disabled,
        "work_model": WORK_MODEL,
        # What each op's rows run (torchvision ops, replaced Python functions): the report's kernels.
        "kernels": {op: _op_table.kernels_run(_op_table.by_name(op)) for op in a.ops},
    }
    rows = []
    for op in a.ops:
        for threads in a.threads:
            rows += BENCHES[op](a, threads, min_time)
    if "depthwise_conv" in a.ops:  # which peers ran, and what each impl of a row calls
        meta["depthwise"] = {"peers": dw_peer_versions(), "notes": dw_peer_notes(), "calls": DW_CALLS}
    data = {"meta": meta, "rows": rows}
    if "deform_conv2d" in a.ops and not getattr(a, "no_memory", False):
        data["memory"] = deform_memory([DEFORM_CASES[3]] if a.quick else None)
    return data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    a = ap.parse_args()
    t0 = time.time()
    data = run(a)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "ops.json").write_text(json.dumps(data, indent=1))
    md = markdown(data["meta"], data["rows"], data.get("memory"))
    (a.out / "ops.md").write_text(md)
    print()
    print(md)
    print(f"wrote {a.out / 'ops.json'} and {a.out / 'ops.md'} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
