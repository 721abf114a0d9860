"""One command from the op benchmarks to a report: markdown, PNG plots and one self-contained HTML page.

    python benchmarks/report.py [--from benchmarks/out/ops.json] [--quick] [--out benchmarks/report]

Without --from it runs benchmarks/bench_ops.py's benchmark itself (with the same --quick, --ops,
--threads and --min-time arguments), which also measures this machine's limits (copy bandwidth
and sgemm peak at 1 and 2 threads), and keeps the data as ops.json next to the report. Writes to
--out: report.md, report.html (plots embedded as data URIs, nothing else needed to view it) and
the PNGs: per op the speedup over torchvision's fp32 NCHW kernel and the achieved GB/s against
the copy bandwidth, and one roofline (achieved GFLOP/s against flops per byte) of every row.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import math
import sys
import textwrap
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from peak_memory import memory_markdown, memory_table  # noqa: E402

VARIANT_ORDER = [
    ("torchvision", "nchw", "float32"),
    ("torchvision", "channels_last", "float32"),
    ("torchvision", "nchw", "bfloat16"),
    ("torchvision", "channels_last", "bfloat16"),
    ("ours", "nchw", "float32"),
    ("ours", "nchw", "bfloat16"),
    ("ours", "channels_last", "float32"),
    ("ours", "channels_last", "bfloat16"),
    ("torchvision", "-", "float32"),
    ("ours", "-", "float32"),
]
COLOURS = {
    ("torchvision", "nchw", "float32"): "#9e9e9e",
    ("torchvision", "channels_last", "float32"): "#cfcfcf",
    ("torchvision", "nchw", "bfloat16"): "#6b6b6b",
    ("torchvision", "channels_last", "bfloat16"): "#e6e6e6",
    ("ours", "nchw", "float32"): "#1f5fa8",
    ("ours", "nchw", "bfloat16"): "#7fb2e5",
    ("ours", "channels_last", "float32"): "#d9640f",
    ("ours", "channels_last", "bfloat16"): "#f5b27a",
    ("torchvision", "-", "float32"): "#9e9e9e",
    ("ours", "-", "float32"): "#1f5fa8",
    # depthwise_conv's peers (its ATen rows are the baseline, not a bar)
    ("torch.compile", "nchw", "float32"): "#2e8b57",
    ("torch.compile", "nchw", "bfloat16"): "#8fd19e",
    ("torch.compile", "channels_last", "float32"): "#6a3d9a",
    ("torch.compile", "channels_last", "bfloat16"): "#cab2d6",
    ("onnxruntime", "nchw", "float32"): "#c0392b",
    ("openvino", "nchw", "float32"): "#8c564b",
}
OP_MARKERS = {
    "roi_align": "o",
    "roi_pool": "s",
    "ps_roi_align": "^",
    "ps_roi_pool": "v",
    "nms": "D",
    "frozen_batch_norm": "P",
    "deform_conv2d": "X",
    "depthwise_conv": "*",
}
IMPL_COLOURS = {"ours": "#1f5fa8", "torchvision": "#8a8a8a"}
SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "nchw": "NCHW", "channels_last": "CL", "-": ""}


# ---------------------------------------------------------------------------------------------
# Data


def variant_key(r: dict) -> tuple[str, str, str]:
    return (r["impl"], r["layout"], r["dtype"])


def variant_label(key: tuple[str, str, str]) -> str:
    impl, layout, dtype = key
    return " ".join(s for s in (impl, SHORT.get(layout, layout), SHORT.get(dtype, dtype)) if s)


def derive(rows: list[dict], limits: dict[str, float]) -> list[dict]:
    """Rows with the achieved GB/s and GFLOP/s, their share of this machine's limits at the row's
    thread count and the arithmetic intensity; None where the row has no bytes/flops model."""
    out = []
    for r in rows:
        d = dict(r)
        sec = r["ms"] / 1e3
        t = r["threads"]
        bw, peak = limits.get(f"copy_gb_s_{t}t"), limits.get(f"sgemm_gflop_s_{t}t")
        nbytes, flops = r.get("bytes"), r.get("flops")
        d["gb_s"] = nbytes / sec / 1e9 if nbytes else None
        d["gflop_s"] = flops / sec / 1e9 if flops else None
        d["flop_per_byte"] = flops / nbytes if nbytes and flops else None
        d["pct_copy_bw"] = 100 * d["gb_s"] / bw if d["gb_s"] and bw else None
        d["pct_sgemm"] = 100 * d["gflop_s"] / peak if d["gflop_s"] and peak else None
        out.append(d)
    return out


def ops_in(rows: list[dict]) -> list[str]:
    """The ops of `rows`, in the order the benchmark ran them (the op table's)."""
    return list(dict.fromkeys(r["op"] for r in rows))


def _ordered_variants(rows: list[dict]) -> list[tuple[str, str, str]]:
    present = list(dict.fromkeys(variant_key(r) for r in rows))
    return [v for v in VARIANT_ORDER if v in present] + [v for v in present if v not in VARIANT_ORDER]


def _geomean(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


# ---------------------------------------------------------------------------------------------
# Plots


def _case_label(op: str, case: str, threads: int) -> str:
    name = case[len(op) :].strip() if case.startswith(op + " ") else case
    return "\n".join(textwrap.wrap(name, 18)) + f"\n{threads}T"


def _grouped_bars(ax: Any, rows: list[dict], value: str, op: str, log: bool = False, ceiling: float = 0.0) -> None:
    """Bars of `value` per (case, threads) group, one bar per (impl, layout, dtype); the y axis
    reaches at least `ceiling`."""
    groups = list(dict.fromkeys((r["case"], r["threads"]) for r in rows))
    variants = _ordered_variants(rows)
    by = {(r["case"], r["threads"], variant_key(r)): r[value] for r in rows}
    width = 0.8 / len(variants)
    top = max([v for v in by.values() if v] + [ceiling], default=1.0)
    bottom = min((v for v in by.values() if v), default=1.0) / 3
    if log:
        ax.set_yscale("log")
    for vi, v in enumerate(variants):
        xs, ys = [], []
        for gi, (case, threads) in enumerate(groups):
            y = by.get((case, threads, v))
            if y:
                xs.append(gi - 0.4 + width * (vi + 0.5))
                ys.append(y)
        bars = ax.bar(xs, ys, width, label=variant_label(v), color=COLOURS.get(v), edgecolor="#333", linewidth=0.4)
        for b, y in zip(bars, ys, strict=True):
            ax.text(
                b.get_x() + b.get_width() / 2,
                y * 1.06 if log else y + top * 0.01,
                f"{y:.2g}" if y < 1 else f"{y:.1f}" if y < 100 else f"{y:.0f}",
                ha="center",
                va="bottom",
                fontsize=6.5,
                rotation=90 if len(variants) > 3 else 0,
            )
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([_case_label(op, c, t) for c, t in groups], fontsize=7.5)
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.set_ylim(*((bottom, top * 3) if log else (0, top * 1.18)))
    ax.grid(axis="y", alpha=0.3)


def _direction_axes(rows: list[dict]) -> tuple[Any, list[tuple[str, Any, list[dict]]]]:
    directions = [d for d in ("forward", "backward") if any(r["direction"] == d for r in rows)]
    groups = len({(r["case"], r["threads"]) for r in rows})
    variants = len(_ordered_variants(rows))
    fig, axes = plt.subplots(
        len(directions),
        1,
        figsize=(max(7.5, max(1.0, 0.3 + 0.2 * variants) * groups + 2.5), 0.8 + 3.4 * len(directions)),
        squeeze=False,
    )
    return fig, [(d, axes[i][0], [r for r in rows if r["direction"] == d]) for i, d in enumerate(directions)]


def _finish(fig: Any, ax: Any, title: str, path: Path) -> None:
    """Title and one legend (from `ax`) above the panels, then save."""
    handles, labels = ax.get_legend_handles_labels()
    height = fig.get_figheight()
    ncol = len(labels) if len(labels) <= 4 else math.ceil(len(labels) / 2)  # 2 rows: variants pair up
    fig.suptitle(title, fontsize=11, y=1 - 0.08 / height)
    fig.legend(
        handles,
        labels,
        loc="upper center",
        ncol=ncol,
        fontsize=8,
        frameon=False,
        bbox_to_anchor=(0.5, 1 - 0.35 / height),
    )
    fig.tight_layout(rect=(0, 0, 1, 1 - (0.4 + 0.18 * math.ceil(len(labels) / ncol)) / height))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_speedup(op: str, rows: list[dict], path: Path) -> None:
    """Per direction, grouped bars of the speedup over torchvision's fp32 NCHW kernel."""
    rows = [r for r in rows if r.get("speedup_vs_torchvision_fp32_nchw")]
    fig, panels = _direction_axes(rows)
    for direction, ax, rs in panels:
        _grouped_bars(ax, rs, "speedup_vs_torchvision_fp32_nchw", op)
        ax.axhline(1.0, color="#c00", linewidth=0.8, linestyle="--")
        ax.set_ylabel(f"{direction}: speedup (x)")
    baseline = "torchvision fp32" + (" NCHW" if op != "nms" else "")
    _finish(fig, panels[0][1], f"{op}: speedup over {baseline} (same case, direction and threads)", path)


def plot_bandwidth(op: str, rows: list[dict], limits: dict[str, float], path: Path) -> None:
    """Per direction, grouped bars (log scale) of the achieved GB/s of the bytes model, with the
    copy bandwidth of each thread count."""
    rows = [r for r in rows if r.get("gb_s")]
    fig, panels = _direction_axes(rows)
    for direction, ax, rs in panels:
        threads = {r["threads"] for r in rs}
        _grouped_bars(ax, rs, "gb_s", op, log=True, ceiling=max(limits.get(f"copy_gb_s_{t}t", 0) for t in threads))
        for t, style in ((1, "--"), (2, ":")):
            bw = limits.get(f"copy_gb_s_{t}t")
            if bw and t in threads:
                ax.axhline(bw, color="#c00", linewidth=1.0, linestyle=style, label=f"copy {bw:.1f} GB/s ({t}T)")
        ax.set_ylabel(f"{direction}: GB/s (log)")
    _finish(fig, panels[0][1], f"{op}: achieved GB/s (lower-bound bytes / time) against the copy bandwidth", path)


def plot_roofline(rows: list[dict], limits: dict[str, float], path: Path) -> None:
    """Log-log achieved GFLOP/s against flops per byte, one panel per thread count, under the
    copy-bandwidth and sgemm roofs of both thread counts (the panel's own drawn bold)."""
    rows = [r for r in rows if r.get("flop_per_byte") and r.get("gflop_s")]
    threads = sorted({r["threads"] for r in rows})
    fig, axes = plt.subplots(1, len(threads), figsize=(6.4 * len(threads), 5.2), squeeze=False, sharey=True)
    ais = [r["flop_per_byte"] for r in rows]
    ridge = [
        limits[f"sgemm_gflop_s_{t}t"] / limits[f"copy_gb_s_{t}t"]
        for t in (1, 2)
        if f"sgemm_gflop_s_{t}t" in limits and f"copy_gb_s_{t}t" in limits
    ]
    x_lo, x_hi = min(ais + ridge) / 4, max(ais + ridge) * 4
    y_lo = min(r["gflop_s"] for r in rows) / 4
    y_hi = 2.5 * max([r["gflop_s"] for r in rows] + [limits.get(f"sgemm_gflop_s_{t}t", 0) for t in (1, 2)])
    xs = [x_lo * (x_hi / x_lo) ** (i / 200) for i in range(201)]
    for ax, t in zip(axes[0], threads, strict=True):
        for rt, style in ((1, "-"), (2, "--")):
            bw, peak = limits.get(f"copy_gb_s_{rt}t"), limits.get(f"sgemm_gflop_s_{rt}t")
            if not (bw and peak):
                continue
            lw, alpha = (2.0, 0.9) if rt == t else (1.0, 0.45)
            ax.plot(xs, [min(peak, bw * x) for x in xs], style, color="#c00", linewidth=lw, alpha=alpha)
            ax.text(
                x_lo * 1.15, bw * x_lo * 1.15 * 1.25, f"copy {bw:.1f} GB/s ({rt}T)", rotation=0, fontsize=7, alpha=alpha
            )
            ax.text(x_hi / 1.2, peak * 1.08, f"sgemm {peak:.0f} GFLOP/s ({rt}T)", ha="right", fontsize=7, alpha=alpha)
        for r in rows:
            if r["threads"] != t:
                continue
            ours = r["impl"].startswith("ours")
            ax.scatter(
                r["flop_per_byte"],
                r["gflop_s"],
                marker=OP_MARKERS.get(r["op"], "x"),
                s=38 if r["direction"] == "forward" else 26,
                facecolors=IMPL_COLOURS["ours"] if ours else "none",
                edgecolors=IMPL_COLOURS["ours" if ours else r["impl"]] if ours or r["impl"] in IMPL_COLOURS else "k",
                linewidths=1.0,
                alpha=0.85,
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(x_lo, x_hi)
        ax.set_ylim(y_lo, y_hi)
        ax.set_xlabel("arithmetic intensity (flops / lower-bound bytes)")
        ax.set_title(f"{t} thread{'s' if t > 1 else ''}", fontsize=10)
        ax.grid(which="both", alpha=0.2)
    axes[0][0].set_ylabel("achieved GFLOP/s")
    handles = [
        Line2D([], [], marker=OP_MARKERS.get(o, "x"), linestyle="", color="#444", label=o) for o in ops_in(rows)
    ] + [
        Line2D([], [], marker="o", linestyle="", markerfacecolor=IMPL_COLOURS["ours"], color=IMPL_COLOURS["ours"]),
        Line2D([], [], marker="o", linestyle="", markerfacecolor="none", color=IMPL_COLOURS["torchvision"]),
    ]
    labels = [h.get_label() for h in handles[:-2]] + ["ours (filled)", "torchvision (hollow)"]
    fig.legend(handles, labels, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.suptitle("Roofline: every row (forward large, backward small markers)", fontsize=11)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Tables


def _fmt(v: Any, spec: str = ".1f") -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def _table(headers: list[str], body: list[list[str]]) -> tuple[str, str]:
    """The same table as markdown and as HTML."""
    md = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    md += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
    h = ["<table>", "<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in headers) + "</tr>"]
    h += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body]
    h.append("</table>")
    return "\n".join(md), "\n".join(h)


def machine_table(meta: dict) -> tuple[str, str]:
    lim = meta.get("limits", {})
    body = []
    for t in (1, 2):
        bw, peak = lim.get(f"copy_gb_s_{t}t"), lim.get(f"sgemm_gflop_s_{t}t")
        body.append(
            [
                f"{t}",
                _fmt(bw),
                _fmt(peak, ".0f"),
                _fmt(peak / 2 if peak else None, ".0f"),
                _fmt(peak / bw if peak and bw else None),
            ]
        )
    return _table(["threads", "copy GB/s", "sgemm GFLOP/s", "fp32 GFMA/s", "ridge (flop/B)"], body)


def summary_tables(rows: list[dict]) -> list[tuple[str, str]]:
    """summary_table of each family of ops with the same variants (the RoI ops; nms)."""
    families: dict[tuple, list[str]] = defaultdict(list)
    rows = [r for r in rows if r.get("speedup_vs_torchvision_fp32_nchw")]  # depthwise_conv: its own goals table
    for op in ops_in(rows):
        families[tuple(_ordered_variants([r for r in rows if r["op"] == op]))].append(op)
    return [summary_table([r for r in rows if r["op"] in ops]) for ops in families.values()]


def summary_table(rows: list[dict]) -> tuple[str, str]:
    """Per op, direction and thread count: the geometric mean over cases of each variant's speedup."""
    variants = _ordered_variants(rows)
    acc: dict[tuple, dict[tuple, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r.get("speedup_vs_torchvision_fp32_nchw"):
            acc[(r["op"], r["direction"], r["threads"])][variant_key(r)].append(r["speedup_vs_torchvision_fp32_nchw"])
    order = {o: i for i, o in enumerate(ops_in(rows))}
    body = []
    for (op, direction, t), per in sorted(
        acc.items(), key=lambda kv: (order[kv[0][0]], kv[0][1] != "forward", kv[0][2])
    ):
        cases = len({r["case"] for r in rows if r["op"] == op})
        body.append(
            [op, direction, str(t), str(cases)] + [f"{_geomean(per[v]):.2f}x" if per.get(v) else "" for v in variants]
        )
    return _table(["op", "direction", "threads", "cases"] + [variant_label(v) for v in variants], body)


def op_table(rows: list[dict]) -> tuple[str, str]:
    headers = [
        "case",
        "dir",
        "impl",
        "layout",
        "dtype",
        "T",
        "ms (median)",
        "speedup",
        "GB/s",
        "% copy BW",
        "GFLOP/s",
        "% sgemm",
        "flop/B",
        "line-read floor ms",
    ]
    body = [
        [
            r["case"],
            r["direction"],
            r["impl"],
            r["layout"],
            r["dtype"],
            str(r["threads"]),
            f"{r['ms']:.3f}" if r["ms"] < 1 else f"{r['ms']:.2f}",
            f"{r['speedup_vs_torchvision_fp32_nchw']:.2f}x"
            if r.get("speedup_vs_torchvision_fp32_nchw")
            else f"{r['speedup_vs_aten']:.2f}x ATen"
            if r.get("speedup_vs_aten")
            else "",
            _fmt(r.get("gb_s"), ".2f"),
            _fmt(r.get("pct_copy_bw"), ".0f"),
            _fmt(r.get("gflop_s"), ".2f"),
            _fmt(r.get("pct_sgemm"), ".1f"),
            _fmt(r.get("flop_per_byte"), ".2f"),
            _fmt(r.get("line_floor_ms"), ".3f"),
        ]
        for r in rows
    ]
    return _table(headers, body)


def kernels_table(meta: dict, ops: list[str]) -> tuple[str, str]:
    """Whose CPU kernel each dispatcher op (and replaced Python function) ran on, for our rows
    and for torchvision's rows."""
    info = meta.get("info", {})
    ours = {**info.get("ops", {}), **info.get("python", {})}  # info()["python"]: replaced Python functions
    theirs = meta.get("ops_when_disabled", {})
    kernels = meta.get("kernels", {})  # per op, from the op table: what its rows ran
    names = [k for op in ops for k in kernels.get(op, [op])]
    names += [k for k in ours if k not in names]
    body = [
        [k, ours.get(k, "?"), theirs.get(k, "?"), "yes" if any(k in kernels.get(o, []) for o in ops) else ""]
        for k in names
    ]
    return _table(
        ["torchvision op or function", "'ours' rows ran on", "'torchvision' rows ran on", "benchmarked"], body
    )


def info_table(meta: dict) -> tuple[str, str]:
    info = meta.get("info", {})
    return _table(["info() key", "value"], [[k, str(v)] for k, v in info.items() if k not in ("ops", "python")])


# ---------------------------------------------------------------------------------------------
# Depthwise convolution (issue 19): ours against ATen eager and the peers, the goals, the roofline

DW_GOALS = {"conv1d": 15.0, "never_slower": 1.0, "nchw": 5.0, "cl_fp32": 2.0, "large_pct": 80.0, "backward": 2.0}
DW_PEERS = ("torch.compile", "onnxruntime", "openvino")
DEFAULT_LLC = 32 * 2**20  # where the machine limits do not give the last-level cache


def _us(ms: float) -> str:
    return f"{ms * 1e3:.1f}"


def _ms(ms: float) -> str:
    return f"{ms:.3f}" if ms < 10 else f"{ms:.2f}"


def _dw_groups(rows: list[dict]) -> dict[tuple, dict[str, dict]]:
    """Depthwise rows by (case, direction, layout, dtype, threads), then by impl, in run order."""
    groups: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in rows:
        groups[(r["case"], r["direction"], r["layout"], r["dtype"], r["threads"])][r["impl"]] = r
    return groups


def _is_large(r: dict, limits: dict[str, float]) -> bool:
    """Whether the row's bytes exceed the last-level cache: the rows the roofline goal is about."""
    return bool(r.get("bytes")) and r["bytes"] > (limits.get("llc_bytes") or DEFAULT_LLC)


def _gm(xs: list[float]) -> str:
    return f"{_geomean(xs):.2f}x over {len(xs)} rows" if xs else ""


def dw_goals_table(rows: list[dict], limits: dict[str, float]) -> tuple[str, str]:
    """Issue 19's speed goals per thread count: what the run measured, and whether it meets them."""
    body = []

    def add(goal: str, t: int, checked: list[float], measured: str, target: float, unit: str = "x") -> None:
        met = "" if not checked else "yes" if min(checked) >= target else "**no**"
        body.append([goal, str(t), measured if checked else "(no rows)", f">= {target:g}{unit}", met])

    for t in sorted({r["threads"] for r in rows}):
        rs = [r for r in rows if r["threads"] == t]
        module = [r["speedup_vs_aten"] for r in rs if r["impl"] == "ours_module"]
        fwd = [r for r in rs if r["impl"] == "ours" and r["direction"] == "forward"]
        every = [r["speedup_vs_aten"] for r in fwd]
        nchw = [r["speedup_vs_aten"] for r in fwd if r["layout"] == "nchw"]
        cl32 = [r["speedup_vs_aten"] for r in fwd if r["layout"] == "channels_last" and r["dtype"] == "float32"]
        large = [r for r in fwd if _is_large(r, limits) and r.get("pct_copy_bw")]
        bwd = [r["speedup_vs_aten"] for r in rs if r["impl"] == "ours" and r["direction"] == "backward"]
        conv1d = ", ".join(f"{x:.1f}x" for x in module)
        add("conv1d through optimize(), vs F.conv1d (every case)", t, module, conv1d, DW_GOALS["conv1d"])
        add("conv2d forward, vs ATen (every row: min)", t, every, f"{min(every, default=0):.2f}x", 1.0)
        # A geometric mean is the goal itself, not each of its rows.
        add("conv2d NCHW rows (geometric mean)", t, [_geomean(nchw)] if nchw else [], _gm(nchw), DW_GOALS["nchw"])
        cl = [_geomean(cl32)] if cl32 else []
        add("conv2d channels_last fp32 rows (geometric mean)", t, cl, _gm(cl32), DW_GOALS["cl_fp32"])
        pct = ", ".join(f"{r['pct_copy_bw']:.0f}% {SHORT[r['layout']]} {SHORT[r['dtype']]}" for r in large)
        add("large rows: % of the copy bandwidth", t, [r["pct_copy_bw"] for r in large], pct, 80.0, "%")
        bw = f"{_gm(bwd)}; min {min(bwd, default=0):.2f}x"
        add("conv2d backward, vs ATen (geometric mean)", t, [_geomean(bwd)] if bwd else [], bw, DW_GOALS["backward"])
    return _table(["goal", "threads", "measured", "goal", "met"], body)


def _vs(r: dict | None, fmt) -> str:
    return f"{fmt(r['ms'])} ({r['speedup_vs_aten']:.2f}x)" if r else ""


def dw_conv1d_table(rows: list[dict]) -> tuple[str, str]:
    """The conv1d cases in microseconds per call: ATen, ours through optimize() and the op, the
    empty op (and its share of our module's call), the peers, and the fastest."""
    body = []
    for (case, _, _, _, t), g in _dw_groups([r for r in rows if r["layout"] == "ncl"]).items():
        ours, empty = g.get("ours_module"), g.get("empty_op")
        share = f" ({100 * empty['ms'] / ours['ms']:.0f}%)" if ours and empty else ""
        body.append(
            [case, str(t), _us(g["aten"]["ms"]), _vs(g.get("aten_module"), _us), _vs(ours, _us)]
            + [_vs(g.get("ours_op"), _us), _us(empty["ms"]) + share if empty else ""]
            + [_vs(g.get(p), _us) for p in DW_PEERS]
            + [g["aten"]["fastest"]]
        )
    headers = ["case", "T", "ATen F.conv1d", "ATen nn.Conv1d", "ours optimize()", "ours op"]
    headers += ["empty op (share of ours optimize())", *DW_PEERS, "fastest"]
    return _table(headers, body)


def dw_conv2d_table(rows: list[dict], direction: str, limits: dict[str, float]) -> tuple[str, str]:
    """The conv2d cases of `direction` in ms per call: ATen, ours, (forward) the peers and the
    empty op, the fastest, and our MB, GB/s and share of the copy bandwidth."""
    body = []
    for (case, d, layout, dtype, t), g in _dw_groups(rows).items():
        if d != direction or layout == "ncl":
            continue
        ours = g["ours"]
        cells = [case, SHORT[layout], SHORT[dtype], str(t), _ms(g["aten"]["ms"]), _vs(ours, _ms)]
        if direction == "forward":
            cells += [_vs(g.get(p), _ms) for p in DW_PEERS] + [_ms(g["empty_op"]["ms"]) if "empty_op" in g else ""]
        cells += [ours["fastest"], f"{ours['bytes'] / 1e6:.2f}", _fmt(ours.get("gb_s"), ".1f")]
        cells += [_fmt(ours.get("pct_copy_bw"), ".0f"), "yes" if _is_large(ours, limits) else ""]
        body.append(cells)
    headers = ["case", "layout", "dtype", "T", "ATen ms", "ours ms (x ATen)"]
    headers += [*DW_PEERS, "empty op"] if direction == "forward" else []
    headers += ["fastest", "MB", "ours GB/s", "ours % copy BW", "large"]
    return _table(headers, body)


def dw_roofline_table(rows: list[dict], limits: dict[str, float]) -> tuple[str, str]:
    """The large rows (bytes beyond the last-level cache) against the copy bandwidth: the time a
    pass over their bytes takes at that bandwidth, and each impl's GB/s and share of it."""
    body = []
    for (case, d, layout, dtype, t), g in _dw_groups(rows).items():
        if not _is_large(g.get("ours", {}), limits) or not limits.get(f"copy_gb_s_{t}t"):
            continue
        floor_ms = g["ours"]["bytes"] / limits[f"copy_gb_s_{t}t"] / 1e6
        for impl, r in g.items():
            if r.get("gb_s"):
                cells = [case, d, SHORT[layout], SHORT[dtype], str(t), impl, f"{r['bytes'] / 1e6:.1f}"]
                cells += [_ms(floor_ms), _ms(r["ms"]), f"{r['gb_s']:.1f}", f"{r['pct_copy_bw']:.0f}"]
                body.append(cells)
    if not body:
        body.append(["(no row of this run exceeds the last-level cache)"] + [""] * 10)
    headers = ["case", "dir", "layout", "dtype", "T", "impl", "MB", "copy-bandwidth floor ms", "ms", "GB/s"]
    return _table([*headers, "% copy BW"], body)


def dw_fastest_table(rows: list[dict]) -> tuple[str, str]:
    """Per case, direction and thread count, the fastest convolution in each dtype over every
    impl and layout: which to use for a shape, and whether channels_last pays."""
    best: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in rows:
        kept = best[r["case"], r["direction"], r["threads"]]
        if r["impl"] != "empty_op" and (r["dtype"] not in kept or r["ms"] < kept[r["dtype"]]["ms"]):
            kept[r["dtype"]] = r
    dtypes = [d for d in ("float32", "bfloat16") if any(d in b for b in best.values())]

    def cell(r: dict | None) -> str:
        return f"{r['impl']} {SHORT.get(r['layout'], r['layout'])} {_ms(r['ms'])} ms" if r else ""

    body = [[case, d, str(t)] + [cell(b.get(dt)) for dt in dtypes] for (case, d, t), b in best.items()]
    return _table(["case", "dir", "T"] + [f"fastest {SHORT[d]} (impl, layout, time)" for d in dtypes], body)


def dw_paths_table(rows: list[dict]) -> tuple[str, str]:
    """Which of our paths each forward row took (torchvision_cpu_ext.depthwise_path at its threads)."""
    body = [
        [r["case"], SHORT.get(r["layout"], r["layout"]), SHORT[r["dtype"]], str(r["threads"]), r["path"]]
        for r in rows
        if r.get("path") and r["impl"] in ("ours", "ours_module")
    ]
    return _table(["case", "layout", "dtype", "T", "path"], body)


def plot_dw_speedup(rows: list[dict], path: Path) -> None:
    """Per direction, grouped bars (log scale) of the conv2d rows' speedup over ATen eager."""
    rows = [r for r in rows if r["layout"] != "ncl" and r["impl"] not in ("aten", "empty_op")]
    fig, panels = _direction_axes(rows)
    for direction, ax, rs in panels:
        _grouped_bars(ax, rs, "speedup_vs_aten", "depthwise_conv", log=True)
        ax.axhline(1.0, color="#c00", linewidth=0.8, linestyle="--")
        ax.set_ylabel(f"{direction}: speedup (x, log)")
    _finish(fig, panels[0][1], "depthwise conv2d: speedup over ATen eager F.conv2d (same layout and dtype)", path)


def dw_section(rows: list[dict], meta: dict, limits: dict[str, float]) -> list[tuple[str, str, str]]:
    """The depthwise section's parts as (kind, markdown, html): "h3" headings, "p" text, tables."""
    dw = meta.get("depthwise", {})
    peers = dw.get("peers", {})
    versions = ", ".join(f"{k} {v}" for k, v in peers.items() if v)
    notes = " ".join(dw.get("notes", []))
    calls = "; ".join(f"{k}: `{v}`" for k, v in dw.get("calls", {}).items())
    text = (
        "Ours against ATen eager (`F.conv1d/2d(..., groups=C)`) and the peers, configurations timed in "
        "turn in the same run (medians of 5 rounds). Speedups (x) are ATen eager's time over the row's, same "
        "case, direction, layout and dtype; 'fastest' names the fastest convolution of the row's layout and "
        "dtype (ONNX Runtime and OpenVINO run float32 NCHW input only). The empty op has the op's schema and a "
        "C++ kernel that only allocates the output: what binding, dispatch and allocation cost before any "
        "arithmetic. The conv2d rows have no bias, as torchvision's MobileNet and EfficientNet depthwise layers "
        "(a batch norm follows; optimize() folds it into a bias of C elements, which the rows leave out). "
        f"Peers: {versions or 'none'}. {notes}"
    )
    parts = [("p", text, text), ("p", f"What each impl calls: {calls}", f"What each impl calls: {calls}")]
    for title, table in (
        ("Goals (issue 19)", dw_goals_table(rows, limits)),
        ("Which is fastest for my shape", dw_fastest_table(rows)),
        ("conv1d, microseconds per call (x F.conv1d)", dw_conv1d_table(rows)),
        ("conv2d forward", dw_conv2d_table(rows, "forward", limits)),
        ("conv2d backward (input and weight gradients)", dw_conv2d_table(rows, "backward", limits)),
        ("Roofline: the large rows against the copy bandwidth", dw_roofline_table(rows, limits)),
        ("Our paths (`torchvision_cpu_ext.depthwise_path`)", dw_paths_table(rows)),
    ):
        parts += [("h3", title, title), ("table", *table)]
    return parts


# ---------------------------------------------------------------------------------------------
# The report

CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1250px;
       color: #222; line-height: 1.4; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 1.8em; }
table { border-collapse: collapse; font-size: 0.82em; margin: .6em 0 1.2em; }
th, td { border: 1px solid #ccc; padding: 2px 7px; text-align: left; }
th { background: #f2f2f2; } tr:nth-child(even) td { background: #fafafa; }
img { max-width: 100%; border: 1px solid #eee; margin: .4em 0; }
pre { background: #f6f6f6; padding: .8em; font-size: 0.82em; overflow-x: auto; }
details summary { cursor: pointer; color: #1f5fa8; }
.meta li { margin: .1em 0; }
"""


def _meta_lines(meta: dict) -> list[str]:
    info = meta.get("info", {})
    lim = meta.get("limits", {})
    lines = [
        f"CPU: {meta.get('cpu', '?')}, ATen capability {meta.get('aten_cpu_capability', '?')}, "
        f"our ISA variant {meta.get('isa_variant', '?')}",
        f"torch {meta.get('torch', '?')}, torchvision {meta.get('torchvision', '?')}, Python {meta.get('python', '?')}",
        f"benchmark command: {meta.get('command', '?')}",
    ]
    if info:
        lines.append(f"kernel library: {info.get('library', '?')} ({info.get('library_source', '?')})")
    if "alloc_touch_50mb_ms" in lim:
        lines.append(f"allocating and first touching a 50 MB tensor: {lim['alloc_touch_50mb_ms']:.1f} ms")
    return lines


def build_report(data: dict, out: Path, source: str = "") -> dict[str, Path]:
    """Writes report.md, report.html and the PNGs for `data` ({"meta", "rows"}) into `out`;
    returns the paths written by name."""
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("speedup_*.png"), *out.glob("bandwidth_*.png"), *out.glob("roofline.png")]:
        old.unlink()  # plots of an earlier report, which this one may not have
    meta, limits = data["meta"], data["meta"].get("limits", {})
    rows = derive(data["rows"], limits)
    ops = ops_in(rows)
    written: dict[str, Path] = {}
    plots: dict[str, list[tuple[str, str]]] = defaultdict(list)  # op or "roofline" -> (file, caption)
    for op in ops:
        rs = [r for r in rows if r["op"] == op]
        if op == "depthwise_conv":  # too many variants for the bandwidth bars: its roofline table instead
            if any(r["layout"] != "ncl" for r in rs):
                plot_dw_speedup(rs, out / "speedup_depthwise_conv.png")
                plots[op].append(("speedup_depthwise_conv.png", "depthwise conv2d: speedup over ATen eager"))
            continue
        if any(r.get("speedup_vs_torchvision_fp32_nchw") for r in rs):
            name = f"speedup_{op}.png"
            plot_speedup(op, rs, out / name)
            plots[op].append((name, f"{op}: speedup over torchvision fp32 NCHW"))
        if any(r.get("gb_s") for r in rs):
            name = f"bandwidth_{op}.png"
            plot_bandwidth(op, rs, limits, out / name)
            plots[op].append((name, f"{op}: achieved GB/s against the copy bandwidth"))
    if any(r.get("flop_per_byte") and r.get("gflop_s") for r in rows) and limits:
        plot_roofline(rows, limits, out / "roofline.png")
        plots["roofline"].append(("roofline.png", "roofline of every row"))
    for files in plots.values():
        for name, _ in files:
            written[name] = out / name

    model = meta.get("work_model") or "(not recorded in this data: rows have no bytes / flops)"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    src = source or "a benchmark run by this command"
    machine_md, machine_html = machine_table(meta)
    summaries = summary_tables(rows)
    kernels_md, kernels_html = kernels_table(meta, ops)
    info_md, info_html = info_table(meta)
    intro = (
        "Our kernels against torchvision's, in the same process, on shapes from real models (FPN levels and the "
        "mask head of Faster/Mask R-CNN R50-FPN, an R-FCN head for the ps ops). Speedups are against torchvision's "
        "fp32 NCHW kernel of the same case, direction and thread count (depthwise_conv, which torchvision has "
        "no kernel of: against ATen eager, with the peers). GB/s and GFLOP/s are computed from the "
        "bytes/flops model below (bytes are a lower bound, so GB/s is too) and set against this machine's limits, "
        "measured by the same benchmark command as the timings."
    )

    md = ["# torchvision_cpu_ext op benchmark report", "", f"Generated {stamp} from {src}.", "", intro, ""]
    md += ["## Machine and run", ""] + [f"- {line}" for line in _meta_lines(meta)] + ["", machine_md, ""]
    md += ["## Summary: speedup over torchvision fp32 NCHW (geometric mean over cases)", ""]
    for summary_md, _ in summaries:
        md += [summary_md, ""]
    if plots.get("roofline"):
        md += ["## Roofline", "", "![roofline](roofline.png)", ""]
    memory = data.get("memory")
    dw_parts = (
        dw_section([r for r in rows if r["op"] == "depthwise_conv"], meta, limits) if "depthwise_conv" in ops else []
    )
    for op in ops:
        md += [f"## {op}", ""]
        md += [f"![{cap}]({name})" for name, cap in plots.get(op, [])] + [""]
        if op == "depthwise_conv":
            for kind, part_md, _ in dw_parts:
                md += [f"### {part_md}" if kind == "h3" else part_md, ""]
            md += ["### All rows", ""]
        md += [op_table([r for r in rows if r["op"] == op])[0], ""]
        if op == "deform_conv2d" and memory:
            md += ["### Extra peak memory per call", "", memory_markdown(memory).rstrip(), ""]
    md += ["## Bytes and flops model", "", "```", model.rstrip(), "```", ""]
    md += ["## Kernels that ran (`torchvision_cpu_ext.info()`)", "", kernels_md, "", info_md, ""]
    (out / "report.md").write_text("\n".join(md))
    written["report.md"] = out / "report.md"

    def img(name: str, cap: str) -> str:
        b64 = base64.b64encode((out / name).read_bytes()).decode("ascii")
        return f'<figure><img alt="{html.escape(cap)}" src="data:image/png;base64,{b64}"></figure>'

    h = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>torchvision_cpu_ext op benchmark report</title>",
        f"<style>{CSS}</style></head><body>",
        "<h1>torchvision_cpu_ext op benchmark report</h1>",
        f"<p>Generated {html.escape(stamp)} from {html.escape(src)}.</p>",
        f"<p>{html.escape(intro)}</p>",
        "<h2>Machine and run</h2>",
        '<ul class="meta">' + "".join(f"<li>{html.escape(line)}</li>" for line in _meta_lines(meta)) + "</ul>",
        machine_html,
        "<h2>Summary: speedup over torchvision fp32 NCHW (geometric mean over cases)</h2>",
        *(summary_html for _, summary_html in summaries),
    ]
    if plots.get("roofline"):
        h += ["<h2>Roofline</h2>", img(*plots["roofline"][0])]
    for op in ops:
        h += [f"<h2>{html.escape(op)}</h2>"] + [img(name, cap) for name, cap in plots.get(op, [])]
        if op == "depthwise_conv":
            for kind, _, part_html in dw_parts:
                h.append(part_html if kind == "table" else f"<{kind}>{html.escape(part_html)}</{kind}>")
        h += [
            "<details open><summary>all rows</summary>",
            op_table([r for r in rows if r["op"] == op])[1],
            "</details>",
        ]
        if op == "deform_conv2d" and memory:
            note = memory_markdown(memory).split("\n", 1)[0]  # the note and the calibration
            h += [
                "<h3>Extra peak memory per call</h3>",
                f"<p>{html.escape(note)}</p>",
                _table(*memory_table(memory["rows"]))[1],
            ]
    h += ["<h2>Bytes and flops model</h2>", f"<pre>{html.escape(model)}</pre>"]
    h += ["<h2>Kernels that ran (<code>torchvision_cpu_ext.info()</code>)</h2>", kernels_html, info_html]
    h += ["</body></html>", ""]
    (out / "report.html").write_text("\n".join(h))
    written["report.html"] = out / "report.html"
    return written


def parser() -> argparse.ArgumentParser:
    """bench_ops' arguments (repeated here so that --from needs neither torch nor the kernels),
    plus --from and --out."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from", dest="source", type=Path, default=None, help="ops.json of an earlier bench_ops run")
    ap.add_argument("--out", type=Path, default=HERE / "report", help="directory of the report")
    ap.add_argument(
        "--quick", action="store_true", help="one or two cases per op (RoI ops: P4), short timing: a smoke run"
    )
    ap.add_argument("--ops", nargs="+", default=None, help="ops to run (default: all)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--min-time", type=float, default=None, help="seconds of timing per row")
    ap.add_argument("--line-floor", action="store_true", help="also time each RoI forward's line-read floor")
    ap.add_argument("--no-memory", action="store_true", help="skip deform_conv2d's peak-memory rows")
    return ap


def main() -> None:
    a = parser().parse_args()
    t0 = time.time()
    if a.source is not None:
        data = json.loads(a.source.read_text())
        source = str(a.source)
    else:
        sys.path.insert(0, str(HERE))
        import bench_ops  # imports torch and builds or loads the kernels: only when benchmarking

        if a.ops is None:
            a.ops = list(bench_ops.ALL_OPS)
        data = bench_ops.run(a)
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "ops.json").write_text(json.dumps(data, indent=1))
        source = "a benchmark run by this command (data: ops.json)"
    written = build_report(data, a.out, source)
    print(f"wrote {len(written)} files to {a.out} in {time.time() - t0:.0f} s: " + ", ".join(sorted(written)))


if __name__ == "__main__":
    main()
