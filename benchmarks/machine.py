"""The machine's limits, measured the same way on every run: memory copy bandwidth, fp32 FMA
peak (MKL sgemm, which gets close to it) and the cost of faulting in fresh memory."""

from __future__ import annotations

import torch
from torch.utils import benchmark


def _median(stmt: str, env: dict, min_time: float) -> float:
    t = benchmark.Timer(stmt, globals=env, num_threads=torch.get_num_threads())
    return t.blocked_autorange(min_run_time=min_time).median


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
    return out
