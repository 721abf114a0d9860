"""End-to-end detection benchmark: how much faster does a Faster R-CNN R50-FPN run on this CPU
with torchvision_cpu_ext, channels_last and bfloat16 autocast?

    python -m detectron_demo [--quick] [--model KIND] [--iters N] [--out DIR]

KIND: faster_rcnn (default), mask_rcnn, dcn_faster_rcnn, mobilenet_faster_rcnn, mobilenet_v3_large.

One process times every configuration: stock torchvision (torchvision_cpu_ext.disable()) and
the package (enable()), NCHW and channels_last, float32 and torch.autocast("cpu", bfloat16), at
all threads and at 1 thread, batch 1 and 2. Calls are interleaved (each round runs every
configuration once, in a seeded random order) so drift on a shared machine hits all of them alike;
the table reports the median per configuration and its speedup over stock NCHW float32 of the
same batch and thread count, and of stock in the same layout and dtype. It also checks that the
package's detections equal stock ones, prints a torch.profiler breakdown before and after (where
the time goes: convolutions, linear layers, roi_align, nms, batch norm, the rest), and writes JSON.

The model is built from torchvision's detection models with detectron2's test-time settings and
random weights calibrated to behave like a trained detector (detectron_demo/model.py); the
workload line shows the proposals, RoIs per FPN level, NMS candidates and detections.
`--model dcn_faster_rcnn` has modulated deformable convolutions (DCNv2) in res3-res5; the report
then adds what share of the op time torchvision::deform_conv2d takes, and how long the same
layers take as deform_conv2d and as plain convolutions (F.conv2d on the same inputs and weights).

`--model mobilenet_faster_rcnn` is torchvision's Faster R-CNN MobileNetV3-Large FPN (depthwise
convolutions), `--model mobilenet_v3_large` the MobileNetV3-Large classifier (224x224, batch 1 and
8 by default; its check compares logits instead of detections). For these two the package's
configurations run the model through `torchvision_cpu_ext.optimize()` (depthwise convolutions on
the package's op, batch norms folded into the convolutions, the layout; on a copy of the model,
one per layout and dtype), so their float32 results equal stock ones within float rounding, not
bit for bit.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import torchvision_cpu_ext  # first: it loads its kernels before torchvision is imported

from . import model as demo_model  # noqa: E402  (imports torchvision)

ALL_THREADS = torch.get_num_threads()
# The float32 check, package vs stock on the same input: detections one-to-one with boxes within
# 0.01 px and scores within 1e-4; a classifier's logits (deviation 2, model.CLASS_LOGIT_STD) within
# 1e-3. Float rounding, grown through the random network, stays well below these.
TOLERANCES = {"box_tol": 1e-2, "score_tol": 1e-4, "logit_tol": 1e-3}


@dataclass(frozen=True)
class Config:
    impl: str  # "stock" (torchvision's kernels) or "ext" (torchvision_cpu_ext)
    layout: str  # "nchw" or "channels_last"
    dtype: str  # "fp32" or "bf16" (torch.autocast("cpu", dtype=torch.bfloat16))

    @property
    def label(self) -> str:
        return f"{self.impl:5s} {self.layout:13s} {self.dtype}"


BASELINE = Config("stock", "nchw", "fp32")
EXT_FP32 = Config("ext", "channels_last", "fp32")
DEFORM_OPS = ("torchvision::deform_conv2d", "torchvision_cpu_ext::_deform_conv2d_mixed")
# Where the time goes (the profiles): each op goes to the category of its outermost call that has
# one (an autocast rule or a fallback calls ops inside), so the categories do not overlap.
CATEGORIES = {
    "convolution (ATen)": ("aten::conv", "aten::_conv", "aten::mkldnn_conv", "aten::thnn_conv", "aten::_slow_conv"),
    "depthwise convolution (package op)": ("torchvision_cpu_ext::depthwise_conv",),
    "deform_conv2d": DEFORM_OPS,
    "linear (box head, classifier)": ("aten::linear", "aten::addmm", "aten::mm", "aten::matmul"),
    "roi_align": ("torchvision::roi_align",),
    "nms": ("torchvision::nms", "torchvision_cpu_ext::_batched_nms"),
    "batch norm (ATen)": ("aten::batch_norm", "aten::_batch_norm", "aten::native_batch_norm"),
    "FrozenBatchNorm2d (package op)": ("torchvision_cpu_ext::frozen_batch_norm",),
}
CONFIGS = [Config(i, lay, d) for d in ("fp32", "bf16") for lay in ("nchw", "channels_last") for i in ("stock", "ext")]
# The 1-thread and batch-2 groups of a detector leave out NCHW under bf16 autocast (to keep the
# default run to a few minutes; --all-configs runs it too): bf16 is only worth it channels_last.
CORE_CONFIGS = [c for c in CONFIGS if not (c.layout == "nchw" and c.dtype == "bf16")]


def optimized(model: torch.nn.Module, layout: str, dtype: str) -> torch.nn.Module:
    """A copy of `model` through torchvision_cpu_ext.optimize() for the package's configuration
    of `layout` and `dtype` (the model itself is left as it is: stock runs it). For bf16 autocast
    optimize() takes dtype=torch.bfloat16 (the convolutions' and linear layers' weights in bf16,
    which autocast computes them in anyway: the same results, without the per-call casts)."""
    return torchvision_cpu_ext.optimize(
        copy.deepcopy(model),
        dtype=torch.bfloat16 if dtype == "bf16" else None,
        channels_last=layout == "channels_last",
    )


class Runner:
    """The model in both layouts, and the switches that make a configuration. With `optimize`,
    the package's configurations run their own copies of the model, through `optimized`."""

    def __init__(self, model: torch.nn.Module, optimize: bool = False) -> None:
        self.models = {"nchw": model, "channels_last": copy.deepcopy(model).to(memory_format=torch.channels_last)}
        self.optimized = {
            (c.layout, c.dtype): optimized(model, c.layout, c.dtype) for c in CONFIGS if optimize and c.impl == "ext"
        }

    def model(self, cfg: Config) -> torch.nn.Module:
        """The module `cfg` runs."""
        if cfg.impl == "ext" and self.optimized:
            return self.optimized[cfg.layout, cfg.dtype]
        return self.models[cfg.layout]

    def select(self, cfg: Config, threads: int) -> None:
        """Sets the thread count and whose kernels run (outside any timed region)."""
        torch.set_num_threads(threads)
        (torchvision_cpu_ext.enable if cfg.impl == "ext" else torchvision_cpu_ext.disable)()

    def forward(self, cfg: Config, images: list[torch.Tensor]) -> list[dict]:
        """One inference call of the selected configuration: what is timed and profiled."""
        amp = torch.autocast("cpu", dtype=torch.bfloat16) if cfg.dtype == "bf16" else contextlib.nullcontext()
        with torch.inference_mode(), amp:
            return self.model(cfg)(images)

    def __call__(self, cfg: Config, images: list[torch.Tensor], threads: int) -> list[dict]:
        self.select(cfg, threads)
        try:
            return self.forward(cfg, images)
        finally:
            torchvision_cpu_ext.enable()


