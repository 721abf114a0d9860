"""The machine's limits, measured the same way on every run: memory copy bandwidth, fp32 FMA
peak (MKL sgemm, which gets close to it) and the cost of faulting in fresh memory; and the size
of the last-level cache, as the kernel reports it."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils import benchmark


def _median(stmt: str, env: dict, min_time: float) -> float:
    t = benchmark.Timer(stmt, globals=env, num_threads=torch.get_num_threads())
    return t.blocked_autorange(min_run_time=min_time).median


def last_level_cache_bytes() -> int:
    """The largest data or unified cache of CPU 0 (sysfs), 0 where the kernel does not say."""
    sizes = [0]
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            if (index / "type").read_text().strip() == "Instruction":
                continue
            size = (index / "size").read_text().strip()
        except OSError:
            continue
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(size[-1:], 1)
        sizes.append(int(size.rstrip("KMG")) * scale)
    return max(sizes)


def machine_limits(quick: bool = False) -> dict[str, float]:
    before = torch.get_num_threads()
    min_time = 0.2 if quick else 0.5
    src = torch.ones(64 * 2**20)  # 256 MiB: far beyond the caches
    dst = torch.empty_like(src)
    a = torch.randn(2048, 2048)
    b = torch.randn(2048, 2048)
    out = {}
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            # A copy reads and writes every byte once.
            out[f"copy_gb_s_{t}t"] = (
                2 * src.numel() * 4 / _median("dst.copy_(src)", {"dst": dst, "src": src}, min_time) / 1e9
            )
            out[f"sgemm_gflop_s_{t}t"] = 2 * 2048**3 / _median("a @ b", {"a": a, "b": b}, min_time) / 1e9
        torch.set_num_threads(1)
        out["alloc_touch_50mb_ms"] = 1e3 * _median("torch.empty(1000 * 256 * 49).fill_(0)", {"torch": torch}, min_time)
    finally:
        torch.set_num_threads(before)
    out["llc_bytes"] = float(last_level_cache_bytes())
    return out
