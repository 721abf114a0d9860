"""Differential fuzzing: random valid inputs per op, compared with torchvision's kernels and a
float64 reference.

    PYTHONPATH=. .venv/bin/python tests/fuzz.py                          # every op, 500 cases each
    PYTHONPATH=. .venv/bin/python tests/fuzz.py --cases 100000 --jobs 2  # the long mode
    PYTHONPATH=. .venv/bin/python tests/fuzz.py --ops roi_align --seed 0 --case 17   # one case

tests/test_fuzz.py runs a bounded number of cases per op in every configuration and ISA variant.

A case is a pure function of (op, seed, index): every choice comes from
Random(f"{op}/{seed}/{index}"), so a failure's one-line repro (printed with it) runs it again.
What a case draws, per op: shapes around the vector widths (channels 1-3, 7-9, 15-17, 31-33),
1x1 and 1xN maps, every dtype, NCHW or channels_last, dense, a strided view or an expanded
(overlapping, stride-0) tensor, 1 or 2 threads; for the RoI ops also K = 0, a few or thousands
of boxes (degenerate, inverted, huge, far outside), spatial scales from 1/64 to 4, sampling
ratios -1, 0, 1-3 and 8, pooled sizes 1-14. Box coordinates are multiples of 1/16 and scales
powers of two, so a box's scaled corners are exact in every dtype and a bin's edges cannot fall
on different sides of a pixel in float32 and float64.

What a case checks: the forward and the gradients within roi_cases.TOL[dtype] (relative to the
output's magnitude) of a reference on the same (rounded) values:
- depthwise convolutions, deform_conv2d, the batch norm: float64 (ATen's convolution,
  torchvision's kernel, the expression), and in float32 / float64 also the stock op in that dtype;
- the RoI ops: torchvision's kernel in the op's arithmetic type (float64 for float64 inputs,
  float32 otherwise, as ours accumulates), because their bin edges, adaptive grid sizes and the
  cutoff at the map's border are steps computed in that type: a float64 computation moves a step
  by a rounding error and with it a whole sample. Without torchvision's kernels (the fallback
  configuration): tests/reference.py, which emulates that arithmetic, on small cases;
- nms and batched_nms: torchvision's kept indices, exactly.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
import reference  # noqa: E402
from op_tester import num_threads as threads  # noqa: E402
from op_tester import torchvision_kernels_loaded  # noqa: E402
from roi_cases import TOL  # noqa: E402

import torchvision_cpu_ext  # noqa: E402

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
WIDE = (torch.float32, torch.float64)  # the dtypes torchvision's kernels compute as we do


class Mismatch(AssertionError):
    pass


class Draw:
    """The random choices of one case, and a note of each for the failure message."""

    def __init__(self, op: str, seed: int, index: int) -> None:
        self.rng = random.Random(f"{op}/{seed}/{index}")
        self.gen = torch.Generator().manual_seed(self.rng.getrandbits(62))
        self.notes: list[str] = []

    def note(self, **kv: Any) -> None:
        self.notes.extend(f"{k}={v}" for k, v in kv.items())

    def int(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def choice(self, seq: Any) -> Any:
        return self.rng.choice(list(seq))

    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    def channels(self) -> int:
        """Around the vector widths (8 and 16 float lanes), and small counts."""
        return self.choice((1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 32, 33))

    def side(self, most: int = 24) -> int:
        return self.choice((1, 1, 2, 3, 5, 8, 13, most))

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen, dtype=torch.float64)

    def rand(self, *shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=self.gen, dtype=torch.float64)

    def map(self, n: int, c: int, h: int, w: int, dtype: torch.dtype) -> torch.Tensor:
        """An [n, c, h, w] map in dtype, in a drawn layout and stride pattern (same values)."""
        layout = self.choice(("nchw", "channels_last"))
        pattern = self.choice(("dense", "dense", "strided", "expanded"))
        self.note(layout=layout, strides=pattern)
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        if pattern == "expanded":  # every image the same memory (stride 0)
            return self.randn(1, c, h, w).to(dtype).contiguous(memory_format=fmt).expand(n, c, h, w)
        x = self.randn(n, c, h, w).to(dtype)
        if pattern == "dense":
            return x.contiguous(memory_format=fmt)
        wide = torch.zeros(n, c, h, w + 3, dtype=dtype).contiguous(memory_format=fmt)
        wide[..., 2 : w + 2] = x
        return wide[..., 2 : w + 2]


def stock(fn: Callable[[], Any]) -> Any:
    """fn() on torchvision's own kernels."""
    with torchvision_cpu_ext.disabled():
        return fn()