def progress(total: int, quiet: bool):
    try:
        from tqdm import tqdm
    except ImportError:  # a plain counter on stderr
        tqdm = None
    if tqdm is not None and not quiet:
        return tqdm(total=total, unit="call", file=sys.stderr, dynamic_ncols=True)

    class Counter:
        n = 0

        def update(self, k: int = 1) -> None:
            self.n += k
            if not quiet:
                print(f"\r{self.n}/{total} calls", end="", file=sys.stderr, flush=True)

        def set_description(self, s: str) -> None:
            pass

        def close(self) -> None:
            if not quiet:
                print(file=sys.stderr)

    return Counter()


def time_group(run: Runner, configs: list[Config], images, threads: int, warmup: int, iters: int, bar) -> dict:
    """Seconds per call of each configuration; every round runs each configuration once."""
    samples: dict[Config, list[float]] = {c: [] for c in configs}
    for r in range(warmup + iters):
        order = list(configs)
        random.Random(r).shuffle(order)  # a new seeded order each round: no fixed neighbours
        for cfg in order:
            bar.set_description(f"batch {len(images)}, {threads}T, {cfg.label}")
            run.select(cfg, threads)
            try:
                t0 = time.perf_counter()
                run.forward(cfg, images)
                elapsed = time.perf_counter() - t0
            finally:
                torchvision_cpu_ext.enable()
            if r >= warmup:
                samples[cfg].append(elapsed)
            bar.update(1)
    return samples


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    from torchvision.ops import box_iou as tv_box_iou

    return tv_box_iou(a.double(), b.double())


