"""Bit-for-bit check of our kernels' outputs on the benchmark's cases, before and after a change.

    python benchmarks/bitcheck.py --save FILE       # e.g. at the base commit, outside the repo
    python benchmarks/bitcheck.py --compare FILE    # after the change: exit 1 on any difference

Runs every case of benchmarks/bench_ops.py through our kernels (CASES: forward and backward,
NCHW and channels_last, float32 and bfloat16, as bench_case calls them; NMS_CASES and the
batched_nms case; FBN_SHAPES through FrozenBatchNorm2d in inference mode) with the benchmark's
fixed seeds, at each of --threads, and records a sha256 of every output's bytes together with
its shape, dtype and strides. A refactor that must not change behaviour must leave every hash
as it was. The hashes depend on the ISA variant that runs, so compare a file only with a run of
the same variant (the file records it; --compare refuses a mismatch).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torchvision

import torchvision_cpu_ext

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ops import CASES, FBN_SHAPES, NMS_CASES, case_inputs, nms_boxes  # noqa: E402

LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
DTYPES = (torch.float32, torch.bfloat16)


def digest(t: torch.Tensor) -> dict:
    """A tensor's identity for this check: shape, dtype, strides and a hash of its values in
    memory order (so a changed output layout is a difference too)."""
    t = t.detach()
    order = sorted(range(t.dim()), key=lambda d: -t.stride(d))  # outermost dimension first
    flat = t.permute(order).contiguous().view(-1)
    raw = flat.view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
    return {
        "shape": tuple(t.shape),
        "dtype": str(t.dtype),
        "stride": tuple(t.stride()),
        "sha256": hashlib.sha256(raw.numpy().tobytes()).hexdigest(),
    }


def roi_outputs(case) -> Iterator[tuple[str, torch.Tensor]]:
    """The outputs of one RoI case, as bench_case runs them on our kernels."""
    x32, rois, grad32 = case_inputs(case)
    p = case.pooled
    n, c, h, w = case.shape
    ops = torch.ops.torchvision
    for layout, fmt in LAYOUTS.items():
        for dtype in DTYPES:
            key = f"{case.name} | {layout} | {str(dtype).replace('torch.', '')}"
            x = x32.to(dtype).contiguous(memory_format=fmt)
            g = grad32.to(dtype).contiguous(memory_format=fmt)
            mixed = case.op == "roi_align" and dtype != torch.float32
            r = rois if dtype == torch.float32 or mixed else rois.to(dtype)
            s, sr = case.scale, case.sampling_ratio
            if case.op == "roi_align":
                fwd = torch.ops.torchvision_cpu_ext._roi_align_mixed if mixed else ops.roi_align
                yield f"{key} | forward", fwd(x, r, s, p, p, sr, True)
                yield f"{key} | backward", ops._roi_align_backward(g, r, s, p, p, n, c, h, w, sr, True)
            elif case.op == "roi_pool":
                out, argmax = ops.roi_pool(x, r, s, p, p)
                yield f"{key} | forward", out
                yield f"{key} | forward argmax", argmax
                yield f"{key} | backward", ops._roi_pool_backward(g, r, argmax, s, p, p, n, c, h, w)
            elif case.op == "ps_roi_align":
                out, mapping = ops.ps_roi_align(x, r, s, p, p, sr)
                yield f"{key} | forward", out
                yield f"{key} | forward channel_mapping", mapping
                yield f"{key} | backward", ops._ps_roi_align_backward(g, r, mapping, s, p, p, sr, n, c, h, w)
            elif case.op == "ps_roi_pool":
                out, mapping = ops.ps_roi_pool(x, r, s, p, p)
                yield f"{key} | forward", out
                yield f"{key} | forward channel_mapping", mapping
                yield f"{key} | backward", ops._ps_roi_pool_backward(g, r, mapping, s, p, p, n, c, h, w)
            else:
                raise ValueError(f"bitcheck does not know the op {case.op!r}")


def nms_outputs() -> Iterator[tuple[str, torch.Tensor]]:
    for n, crowded, thr in NMS_CASES:
        boxes, scores = nms_boxes(n, crowded)
        yield f"nms {n} {'crowded' if crowded else 'random'} @{thr}", torch.ops.torchvision.nms(boxes, scores, thr)
    boxes, scores = nms_boxes(5000, True)
    idxs = torch.randint(0, 80, (5000,), generator=torch.Generator().manual_seed(1))
    yield "batched_nms 5000 crowded, 80 classes @0.5", torchvision.ops.batched_nms(boxes, scores, idxs, 0.5)


def fbn_outputs() -> Iterator[tuple[str, torch.Tensor]]:
    from torchvision.ops import FrozenBatchNorm2d

    for shape in FBN_SHAPES:
        torch.manual_seed(0)
        m = FrozenBatchNorm2d(shape[1])
        for b in m.buffers():
            b.copy_(torch.rand(shape[1]) + 0.5)
        x32 = torch.randn(shape)
        for layout, fmt in LAYOUTS.items():
            for dtype in DTYPES:
                x = x32.to(dtype).contiguous(memory_format=fmt)
                with torch.inference_mode():
                    out = m(x)
                yield f"frozen_batch_norm {list(shape)} | {layout} | {str(dtype).replace('torch.', '')}", out


def run(threads: list[int]) -> dict[str, dict]:
    if not torchvision_cpu_ext.is_enabled():
        raise SystemExit("torchvision_cpu_ext is not enabled: nothing of ours would be checked")
    results = {}
    for t in threads:
        torch.set_num_threads(t)
        t0 = time.time()
        for case in CASES:
            for key, out in roi_outputs(case):
                results[f"{t}T | {key}"] = digest(out)
        for key, out in (*nms_outputs(), *fbn_outputs()):
            results[f"{t}T | {key}"] = digest(out)
        print(f"{t} thread(s): {time.time() - t0:.1f} s", flush=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--save", type=Path, help="write the hashes to this file")
    what.add_argument("--compare", type=Path, help="recompute and compare with this file; exit 1 on a difference")
    ap.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    a = ap.parse_args()
    variant = torchvision_cpu_ext.loaded_library().isa
    if a.compare:
        saved = torch.load(a.compare, weights_only=True)
        if saved["variant"] != variant:
            raise SystemExit(f"{a.compare} holds ISA variant {saved['variant']}, this run is {variant}")
        threads = [t for t in a.threads if any(k.startswith(f"{t}T |") for k in saved["results"])]
        now = run(threads)
        wanted = {k: v for k, v in saved["results"].items() if int(k.split("T |")[0]) in threads}
        missing = sorted(wanted.keys() - now.keys())
        extra = sorted(now.keys() - wanted.keys())
        differ = sorted(k for k in wanted.keys() & now.keys() if wanted[k] != now[k])
        for k in missing:
            print(f"MISSING  {k}")
        for k in extra:
            print(f"NEW      {k}")
        for k in differ:
            print(f"DIFFERS  {k}: {wanted[k]} -> {now[k]}")
        print(f"{len(now)} outputs ({variant}, threads {threads}): {len(differ)} differ, {len(missing)} missing")
        sys.exit(1 if differ or missing else 0)
    results = run(a.threads)
    torch.save({"variant": variant, "torch": str(torch.__version__), "results": results}, a.save)
    print(f"wrote {len(results)} output hashes ({variant}) to {a.save}")


if __name__ == "__main__":
    main()