def close(
    what: str,
    ours: torch.Tensor,
    want: torch.Tensor,
    dtype: torch.dtype,
    nan: bool = False,
    bound: torch.Tensor | None = None,
) -> None:
    """ours within TOL[dtype] of want, same shape, inf and NaN (where allowed) where want's. The
    absolute tolerance scales with want's magnitude, or with `bound`'s: the sum of the magnitudes
    of what was summed (a gradient gathered from thousands of bins can cancel to a small value,
    but its rounding error follows the sum of magnitudes)."""
    if ours.shape != want.shape:
        raise Mismatch(f"{what}: shape {tuple(ours.shape)}, expected {tuple(want.shape)}")
    a, b = ours.double(), want.double()
    special = ~torch.isfinite(b) | ~torch.isfinite(a)
    if bool(special.any()):  # inf where the reference has the same inf; NaN only where allowed
        sa, sb = a[special], b[special]
        same = (sa == sb) | (torch.isnan(sa) & torch.isnan(sb) & nan)
        if not bool(same.all()):
            raise Mismatch(f"{what}: {int((~same).sum())} inf/NaN elements differ from the reference's")
        a, b = a.masked_fill(special, 0.0), b.masked_fill(special, 0.0)
    if a.numel() == 0:
        return
    tol = TOL[dtype]
    scale = max(1.0, (b if bound is None else bound.double()).abs().max().item())
    err = (a - b).abs()
    bad = err > tol["atol"] * scale + tol["rtol"] * b.abs()
    if bool(bad.any()):
        i = int(bad.flatten().nonzero()[0])
        raise Mismatch(
            f"{what}: {int(bad.sum())} of {a.numel()} elements off, max error {err.max().item():.3g} "
            f"(scale {scale:.3g}); first at flat index {i}: {a.flatten()[i].item()!r} vs {b.flatten()[i].item()!r}"
        )