def compare_detections(ref: list[dict], out: list[dict]) -> dict:
    """Greedy one-to-one matching of detections (same label, best IoU), per image."""
    n_ref = n_out = matched = 0
    max_box = max_score = 0.0
    min_iou = 1.0
    for r, o in zip(ref, out, strict=True):
        n_ref += len(r["boxes"])
        n_out += len(o["boxes"])
        if not len(r["boxes"]) or not len(o["boxes"]):
            continue
        iou = box_iou(r["boxes"], o["boxes"])
        iou[r["labels"].view(-1, 1) != o["labels"].view(1, -1)] = -1
        taken = torch.zeros(len(o["boxes"]), dtype=torch.bool)
        for i in range(len(r["boxes"])):
            cand = iou[i].masked_fill(taken, -1)
            j = int(cand.argmax())
            if cand[j] < 0.5:
                continue
            taken[j] = True
            matched += 1
            min_iou = min(min_iou, float(cand[j]))
            max_box = max(max_box, float((r["boxes"][i].double() - o["boxes"][j].double()).abs().max()))
            max_score = max(max_score, float((r["scores"][i].double() - o["scores"][j].double()).abs()))
    return {
        "detections_ref": n_ref,
        "detections": n_out,
        "matched": matched,
        "min_iou": min_iou,
        "max_abs_box_px": max_box,
        "max_abs_score": max_score,
    }


def compare_logits(ref: torch.Tensor, out: torch.Tensor) -> dict:
    """A classifier's logits against reference ones, per batch."""
    diff = (ref.double() - out.double()).abs()
    return {
        "images": len(ref),
        "logit_std": float(ref.double().std()),
        "max_abs_logit": float(diff.max()),
        "top1_equal": int((ref.argmax(1) == out.argmax(1)).sum()),
    }


def fp32_equal(row: dict, box_tol: float, score_tol: float, logit_tol: float) -> bool:
    """The float32 check of a compare_detections or compare_logits row."""
    if "max_abs_logit" in row:
        return row["max_abs_logit"] <= logit_tol
    return (
        row["matched"] == row["detections_ref"] == row["detections"]
        and row["max_abs_box_px"] <= box_tol
        and row["max_abs_score"] <= score_tol
    )


def check_correctness(
    run: Runner,
    images,
    threads: int,
    box_tol: float,
    score_tol: float,
    stock_bf16: bool = True,
    logit_tol: float = TOLERANCES["logit_tol"],
) -> list[dict]:
    """The package against stock on the same input, per layout and dtype; bf16 is reported with
    the difference bf16 autocast itself makes in stock torchvision, for scale. Without
    `stock_bf16` (stock cannot run the model under bf16 autocast) the package's bf16 is compared
    with stock float32 of the same layout. A classifier's logits are compared (`logit_tol`), a
    detector's detections."""
    rows = []
    fp32_stock = run(BASELINE, images, threads)
    compare = compare_logits if isinstance(fp32_stock, torch.Tensor) else compare_detections
    for layout in ("nchw", "channels_last"):
        for dtype in ("fp32", "bf16"):
            ref_dtype = dtype if stock_bf16 else "fp32"
            stock = run(Config("stock", layout, ref_dtype), images, threads)
            ext = run(Config("ext", layout, dtype), images, threads)
            row = {"layout": layout, "dtype": dtype, **compare(stock, ext)}
            if dtype == "fp32":
                row["ok"] = fp32_equal(row, box_tol, score_tol, logit_tol)
            elif stock_bf16:
                row["stock_bf16_vs_stock_fp32"] = compare(fp32_stock, stock)
                row["package_bf16_vs_stock_fp32"] = compare(fp32_stock, ext)
                row["ok"] = None  # reported, not asserted (see the README)
            else:
                row["reference"] = "stock fp32"
                row["ok"] = None
            rows.append(row)
    return rows


