"""The extra peak memory of one op call, from the process's resident set (Linux), and its table.

No torch at import: benchmarks/report.py renders the table from ops.json without it.

extra_peak(call) = VmHWM after the call - VmRSS before it - the bytes of the call's outputs, with
the high-water mark VmHWM reset to the current RSS just before the call (writing "5" to
/proc/self/clear_refs). Run it in a process started with MALLOC_ENV, so that glibc serves every
block of 128 KiB and more with its own mapping and unmaps it on free: by default its mmap
threshold rises to the size of the largest block freed (up to 32 MiB), and blocks below it are
then reused from the heap, where a warm-up call's freed buffers would hide the next call's.
"""

from __future__ import annotations

import gc
from collections.abc import Callable

# glibc malloc settings of the measuring process (the legacy environment variables, which set a
# fixed threshold and so turn off the dynamic one). ARENA_MAX bounds the small blocks cached
# per thread arena.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072", "MALLOC_ARENA_MAX": "2"}

MIB = 1 << 20


def status_bytes(field: str) -> int:
    """A `kB` field of /proc/self/status (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> None:
    """Resets VmHWM to the current VmRSS (Linux 4.0+)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def output_bytes(out) -> int:
    """Bytes of the storages of the tensors in `out` (a tensor or a tuple of them), each once."""
    outs = out if isinstance(out, (tuple, list)) else (out,)
    storages = {}
    for t in outs:
        if hasattr(t, "untyped_storage") and t.numel():
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


def extra_peak(call: Callable, before_each: Callable[[], None] | None = None) -> dict[str, int]:
    """{"rss_growth_bytes": peak RSS during call() - RSS before, "output_bytes": its outputs',
    "extra_peak_bytes": the difference}; the outputs are dropped before returning.
    `before_each` runs first (e.g. to empty a cache that would serve the outputs)."""
    gc.collect()
    if before_each is not None:
        before_each()
    reset_peak()
    before = status_bytes("VmRSS")
    out = call()
    peak = status_bytes("VmHWM")
    nbytes = output_bytes(out)
    del out
    return {"rss_growth_bytes": peak - before, "output_bytes": nbytes, "extra_peak_bytes": peak - before - nbytes}


def calibration() -> dict[str, float]:
    """The method on calls of known extra memory, in MiB (run it in a MALLOC_ENV process):
    - alloc_free_100mib: allocates, fills and frees 100 MiB: extra 100;
    - return_100mib: returns a filled 100 MiB tensor: extra 0 (the output is subtracted);
    - two_8mib: holds two filled 8 MiB blocks at once, then frees them: extra 16. Under glibc's
      default dynamic mmap threshold this read 7.6 here: the first free of a mapped 8 MiB block
      raises the threshold above it, later blocks come from the heap, and freed heap blocks are
      reused by the measured call.
    Each is measured after two warm-up calls."""
    import torch

    def two_8mib():
        a, b = torch.empty(2 * MIB).fill_(1), torch.empty(2 * MIB).fill_(1)
        return a.sum() + b.sum()

    calls = {
        "alloc_free_100mib": lambda: torch.empty(25 * MIB).fill_(1).sum(),
        "return_100mib": lambda: torch.empty(25 * MIB).fill_(1),
        "two_8mib": two_8mib,
    }
    res = {}
    for name, call in calls.items():
        call()  # warm-ups, as every measured call has one
        call()
        res[name] = extra_peak(call)["extra_peak_bytes"] / MIB
    return res


MEMORY_NOTE = (
    "Extra peak memory of one call, MiB: peak resident memory during the call (VmHWM, reset just before it) minus "
    "resident memory before it, minus the bytes of the call's outputs. Measured in a fresh process under "
    "MALLOC_MMAP_THRESHOLD_=128 KiB (blocks from 128 KiB up unmapped on free), each call after a warm-up call of "
    "its configuration on a 16x16 map, with our output pool emptied. 'columns' is torchvision's im2col buffer, "
    "C*9*OH*OW*N*4 bytes; 'fp32 outputs' the fp32 outputs' bytes (subtracted)."
)

# (impl, layout, dtype, threads) of the memory table's columns, in order.
MEMORY_VARIANTS = [
    ("torchvision", "nchw", "float32", 2),
    ("ours", "nchw", "float32", 2),
    ("ours", "channels_last", "float32", 2),
    ("ours", "channels_last", "bfloat16", 2),
    ("ours", "nchw", "float32", 1),
    ("ours", "channels_last", "float32", 1),
    ("ours", "channels_last", "bfloat16", 1),
]
_SHORT = {"torchvision": "tv", "nchw": "NCHW", "channels_last": "CL", "float32": "fp32", "bfloat16": "bf16"}


def memory_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Headers and body of the peak-memory table: a line per case and direction, the extra peak
    MiB of each variant (MEMORY_VARIANTS), torchvision's columns MiB and the outputs' MiB."""
    variants = [
        v for v in MEMORY_VARIANTS if any((r["impl"], r["layout"], r["dtype"], r["threads"]) == v for r in rows)
    ]
    headers = ["case", "dir", "columns MiB", "fp32 outputs MiB"]
    headers += [" ".join(_SHORT.get(s, str(s)) for s in v[:3]) + f" {v[3]}T" for v in variants]
    by = {(r["case"], r["direction"], r["impl"], r["layout"], r["dtype"], r["threads"]): r for r in rows}
    body = []
    for case, direction in dict.fromkeys((r["case"], r["direction"]) for r in rows):
        first = next(r for r in rows if (r["case"], r["direction"]) == (case, direction))
        fp32_out = next(
            (
                r["output_bytes"]
                for r in rows
                if (r["case"], r["direction"], r["dtype"]) == (case, direction, "float32")
            ),
            None,
        )
        line = [
            case,
            direction,
            f"{first['columns_bytes'] / MIB:.1f}",
            "" if fp32_out is None else f"{fp32_out / MIB:.1f}",
        ]
        for v in variants:
            r = by.get((case, direction, *v))
            line.append("" if r is None else f"{r['extra_peak_bytes'] / MIB:.1f}")
        body.append(line)
    return headers, body


def memory_markdown(memory: dict) -> str:
    """The note, the calibration and the table of `memory` ({"rows", "calibration": a dict of
    calibration() per measuring process}) in markdown."""
    headers, body = memory_table(memory["rows"])
    cals = memory.get("calibration") or []
    out = [MEMORY_NOTE]
    if cals:

        def span(key: str) -> str:
            lo, hi = min(c[key] for c in cals), max(c[key] for c in cals)
            return f"{lo:.1f}" if f"{lo:.1f}" == f"{hi:.1f}" else f"{lo:.1f} to {hi:.1f}"

        out[0] += (
            " Calibration in the measuring process: allocating, filling and freeing 100 MiB reads "
            f"{span('alloc_free_100mib')}; returning a 100 MiB tensor {span('return_100mib')}; holding two 8 MiB "
            f"blocks {span('two_8mib')} (expected 100, 0, 16; the last read 7.6 under glibc's default malloc "
            "settings, which reuse freed heap blocks)."
        )
    out += ["", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(line) + " |" for line in body]
    return "\n".join(out) + "\n"
