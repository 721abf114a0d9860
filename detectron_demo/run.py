"""End-to-end detection benchmark: how much faster does a Faster R-CNN R50-FPN run on this CPU
with torchvision_cpu_ext, channels_last and bfloat16 autocast?

    python -m detectron_demo [--quick] [--model faster_rcnn|mask_rcnn] [--iters N] [--out DIR]

One process times every configuration: stock torchvision (torchvision_cpu_ext.disable()) and
the package (enable()), NCHW and channels_last, float32 and torch.autocast("cpu", bfloat16), at
all threads and at 1 thread, batch 1 and 2. Calls are interleaved (each round runs every
configuration once, in a seeded random order) so drift on a shared machine hits all of them alike;
the table reports the median per configuration and its speedup over stock NCHW float32 of the
same batch and thread count. It also checks that the package's detections equal stock ones,
prints a torch.profiler breakdown before and after, and writes JSON.

The model is built from torchvision's detection models with detectron2's test-time settings and
random weights calibrated to behave like a trained detector (detectron_demo/model.py); the
workload line shows the proposals, RoIs per FPN level, NMS candidates and detections.
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


@dataclass(frozen=True)
class Config:
    impl: str  # "stock" (torchvision's kernels) or "ext" (torchvision_cpu_ext)
    layout: str  # "nchw" or "channels_last"
    dtype: str  # "fp32" or "bf16" (torch.autocast("cpu", dtype=torch.bfloat16))

    @property
    def label(self) -> str:
        return f"{self.impl:5s} {self.layout:13s} {self.dtype}"


BASELINE = Config("stock", "nchw", "fp32")
CONFIGS = [Config(i, lay, d) for d in ("fp32", "bf16") for lay in ("nchw", "channels_last") for i in ("stock", "ext")]
# The 1-thread and batch-2 groups leave out NCHW under bf16 autocast (to keep the default run
# to a few minutes; --all-configs runs it too): bf16 is only worth it channels_last.
CORE_CONFIGS = [c for c in CONFIGS if not (c.layout == "nchw" and c.dtype == "bf16")]


class Runner:
    """The model in both layouts, and the switches that make a configuration."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.models = {"nchw": model, "channels_last": copy.deepcopy(model).to(memory_format=torch.channels_last)}

    def select(self, cfg: Config, threads: int) -> None:
        """Sets the thread count and whose kernels run (outside any timed region)."""
        torch.set_num_threads(threads)
        (torchvision_cpu_ext.enable if cfg.impl == "ext" else torchvision_cpu_ext.disable)()

    def forward(self, cfg: Config, images: list[torch.Tensor]) -> list[dict]:
        """One inference call of the selected configuration: what is timed and profiled."""
        amp = torch.autocast("cpu", dtype=torch.bfloat16) if cfg.dtype == "bf16" else contextlib.nullcontext()
        with torch.inference_mode(), amp:
            return self.models[cfg.layout](images)

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