def profile(run: Runner, cfg: Config, images, threads: int, top: int) -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    run.select(cfg, threads)
    try:
        run.forward(cfg, images)  # warm
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            run.forward(cfg, images)
            wall = time.perf_counter() - t0
    finally:
        torchvision_cpu_ext.enable()
    events = prof.events()
    # Shares are of the total op time (the sum of every op's self time), which leaves out the
    # Python between ops: a larger share than of the wall time, so the stricter number.
    total_self = sum(e.self_cpu_time_total for e in events) or 1.0

    def top_level(e, prefix: tuple[str, ...]) -> bool:
        p = e.cpu_parent
        while p is not None:
            if p.name.startswith(prefix):
                return False
            p = p.cpu_parent
        return True

    def share(prefix: tuple[str, ...]) -> float:
        # Inclusive time of the outermost calls (an autocast rule calls its op again inside).
        us = sum(e.cpu_time_total for e in events if e.name.startswith(prefix) and top_level(e, prefix))
        return us / total_self

    prefixes = {p: name for name, ps in CATEGORIES.items() for p in ps}

    def category(name: str) -> str | None:
        return next((c for p, c in prefixes.items() if name.startswith(p)), None)

    categories = dict.fromkeys(CATEGORIES, 0.0)
    for e in events:
        c = category(e.name)
        if c is not None and top_level(e, tuple(prefixes)):
            categories[c] += e.cpu_time_total
    table = sorted(prof.key_averages(), key=lambda a: a.self_cpu_time_total, reverse=True)[:top]
    return {
        "config": asdict(cfg),
        "threads": threads,
        "batch": len(images),
        "wall_s": wall,
        "op_time_ms": total_self / 1e3,
        # Inclusive ms of each category (the rest of the op time is other ops: elementwise,
        # activations, copies, stock FrozenBatchNorm2d's arithmetic, ...).
        "categories_ms": {k: v / 1e3 for k, v in categories.items()},
        # torchvision's ops, and the package's replacement of batched_nms's per-class loop.
        "torchvision_ops_share": share(("torchvision::", "torchvision_cpu_ext::_batched_nms")),
        "roi_align_share": share(("torchvision::roi_align",)),
        # Inclusive, as the others: stock's kernel runs its GEMMs as aten ops inside the call.
        "deform_conv2d_share": share(DEFORM_OPS),
        "frozen_batch_norm_share": share(("torchvision_cpu_ext::frozen_batch_norm",)),
        "top": [
            {
                "op": a.key,
                "self_ms": a.self_cpu_time_total / 1e3,
                "share": a.self_cpu_time_total / total_self,
                "calls": a.count,
            }
            for a in table
        ],
    }


def deform_vs_conv(run: Runner, cfg: Config, images, threads: int, repeats: int) -> dict:
    """The model's deformable convolutions timed alone, on the inputs they get in `cfg` (float32),
    against the same layers as plain convolutions: F.conv2d of the same input, weight, stride,
    padding and dilation. Interleaved per layer; the median of `repeats` per layer, summed."""
    from torch.nn import functional as F
    from torchvision.ops import deform_conv2d

    layers = demo_model.deform_convs(run.models[cfg.layout])
    captured = []
    hooks = [
        m.conv.register_forward_hook(lambda mod, inputs, out, m=m: captured.append((m, [t.clone() for t in inputs])))
        for m in layers
    ]
    try:
        run(cfg, images, threads)
    finally:
        for h in hooks:
            h.remove()

    def layer_calls(m, x, offset, mask) -> dict:
        c = m.conv
        geo = dict(stride=c.stride, padding=c.padding, dilation=c.dilation)
        return {
            "deform_conv2d": lambda: deform_conv2d(x, offset, c.weight, c.bias, mask=mask, **geo),
            "conv2d": lambda: F.conv2d(x, c.weight, c.bias, **geo),
            "offset_conv2d": lambda: m.offset(x),
        }

    times = {"deform_conv2d": [], "conv2d": [], "offset_conv2d": []}
    run.select(cfg, threads)
    try:
        with torch.inference_mode():
            for m, inputs in captured:
                calls = layer_calls(m, *inputs)
                for fn in calls.values():  # warm
                    fn()
                samples = {k: [] for k in calls}
                for _ in range(repeats):
                    for k, fn in calls.items():
                        t0 = time.perf_counter()
                        fn()
                        samples[k].append(time.perf_counter() - t0)
                for k in calls:
                    times[k].append(statistics.median(samples[k]))
    finally:
        torchvision_cpu_ext.enable()
    deform_s, conv_s = sum(times["deform_conv2d"]), sum(times["conv2d"])
    return {
        "config": asdict(cfg),
        "threads": threads,
        "layers": len(captured),
        "repeats": repeats,
        "deform_conv2d_s": deform_s,
        "conv2d_s": conv_s,
        "offset_conv2d_s": sum(times["offset_conv2d"]),
        "ratio": deform_s / conv_s,
        "per_layer_s": times,
    }