def f64(args: tuple) -> tuple:
    return tuple(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def opmath(args: tuple) -> tuple:
    """args in their arithmetic type: float64 stays, every other float type becomes float32."""
    return tuple(
        a.to(torch.promote_types(a.dtype, torch.float32))
        if isinstance(a, torch.Tensor) and a.is_floating_point()
        else a
        for a in args
    )


# ---- the RoI family ------------------------------------------------------------------------------


def draw_rois(d: Draw, n: int, h: int, w: int, scale: float, k: int, dtype: torch.dtype, huge: bool) -> torch.Tensor:
    """k boxes in image coordinates (the map / scale), multiples of 1/16: mostly inside or across
    the border, some degenerate (points, segments), inverted, far outside or (huge) enormous."""
    img_w, img_h = w / scale, h / scale
    rows = []
    for _ in range(k):
        kind = d.choice(("box",) * 6 + ("point", "segment", "inverted", "outside") + (("huge",) if huge else ()))
        x1, y1 = d.rng.uniform(-0.2, 1.1) * img_w, d.rng.uniform(-0.2, 1.1) * img_h
        x2, y2 = x1 + d.rng.uniform(0, 0.9) * img_w, y1 + d.rng.uniform(0, 0.9) * img_h
        if kind == "point":
            x2, y2 = x1, y1
        elif kind == "segment":
            x2 = x1
        elif kind == "inverted":
            x1, x2 = x2 + 1, x1
        elif kind == "outside":
            x1, x2 = x1 + 3 * img_w, x2 + 3 * img_w
        elif kind == "huge":
            x1, y1, x2, y2 = -1e4, -3e3, 2e4, 1e4
        rows.append([d.int(0, n - 1), *(round(v * 16) / 16 for v in (x1, y1, x2, y2))])
    return torch.tensor(rows, dtype=torch.float64).view(k, 5).to(dtype)


class RoIFuzz:
    """roi_align, roi_pool, ps_roi_align, ps_roi_pool: forward and the input gradient."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.op = getattr(torch.ops.torchvision, name)
        self.backward = getattr(torch.ops.torchvision, f"_{name}_backward")
        self.ps = name.startswith("ps_")
        self.align = name.endswith("align")

    def __call__(self, d: Draw) -> None:
        dtype = d.choice(DTYPES)
        ph, pw = d.int(1, 14), d.int(1, 14)
        if d.chance(0.5):
            ph, pw = d.int(1, 3), d.int(1, 3)
        c_out = d.int(1, 3) if self.ps else d.channels()
        c = c_out * ph * pw if self.ps else c_out
        n, h, w = d.int(1, 3), d.side(), d.side()
        if d.chance(0.3):
            h = 1  # a 1xN map
        scale = 2.0 ** d.int(-6, 2)
        sampling = d.choice((-1, 0, 1, 2, 3, 8)) if self.align else 0
        aligned = d.chance(0.5)
        many = d.chance(0.1) and c * ph * pw <= 64
        k = d.int(1000, 3000) if many else d.choice((0, 1, 2, 5, 9, 24))
        native = torchvision_kernels_loaded()
        if not native:
            k = min(k, 9)  # the Python reference is slow
        # Adaptive grids over enormous boxes would sample millions of points (here and stock).
        rois = draw_rois(d, n, h, w, scale, k, dtype, huge=sampling > 0 or not self.align)
        x = d.map(n, c, h, w, dtype)
        n_threads = d.choice((1, 2))
        d.note(dtype=dtype, shape=(n, c, h, w), K=k, pooled=(ph, pw), scale=scale, threads=n_threads)
        args = (x, rois, scale, ph, pw)
        if self.align:
            args += (sampling,) if self.ps else (sampling, aligned)
            d.note(sampling_ratio=sampling, **({} if self.ps else {"aligned": aligned}))
        with threads(n_threads):
            result = self.op(*args)
        out = result[0] if isinstance(result, tuple) else result
        if out.dtype != dtype:
            raise Mismatch(f"output dtype {out.dtype}, expected {dtype}")
        # ps_roi_align divides by an empty adaptive grid's zero count (NaN), as torchvision does.
        nan = self.ps and self.align
        want = None
        if native:
            try:
                want = stock(lambda: self.op(*opmath(args)))
            except (RuntimeError, ValueError) as e:  # a stock failure (an inverted box's negative grid)
                d.note(torchvision=f"fails ({type(e).__name__}), compared with reference.py")
        if want is not None:
            close("forward vs torchvision", out, want[0] if isinstance(want, tuple) else want, dtype, nan)
            self.check_backward(d, args, result, dtype, n_threads)
        elif k <= 64:
            want = self.reference(args)
            close("forward vs reference", out, want[0] if isinstance(want, tuple) else want, dtype, nan)

    def reference(self, args: tuple) -> torch.Tensor:
        x, rois, scale, ph, pw, *rest = args
        fn = getattr(reference, self.name)
        return fn(x.double(), rois.double() if self.align else rois, scale, ph, pw, *rest)

    def check_backward(self, d: Draw, args: tuple, result: Any, dtype: torch.dtype, n_threads: int) -> None:
        x, rois, scale, ph, pw, *rest = args
        n, c, h, w = x.shape
        out = result[0] if isinstance(result, tuple) else result
        grad = d.randn(*out.shape).to(dtype)
        if self.name == "roi_align":
            bwd = (rois, scale, ph, pw, n, c, h, w, *rest)
        elif self.name == "ps_roi_align":
            bwd = (rois, result[1], scale, ph, pw, rest[0], n, c, h, w)
        else:  # pools: our argmax (or channel mapping) for both: tied maxima may pick either
            bwd = (rois, result[1], scale, ph, pw, n, c, h, w)
        if self.name == "ps_roi_pool":
            # torchvision's backward is not its forward's gradient for bins on the last row or
            # column (NOTE [ ps_roi_pool backward ]): compare boxes inside those.
            r = rois.double() * scale
            inside = (torch.maximum(r[:, 1], r[:, 3]) < w - 2) & (torch.maximum(r[:, 2], r[:, 4]) < h - 2)
            grad, bwd = grad[inside], (rois[inside], bwd[1][inside], *bwd[2:])
        with threads(n_threads):
            ours = self.backward(grad, *bwd)
        want = stock(lambda: self.backward(*opmath((grad, *bwd))))
        bound = stock(lambda: self.backward(*opmath((grad.abs(), *bwd))))
        close("input gradient vs torchvision", ours, want, dtype, bound=bound.abs())


# ---- nms and batched_nms -------------------------------------------------------------------------


def fuzz_nms(d: Draw) -> None:
    """nms and batched_nms: torchvision's kept indices, exactly (reference.nms without its kernels)."""
    dtype = d.choice((torch.float32, torch.float64))
    k = d.choice((0, 1, 2, 3, 17, 64, 255, 256, 257, 1000)) if d.chance(0.9) else d.int(2000, 6000)
    native = torchvision_kernels_loaded()
    if not native:
        k = min(k, 257)  # the Python reference is slow
    crowded = d.chance(0.5)
    if crowded:
        centres = d.rand(max(k // 40, 1), 2) * 300
        ctr = centres[torch.randint(0, centres.shape[0], (k,), generator=d.gen)] + d.randn(k, 2) * 6
        wh = 40 + d.randn(k, 2) * 4
    else:
        ctr = d.rand(k, 2) * 1000
        wh = d.rand(k, 2) * 200 * d.choice((0.01, 0.3, 1.0))
    boxes = torch.cat([ctr - wh / 2, ctr + wh / 2], 1)
    if k >= 4 and d.chance(0.3):  # degenerate, inverted and huge boxes among them
        boxes[0, 2:] = boxes[0, :2]
        boxes[1] = boxes[1].flip(0)
        boxes[2] = boxes[2] * 1e6
    scores = d.rand(k)
    if d.chance(0.5):
        scores = (scores * d.choice((2, 8, 64))).round()  # ties
    boxes, scores = boxes.to(dtype), scores.to(dtype)
    thr = d.choice((0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0, d.rng.random()))
    n_threads = d.choice((1, 2))
    batched = d.chance(0.5)
    d.note(dtype=dtype, K=k, crowded=crowded, threshold=thr, batched=batched, threads=n_threads)
    if batched:
        from torchvision.ops import batched_nms

        idxs = torch.randint(0, d.choice((1, 3, 80)), (k,), generator=d.gen)
        with threads(n_threads):
            ours = batched_nms(boxes, scores, idxs, thr)
        if native:
            want = stock(lambda: batched_nms(boxes, scores, idxs, thr))
        else:  # torchvision's coordinate trick, on the reference
            offsets = idxs.to(boxes) * (boxes.max() + 1) if k else boxes.new_zeros(0)
            want = reference.nms(boxes + offsets[:, None], scores, thr) if k else torch.zeros(0, dtype=torch.long)
    else:
        with threads(n_threads):
            ours = torch.ops.torchvision.nms(boxes, scores, thr)
        want = (
            stock(lambda: torch.ops.torchvision.nms(boxes, scores, thr))
            if native
            else reference.nms(boxes, scores, thr)
        )
    if not torch.equal(ours, want.to(ours.dtype)):
        m = min(ours.numel(), want.numel())
        diff = (ours[:m] != want[:m]).nonzero()
        at = diff[0].item() if diff.numel() else m
        raise Mismatch(f"kept {ours.numel()} boxes, torchvision {want.numel()}; first difference at {at}")


# ---- depthwise convolution, frozen batch norm, deform_conv2d ---------------------------------------


def fuzz_depthwise(d: Draw) -> None:
    """depthwise_conv1d/2d: forward and all gradients against ATen's convolution (float64 and,
    in float32/float64, the same dtype)."""
    dtype = d.choice(DTYPES)
    is1d = d.chance(0.25)
    n, c, m = d.int(1, 3), d.channels(), d.choice((1, 1, 1, 2, 3))
    kh = 1 if is1d else d.choice((1, 2, 3, 3, 5, 7))
    kw = d.choice((1, 2, 3, 3, 5, 7))
    sh, sw = (1 if is1d else d.choice((1, 1, 2, 3))), d.choice((1, 1, 2, 3))
    dh, dw = (1 if is1d else d.choice((1, 1, 2))), d.choice((1, 1, 2))
    ph, pw = (0 if is1d else d.int(0, kh)), d.int(0, kw)
    h = 1 if is1d else d.choice((1, 2, 5, 7, 14, 28, 29, 40))
    w = d.choice((1, 2, 5, 7, 14, 28, 29, 40, 96))
    h, w = max(h, dh * (kh - 1) + 1 - 2 * ph), max(w, dw * (kw - 1) + 1 - 2 * pw)
    x = d.map(n, c, h, w, dtype)
    weight = (d.randn(c * m, 1, kh, kw) / 2).to(dtype)
    bias = d.randn(c * m).to(dtype) if d.chance(0.5) else None
    n_threads = d.choice((1, 2))
    d.note(
        dtype=dtype,
        conv1d=is1d,
        shape=(n, c, h, w),
        multiplier=m,
        kernel=(kh, kw),
        stride=(sh, sw),
        padding=(ph, pw),
        dilation=(dh, dw),
        bias=bias is not None,
        threads=n_threads,
    )
    if is1d:
        x, weight = x[:, :, 0], weight[:, :, 0]
        op, conv, geo = torch.ops.torchvision_cpu_ext.depthwise_conv1d, F.conv1d, ([sw], [pw], [dw])
    else:
        op, conv, geo = torch.ops.torchvision_cpu_ext.depthwise_conv2d, F.conv2d, ([sh, sw], [ph, pw], [dh, dw])
    leaves = [t.detach().requires_grad_() for t in (x, weight, bias) if t is not None]
    with threads(n_threads):
        out = op(leaves[0], leaves[1], leaves[2] if bias is not None else None, *geo)
        grad = d.randn(*out.shape).to(dtype)
        grads = torch.autograd.grad(out, leaves, grad)

    def reference(leaves: list[torch.Tensor], grad: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        leaves = [t.detach().double().requires_grad_() for t in leaves]
        out = conv(leaves[0], leaves[1], leaves[2] if bias is not None else None, *geo, groups=c)
        return out, torch.autograd.grad(out, leaves, grad.double())

    want, want_grads = reference(leaves, grad)
    # The weight and bias gradients sum N * OH * OW terms: in float32 (and float64) the rounding
    # error follows the sum of their magnitudes, the same gradients of the magnitudes. bfloat16
    # and float16 accumulate in float32 too: their own tolerance covers that.
    bounds = reference([t.abs() for t in leaves], grad.abs())[1] if dtype in WIDE else (None,) * 3
    if out.dtype != dtype:
        raise Mismatch(f"output dtype {out.dtype}, expected {dtype}")
    close("forward vs ATen in float64", out, want, dtype)
    for name, g, wg, bound in zip(("input", "weight", "bias"), grads, want_grads, bounds, strict=False):
        close(f"{name} gradient vs ATen in float64", g, wg, dtype, bound=bound)
    if dtype in WIDE:
        close("forward vs ATen", out, conv(x, weight, bias, *geo, groups=c), dtype)


def fuzz_frozen_batch_norm(d: Draw) -> None:
    """The fused FrozenBatchNorm2d against its expression in float64 and torchvision's module."""
    dtype = d.choice(DTYPES)
    n, c, h, w = d.int(1, 3), d.channels(), d.side(), d.side()
    x = d.map(n, c, h, w, dtype)
    stats = [d.randn(c), d.randn(c), d.randn(c), d.rand(c) * 3]
    stats[3][0] = 0.0  # eps alone
    eps = d.choice((1e-5, 1e-3))
    # The module's buffers are float32 (float64 with a float64 input); reduced ones take
    # torchvision's expression in Python, not the kernel.
    buffers = [s.to(torch.float64 if dtype == torch.float64 else torch.float32) for s in stats]
    n_threads = d.choice((1, 2))
    d.note(dtype=dtype, shape=(n, c, h, w), eps=eps, threads=n_threads)
    with threads(n_threads):
        out = torch.ops.torchvision_cpu_ext.frozen_batch_norm(x, *buffers, eps)
    wt, b, rm, rv = (s.double() for s in buffers)
    scale = wt / (rv + eps).sqrt()
    want = x.double() * scale.view(1, -1, 1, 1) + (b - rm * scale).view(1, -1, 1, 1)
    close("forward vs float64", out, want, out.dtype)


def fuzz_deform_conv2d(d: Draw) -> None:
    """deform_conv2d: forward and every gradient against torchvision's kernel in float64 (the
    whole-tensor float64 reference where torchvision's kernels do not load)."""
    dtype = d.choice(DTYPES)
    groups, og = d.choice((1, 1, 2)), d.choice((1, 1, 2))
    n = d.int(1, 2)
    c = groups * og * d.choice((1, 2, 3, 8))
    c_out = groups * d.choice((1, 2, 5))
    kh, kw = d.choice((1, 2, 3)), d.choice((1, 3))
    sh, sw, ph, pw, dh, dw = d.int(1, 2), d.int(1, 2), d.int(0, 2), d.int(0, 2), d.int(1, 2), d.int(1, 2)
    h, w = max(d.side(12), dh * (kh - 1) + 1), max(d.side(12), dw * (kw - 1) + 1)
    oh, ow = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    x = d.map(n, c, h, w, dtype)
    weight = (d.randn(c_out, c // groups, kh, kw) / 3).to(dtype)
    reach = d.choice((0.5, 2.0, 20.0))  # 20: most samples outside the map
    offset = (d.randn(n, 2 * og * kh * kw, oh, ow) * reach).to(dtype)
    use_mask = d.chance(0.5)
    mask = d.rand(n, og * kh * kw, oh, ow).to(dtype) if use_mask else torch.zeros(n, 1, dtype=dtype)
    bias = d.randn(c_out).to(dtype)
    n_threads = d.choice((1, 2))
    args = (x, weight, offset, mask, bias, sh, sw, ph, pw, dh, dw, groups, og, use_mask)
    d.note(
        dtype=dtype,
        shape=(n, c, h, w),
        out_channels=c_out,
        kernel=(kh, kw),
        groups=groups,
        offset_groups=og,
        stride=(sh, sw),
        padding=(ph, pw),
        dilation=(dh, dw),
        mask=use_mask,
        offset_reach=reach,
        threads=n_threads,
    )
    with threads(n_threads):
        out = torch.ops.torchvision.deform_conv2d(*args)
        grad = d.randn(*out.shape).to(dtype)
        grads = torch.ops.torchvision._deform_conv2d_backward(grad, *args)
    if torchvision_kernels_loaded():
        close(
            "forward vs torchvision in float64",
            out,
            stock(lambda: torch.ops.torchvision.deform_conv2d(*f64(args))),
            dtype,
        )
        if dtype in WIDE:
            close("forward vs torchvision", out, stock(lambda: torch.ops.torchvision.deform_conv2d(*args)), dtype)
    # The gradients against the float64 reference's autograd: torchvision's offset gradient is
    # not its forward's for a sample exactly on y == -1 or x == -1 (NOTE [ deform_conv2d
    # gradients ]), which reduced-precision offsets hit.
    leaves = [t.detach().double().requires_grad_() for t in (x, offset, weight, bias, mask)]
    lx, loff, lw, lb, lm = leaves
    want = reference.deform_conv2d(lx, loff, lw, lb, (sh, sw), (ph, pw), (dh, dw), lm if use_mask else None)
    close("forward vs float64 reference", out, want, dtype)
    want_grads = torch.autograd.grad(want, leaves, grad.double(), allow_unused=True)
    # The backward op's (input, weight, offset, mask, bias), and where each is among the leaves.
    for name, g, leaf in zip(("input", "weight", "offset", "mask", "bias"), grads, (0, 2, 1, 4, 3), strict=True):
        if name != "mask" or use_mask:
            close(f"{name} gradient vs float64 reference", g, want_grads[leaf], dtype)


# ---- the table -----------------------------------------------------------------------------------

# One fuzzer per op-table row with a kernel that this issue covers (the quantized ops and
# box_iou_rotated have their own exhaustive tests).
FUZZERS: dict[str, Callable[[Draw], None]] = {
    "roi_align": RoIFuzz("roi_align"),
    "roi_pool": RoIFuzz("roi_pool"),
    "ps_roi_align": RoIFuzz("ps_roi_align"),
    "ps_roi_pool": RoIFuzz("ps_roi_pool"),
    "nms": fuzz_nms,
    "frozen_batch_norm": fuzz_frozen_batch_norm,
    "deform_conv2d": fuzz_deform_conv2d,
    "depthwise_conv": fuzz_depthwise,
}


def repro(op: str, seed: int, index: int) -> str:
    return f"PYTHONPATH=. python tests/fuzz.py --ops {op} --seed {seed} --case {index}"


def run_case(op: str, seed: int, index: int) -> str | None:
    """None, or the failure: what differed, the case's choices and its repro line."""
    d = Draw(op, seed, index)
    try:
        FUZZERS[op](d)
    except Exception as e:  # a mismatch, or an error on a valid input
        kind = "mismatch" if isinstance(e, Mismatch) else f"error {type(e).__name__}"
        first = str(e).splitlines()[0] if str(e) else ""
        return f"{op} case {index}: {kind}: {first}\n  {' '.join(d.notes)}\n  repro: {repro(op, seed, index)}"
    return None


def run_range(op: str, seed: int, start: int, stop: int) -> list[str]:
    return [f for f in (run_case(op, seed, i) for i in range(start, stop)) if f]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", nargs="*", default=list(FUZZERS), choices=list(FUZZERS))
    p.add_argument("--cases", type=int, default=500, help="cases per op")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--case", type=int, default=None, help="run this one case only")
    p.add_argument("--jobs", type=int, default=1, help="worker processes")
    a = p.parse_args(argv)
    mode = "torchvision's kernels" if torchvision_kernels_loaded() else "the fallback (reference.py)"
    print(f"fuzz: seed {a.seed}, reference {mode}, ATen CPU capability {torch.backends.cpu.get_cpu_capability()}")
    failures = 0
    for op in a.ops:
        if a.case is not None:
            f = run_case(op, a.seed, a.case)
            print(f or f"{op} case {a.case}: ok")
            failures += f is not None
            continue
        t = time.time()
        chunk = max(1, min(500, a.cases // max(1, 4 * a.jobs)))
        spans = [(op, a.seed, s, min(s + chunk, a.cases)) for s in range(0, a.cases, chunk)]
        found: list[str] = []
        if a.jobs > 1:
            with ProcessPoolExecutor(a.jobs) as ex:
                for r in ex.map(run_range, *zip(*spans, strict=True)):
                    found += r
        else:
            for s in spans:
                found += run_range(*s)
        for f in found[:20]:
            print(f)
        failures += len(found)
        print(f"{op}: {a.cases} cases, {len(found)} mismatches, {time.time() - t:.1f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