def check_correctness(run: Runner, images, threads: int, box_tol: float, score_tol: float) -> list[dict]:
    """The package against stock on the same input, per layout and dtype; bf16 is reported with
    the difference bf16 autocast itself makes in stock torchvision, for scale."""
    rows = []
    fp32_stock = run(BASELINE, images, threads)
    for layout in ("nchw", "channels_last"):
        for dtype in ("fp32", "bf16"):
            stock = run(Config("stock", layout, dtype), images, threads)
            ext = run(Config("ext", layout, dtype), images, threads)
            row = {"layout": layout, "dtype": dtype, **compare_detections(stock, ext)}
            if dtype == "fp32":
                row["ok"] = (
                    row["matched"] == row["detections_ref"] == row["detections"]
                    and row["max_abs_box_px"] <= box_tol
                    and row["max_abs_score"] <= score_tol
                )
            else:
                row["stock_bf16_vs_stock_fp32"] = compare_detections(fp32_stock, stock)
                row["ok"] = None  # reported, not asserted (see the README)
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

    table = sorted(prof.key_averages(), key=lambda a: a.self_cpu_time_total, reverse=True)[:top]
    return {
        "config": asdict(cfg),
        "threads": threads,
        "wall_s": wall,
        # torchvision's ops, and the package's replacement of batched_nms's per-class loop.
        "torchvision_ops_share": share(("torchvision::", "torchvision_cpu_ext::_batched_nms")),
        "roi_align_share": share(("torchvision::roi_align",)),
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


def fmt_profile(p: dict) -> str:
    c = Config(**p["config"])
    lines = [
        f"profile: {c.label}, {p['threads']} thread(s), {p['wall_s'] * 1e3:.0f} ms (profiled call); "
        f"of op time: torchvision ops {100 * p['torchvision_ops_share']:.1f}% "
        f"(roi_align {100 * p['roi_align_share']:.1f}%), "
        f"fused FrozenBatchNorm2d {100 * p['frozen_batch_norm_share']:.1f}%",
        "| op | self ms | share | calls |",
        "|---|---|---|---|",
    ]
    lines += [f"| {t['op']} | {t['self_ms']:.1f} | {100 * t['share']:.1f}% | {t['calls']} |" for t in p["top"]]
    return "\n".join(lines)


def fmt_table(results: list[dict]) -> str:
    lines = [
        "| batch | threads | implementation | layout | dtype | median s/iter | speedup vs stock NCHW fp32 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        c = r["config"]
        lines.append(
            f"| {r['batch']} | {r['threads']} | {'torchvision_cpu_ext' if c['impl'] == 'ext' else 'stock torchvision'} "
            f"| {c['layout']} | {c['dtype']} | {r['median_s']:.3f} | {r['speedup']:.2f}x |"
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
    ap.add_argument("--model", choices=["faster_rcnn", "mask_rcnn"], default="faster_rcnn")
    ap.add_argument("--backend", choices=["torchvision", "detectron2"], default="torchvision")
    ap.add_argument("--iters", type=int, default=None, help="timed rounds per group (default 5; --quick 1)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds before them")
    ap.add_argument("--threads", type=int, nargs="+", default=None, help=f"thread counts (default {ALL_THREADS} and 1)")
    ap.add_argument(
        "--batch", type=int, nargs="+", default=None, help="batch sizes (default 1 2; batch 2 at all threads)"
    )
    ap.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"), help="image size (default 800 1216)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    ap.add_argument("--all-configs", action="store_true", help="all 8 configurations in every group")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    backend = demo_model
    if a.backend == "detectron2":
        detectron2_or_exit()
        from . import d2 as backend
    if torchvision_cpu_ext.info()["mode"] != "override":
        sys.exit(
            "detectron_demo: torchvision's compiled kernels did not load, so there is no stock baseline to compare"
        )

    quick = a.quick
    h, w = a.size or ((320, 480) if quick else (800, 1216))
    iters = a.iters or (1 if quick else 5)
    threads_list = a.threads or ([ALL_THREADS] if quick else sorted({ALL_THREADS, 1}, reverse=True))
    batches = a.batch or ([1] if quick else [1, 2])
    t_start = time.time()

    print(f"building {a.model} R50-FPN ({a.backend}, random weights) and calibrating it ...", flush=True)
    model = backend.build_model(a.model)
    if quick and a.backend == "torchvision":  # small images for a smoke run: the resize follows them
        model.transform.min_size, model.transform.max_size = (h,), max(h, w)
    calibration = backend.calibrate(model, demo_model.synthetic_image(h, w, seed=1000))
    images = [demo_model.synthetic_image(h, w, seed=s) for s in range(max(batches))]
    run = Runner(model)

    workloads = {}
    for b in batches:
        work, _ = backend.workload(model, images[:b])
        workloads[b] = asdict(work)
        print(f"workload, batch {b}: {work.line()}", flush=True)

    groups = [
        (b, t, CONFIGS if (b, t) == (1, ALL_THREADS) or a.all_configs else CORE_CONFIGS)
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
            results.append(
                {
                    "batch": b,
                    "threads": t,
                    "config": asdict(cfg),
                    "median_s": med,
                    "samples_s": samples[cfg],
                    "speedup": base / med,
                }
            )
    bar.close()

    print("checking detections (package vs stock, same input) ...", flush=True)
    correctness = check_correctness(run, images[:1], ALL_THREADS, box_tol=1e-2, score_tol=1e-4)
    profiles = [
        profile(run, cfg, images[:1], ALL_THREADS, top=8 if quick else 12)
        for cfg in (
            [BASELINE, Config("ext", "channels_last", "bf16")]
            if quick
            else [
                BASELINE,
                Config("stock", "channels_last", "bf16"),
                Config("ext", "nchw", "fp32"),
                Config("ext", "channels_last", "fp32"),
                Config("ext", "channels_last", "bf16"),
            ]
        )
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
            "info": info,
        },
        "workload": workloads,
        "results": results,
        "correctness": correctness,
        "profiles": profiles,
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
        f"## {m['model']} R50-FPN, {m['image_size'][0]}x{m['image_size'][1]} images: "
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
        f"- calibration: box score threshold {m['calibration']['box_score_thresh']:.4f}",
    ]
    lines += [f"- workload, batch {b}: " + demo_model.Workload(**w).line() for b, w in r["workload"].items()]
    lines += ["", fmt_table(r["results"]), ""]
    lines += ["Detections, package vs stock on the same image (fp32 must match; bf16 is reported):", ""]
    lines.append(
        "| layout | dtype | stock | package | matched | min IoU | max abs box diff (px) | max abs score diff | check |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for c in r["correctness"]:
        check = {True: "equal", False: "DIFFERENT", None: "reported"}[c["ok"]]
        lines.append(
            f"| {c['layout']} | {c['dtype']} | {c['detections_ref']} | {c['detections']} | {c['matched']} "
            f"| {c['min_iou']:.4f} | {c['max_abs_box_px']:.2g} | {c['max_abs_score']:.2g} | {check} |"
        )
    for c in r["correctness"]:
        if "stock_bf16_vs_stock_fp32" in c:
            s = c["stock_bf16_vs_stock_fp32"]
            lines.append(
                f"\nFor scale, {c['layout']}: stock bf16 autocast vs stock fp32 matches {s['matched']} of "
                f"{s['detections_ref']} detections (max abs score diff {s['max_abs_score']:.2g})."
            )
    lines.append("")
    for p in r["profiles"]:
        lines += [fmt_profile(p), ""]
    return "\n".join(lines)