def fmt_deform(r: dict) -> str:
    rows = r["deform"]
    profiles = {tuple(p["config"].values()): p for p in r["profiles"]}
    lines = [
        f"Deformable convolutions ({rows[0]['layers']} layers, res3-res5): share of the op time in the "
        "profiled call (torch.profiler, torchvision::deform_conv2d inclusive), and the layers timed alone "
        f"on the inputs the model gives them in one batch-1 call (median of {rows[0]['repeats']} per layer, summed) as "
        "deform_conv2d and as plain convolutions (F.conv2d, same input, weight, stride, padding); the "
        "offset/mask convolutions beside them are plain convolutions in every row:",
        "",
        "| configuration | threads | deform_conv2d share of op time | deform_conv2d ms | as conv2d ms "
        "| deform / conv | offset/mask conv ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for d in rows:
        c = Config(**d["config"])
        p = profiles.get(tuple(d["config"].values()))
        share = f"{100 * p['deform_conv2d_share']:.1f}%" if p else "not profiled"
        lines.append(
            f"| {c.label} | {d['threads']} | {share} | {d['deform_conv2d_s'] * 1e3:.1f} "
            f"| {d['conv2d_s'] * 1e3:.1f} | {d['ratio']:.2f}x | {d['offset_conv2d_s'] * 1e3:.1f} |"
        )
    return "\n".join(lines)


def fmt_profile(p: dict) -> str:
    c = Config(**p["config"])
    deform = p.get("deform_conv2d_share", 0)
    lines = [
        f"profile: {c.label}, {p['threads']} thread(s), {p['wall_s'] * 1e3:.0f} ms (profiled call); "
        f"of op time: torchvision ops {100 * p['torchvision_ops_share']:.1f}% "
        f"(roi_align {100 * p['roi_align_share']:.1f}%"
        + (f", deform_conv2d {100 * deform:.1f}%" if deform else "")
        + f"), fused FrozenBatchNorm2d {100 * p['frozen_batch_norm_share']:.1f}%",
        "| op | self ms | share | calls |",
        "|---|---|---|---|",
    ]
    lines += [f"| {t['op']} | {t['self_ms']:.1f} | {100 * t['share']:.1f}% | {t['calls']} |" for t in p["top"]]
    return "\n".join(lines)


def fmt_where(profiles: list[dict]) -> str:
    """Where the time goes: the categories' inclusive ms and share of the op time, per profile."""
    heads = [" ".join(Config(**p["config"]).label.split()) + f", batch {p['batch']}" for p in profiles]
    lines = [
        "Where the time goes (torch.profiler, one call per configuration; ms of each category's outermost "
        "calls, and their share of the op time, the sum of every op's self time):",
        "",
        "| category | " + " | ".join(heads) + " |",
        "|---|" + "---|" * len(profiles),
    ]
    shown = [k for k in CATEGORIES if any(p["categories_ms"].get(k, 0) > 0 for p in profiles)]
    for k in shown:
        cells = [
            f"{p['categories_ms'][k]:.1f} ({100 * p['categories_ms'][k] / p['op_time_ms']:.1f}%)" for p in profiles
        ]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    rest = [p["op_time_ms"] - sum(p["categories_ms"][k] for k in shown) for p in profiles]
    cells = [f"{r:.1f} ({100 * r / p['op_time_ms']:.1f}%)" for r, p in zip(rest, profiles, strict=True)]
    lines.append("| other ops | " + " | ".join(cells) + " |")
    lines.append("| op time | " + " | ".join(f"{p['op_time_ms']:.1f}" for p in profiles) + " |")
    lines.append("| wall (profiled call) | " + " | ".join(f"{p['wall_s'] * 1e3:.1f}" for p in profiles) + " |")
    return "\n".join(lines)


def fmt_seconds(s: float) -> str:
    """Three decimals, four below 0.1 s (a classifier's calls take milliseconds)."""
    return f"{s:.3f}" if s >= 0.1 else f"{s:.4f}"


def fmt_table(results: list[dict]) -> str:
    lines = [
        "| batch | threads | implementation | layout | dtype | median s/iter | speedup vs stock NCHW fp32 "
        "| vs stock, same layout and dtype |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        c = r["config"]
        same = r.get("speedup_same_layout_dtype")
        lines.append(
            f"| {r['batch']} | {r['threads']} | {'torchvision_cpu_ext' if c['impl'] == 'ext' else 'stock torchvision'} "
            f"| {c['layout']} | {c['dtype']} | {fmt_seconds(r['median_s'])} | {r['speedup']:.2f}x "
            f"| {'' if same is None else f'{same:.2f}x'} |"
        )
    return "\n".join(lines)


def detectron2_or_exit() -> None:
    try:
        import detectron2  # noqa: F401
    except ImportError:
        sys.exit(
            "detectron_demo: --backend detectron2 needs detectron2, which is not importable here. It is built "
            "from source (README, 'detectron2'): pip install 'git+https://github.com/facebookresearch/detectron2.git' "
            "--no-build-isolation. Or use the default --backend torchvision: the same R50-FPN architecture built "
            "from torchvision's detection models."
        )


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(
        prog="python -m detectron_demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--quick", action="store_true", help="CI smoke run: small images, one timed call, 2 configurations' profiles"
    )
    ap.add_argument("--model", choices=list(demo_model.KINDS), default="faster_rcnn")
    ap.add_argument("--backend", choices=["torchvision", "detectron2"], default="torchvision")
    ap.add_argument(
        "--iters", type=int, default=None, help="timed rounds per group (default 5, a classifier 20; --quick 1)"
    )
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds before them")
    ap.add_argument("--threads", type=int, nargs="+", default=None, help=f"thread counts (default {ALL_THREADS} and 1)")
    ap.add_argument(
        "--batch",
        type=int,
        nargs="+",
        default=None,
        help="batch sizes (default 1 2, a classifier 1 8; the larger ones at all threads only)",
    )
    ap.add_argument(
        "--size", type=int, nargs=2, default=None, metavar=("H", "W"), help="image size (default 800 1216; 224 224)"
    )
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    ap.add_argument(
        "--all-configs", action="store_true", help="all 8 configurations in every group (a classifier: always)"
    )
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    backend = demo_model
    if a.backend == "detectron2" and a.model == "dcn_faster_rcnn":
        ap.error("--model dcn_faster_rcnn is built from torchvision's detection models (--backend torchvision)")
    if a.backend == "detectron2":
        detectron2_or_exit()
        from . import d2 as backend
    if torchvision_cpu_ext.info()["mode"] != "override":
        sys.exit(
            "detectron_demo: torchvision's compiled kernels did not load, so there is no stock baseline to compare"
        )

    quick = a.quick
    classifier = a.model in demo_model.CLASSIFIERS
    if classifier:
        h, w = a.size or (224, 224)
        iters = a.iters or (1 if quick else 20)
        batches = a.batch or ([1] if quick else [1, 8])
    else:
        h, w = a.size or ((320, 480) if quick else (800, 1216))
        iters = a.iters or (1 if quick else 5)
        batches = a.batch or ([1] if quick else [1, 2])
    threads_list = a.threads or ([ALL_THREADS] if quick else sorted({ALL_THREADS, 1}, reverse=True))
    t_start = time.time()

    print(f"building {demo_model.TITLES[a.model]} ({a.backend}, random weights) and calibrating it ...", flush=True)
    model = backend.build_model(a.model)
    if quick and a.backend == "torchvision" and not classifier:  # small images for a smoke run: the resize follows them
        model.transform.min_size, model.transform.max_size = (h,), max(h, w)
    calibration = backend.calibrate(model, demo_model.calibration_input(a.model, h, w))
    images = [demo_model.synthetic_image(h, w, seed=s) for s in range(max(batches))]
    run = Runner(model, optimize=a.model in demo_model.OPTIMIZED)

    workloads = {}
    for b in batches:
        work, _ = backend.workload(model, images[:b])
        workloads[b] = asdict(work)
        print(f"workload, batch {b}: {work.line()}", flush=True)

    # Stock torchvision has no bfloat16 deform_conv2d on the CPU (its kernel is float/double only
    # and it has no CPU autocast rule): the deformable model's stock bf16 configurations are left out.
    deformable = bool(demo_model.deform_convs(model))
    runnable = [c for c in CONFIGS if not (deformable and c.impl == "stock" and c.dtype == "bf16")]
    every = a.all_configs or classifier  # a classifier's calls are short: all 8 configurations in every group
    groups = [
        (b, t, [c for c in (CONFIGS if (b, t) == (1, ALL_THREADS) or every else CORE_CONFIGS) if c in runnable])
        for b in batches
        for t in threads_list
        if b == 1 or t == ALL_THREADS
    ]
    bar = progress(sum(len(configs) * (a.warmup + iters) for _, _, configs in groups), a.no_progress)
    results = []
    for b, t, configs in groups:
        samples = time_group(run, configs, images[:b], t, a.warmup, iters, bar)
        base = statistics.median(samples[BASELINE])
        for cfg in configs:
            med = statistics.median(samples[cfg])
            stock = samples.get(Config("stock", cfg.layout, cfg.dtype))
            results.append(
                {
                    "batch": b,
                    "threads": t,
                    "config": asdict(cfg),
                    "median_s": med,
                    "samples_s": samples[cfg],
                    "speedup": base / med,
                    "speedup_same_layout_dtype": statistics.median(stock) / med if stock else None,
                }
            )
    bar.close()

    print(f"checking {'logits' if classifier else 'detections'} (package vs stock, same input) ...", flush=True)
    # A classifier's whole batch (cheap); a detector's first image.
    check_images = images if classifier else images[:1]
    correctness = check_correctness(run, check_images, ALL_THREADS, stock_bf16=not deformable, **TOLERANCES)
    profiles = [
        profile(run, cfg, check_images, ALL_THREADS, top=8 if quick else 12)
        for cfg in (
            [BASELINE, Config("ext", "channels_last", "bf16")] + ([EXT_FP32] if deformable else [])
            if quick
            else [
                BASELINE,
                Config("stock", "channels_last", "fp32"),
                Config("stock", "channels_last", "bf16"),
                Config("ext", "nchw", "fp32"),
                EXT_FP32,
                Config("ext", "channels_last", "bf16"),
            ]
        )
        if cfg in runnable
    ]
    deform = []
    if deformable:
        print("timing the deformable convolutions alone and as plain convolutions ...", flush=True)
        deform = [
            deform_vs_conv(run, cfg, images[:1], ALL_THREADS, repeats=1 if quick else 3) for cfg in (BASELINE, EXT_FP32)
        ]
    info = torchvision_cpu_ext.info()
    report = {
        "meta": {
            "command": "python -m detectron_demo " + " ".join(argv if argv is not None else sys.argv[1:]),
            "cpu": info["cpu"],
            "isa_variant": info["isa_variant"],
            "torch": info["torch"],
            "torchvision": info["torchvision"],
            "python": platform.python_version(),
            "all_threads": ALL_THREADS,
            "model": a.model,
            "backend": a.backend,
            "image_size": [h, w],
            "iters": iters,
            "warmup": a.warmup,
            "quick": quick,
            "calibration": calibration,
            "optimize": a.model in demo_model.OPTIMIZED,
            "tolerances": TOLERANCES,
            "info": info,
        },
        "workload": workloads,
        "results": results,
        "correctness": correctness,
        "profiles": profiles,
        "deform": deform,
        "seconds": time.time() - t_start,
    }
    print()
    print(render(report))
    a.out.mkdir(parents=True, exist_ok=True)
    name = "demo_quick" if quick else "demo"
    (a.out / f"{name}.json").write_text(json.dumps(report, indent=1))
    (a.out / f"{name}.md").write_text(render(report) + "\n")
    print(f"\nwrote {a.out / (name + '.json')} and {a.out / (name + '.md')} in {report['seconds']:.0f} s")
    return report


def render(r: dict) -> str:
    m = r["meta"]
    lines = [
        f"## {m['model']}: {demo_model.TITLES[m['model']]}, {m['image_size'][0]}x{m['image_size'][1]} images: "
        "stock torchvision vs torchvision_cpu_ext",
        "",
        f"- CPU: {m['cpu']} ({m['all_threads']} threads), kernels {m['isa_variant']}; torch {m['torch']}, "
        f"torchvision {m['torchvision']}, Python {m['python']}",
        f"- command: `{m['command']}`; median of {m['iters']} interleaved calls (seeded random order per "
        f"round) after {m['warmup']} warm-up round(s)",
        *(
            ["- quick smoke run (small images, one timed call): the times below are not measurements"]
            if m["quick"]
            else []
        ),
        (
            f"- calibration: logits scaled by {m['calibration']['logit_scale']:.4g}"
            if "logit_scale" in m["calibration"]
            else f"- calibration: box score threshold {m['calibration']['box_score_thresh']:.4f}"
        ),
        *(
            [
                "- the package's configurations run the model through `torchvision_cpu_ext.optimize()` "
                "(a copy per layout and dtype); stock runs it as built"
            ]
            if m.get("optimize")
            else []
        ),
    ]
    lines += [f"- workload, batch {b}: " + demo_model.workload_line(m["model"], w) for b, w in r["workload"].items()]
    lines += ["", fmt_table(r["results"]), ""]
    if any(c.get("reference") == "stock fp32" for c in r["correctness"]):
        lines += [
            "Stock torchvision cannot run this model under bfloat16 autocast on the CPU: its deform_conv2d "
            "kernel is float32/float64 only (`deformable_im2col` not implemented for BFloat16) and it has no "
            "CPU autocast rule, so its bf16 rows are left out and the package's bf16 detections are compared "
            "with stock fp32 below.",
            "",
        ]
    lines += [fmt_check(r["correctness"], m.get("tolerances", TOLERANCES)), ""]
    if r.get("deform"):
        lines += [fmt_deform(r), ""]
    lines += [fmt_where(r["profiles"]), ""]
    for p in r["profiles"]:
        lines += [fmt_profile(p), ""]
    return "\n".join(lines)


def fmt_check(rows: list[dict], tol: dict) -> str:
    """The correctness table, and the float32 margin: the largest difference over the tolerance."""
    fp32 = [c for c in rows if c["dtype"] == "fp32"]
    check = {True: "equal", False: "DIFFERENT", None: "reported"}
    if "max_abs_logit" in rows[0]:
        lines = [
            f"Logits, package vs stock on the same {rows[0]['images']} image(s) (fp32 must match within "
            f"{tol['logit_tol']:g}; bf16 is reported):",
            "",
            "| layout | dtype | logit deviation | max abs logit diff | top-1 equal | check |",
            "|---|---|---|---|---|---|",
        ]
        for c in rows:
            lines.append(
                f"| {c['layout']} | {c['dtype']} | {c['logit_std']:.3g} | {c['max_abs_logit']:.2g} "
                f"| {c['top1_equal']}/{c['images']} | {check[c['ok']]} |"
            )
        for c in rows:
            if "stock_bf16_vs_stock_fp32" in c:
                s, p = c["stock_bf16_vs_stock_fp32"], c.get("package_bf16_vs_stock_fp32")
                lines.append(
                    f"\nFor scale, {c['layout']}: stock bf16 autocast vs stock fp32: max abs logit diff "
                    f"{s['max_abs_logit']:.2g}, top-1 equal {s['top1_equal']}/{s['images']}"
                    + (
                        f"; the package's bf16 vs stock fp32: {p['max_abs_logit']:.2g}, top-1 equal "
                        f"{p['top1_equal']}/{p['images']}."
                        if p
                        else "."
                    )
                )
        worst = max(c["max_abs_logit"] for c in fp32)
        lines.append(
            f"\nfloat32 margin: the largest logit difference is {worst / tol['logit_tol']:.2g} of the tolerance."
        )
        return "\n".join(lines)
    lines = [
        "Detections, package vs stock on the same image (fp32 must match; bf16 is reported):",
        "",
        "| layout | dtype | stock | package | matched | min IoU | max abs box diff (px) | max abs score diff | check |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in rows:
        result = check[c["ok"]]
        if c.get("reference"):
            result += f" (vs {c['reference']})"
        lines.append(
            f"| {c['layout']} | {c['dtype']} | {c['detections_ref']} | {c['detections']} | {c['matched']} "
            f"| {c['min_iou']:.4f} | {c['max_abs_box_px']:.2g} | {c['max_abs_score']:.2g} | {result} |"
        )
    for c in rows:
        if "stock_bf16_vs_stock_fp32" in c:
            s = c["stock_bf16_vs_stock_fp32"]
            lines.append(
                f"\nFor scale, {c['layout']}: stock bf16 autocast vs stock fp32 matches {s['matched']} of "
                f"{s['detections_ref']} detections (max abs score diff {s['max_abs_score']:.2g})."
            )
    box = max(c["max_abs_box_px"] for c in fp32)
    score = max(c["max_abs_score"] for c in fp32)
    lines.append(
        f"\nfloat32 margin: the largest score difference is {score / tol['score_tol']:.2g} of the tolerance "
        f"({tol['score_tol']:g}), the largest box difference {box / tol['box_tol']:.2g} of it ({tol['box_tol']:g} px)."
    )
    return "\n".join(lines)
