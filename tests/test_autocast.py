"""Every entry point the package adds or replaces, under autocast with mixed input dtypes.

A matrix of entry point x {plain, bfloat16 autocast, float16 autocast} x {all one dtype, boxes
float32 with reduced features or scores, the reverse, float64 boxes}. `stock_outcome` states
torchvision's rules (its CPU autocast rules exist for nms and roi_align only, and cast every
floating tensor but float64 to float32; its kernels want one dtype and have no bfloat16, nms
no float16 either); in the native configuration a test checks that statement against
torchvision's own kernels case by case. Ours must give the same result dtype and values, or
an error where stock raises one, except for the deviations the README lists (`DEVIATIONS`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torchvision

import torchvision_cpu_ext

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
REDUCED = (BF16, F16)


def _boxes(n: int, seed: int, hi: float = 60.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    b = torch.rand(n, 4, generator=g) * hi
    b[:, 2:] += b[:, :2] + 1
    return b


def _rois(n: int, seed: int) -> torch.Tensor:
    return torch.cat(
        [torch.randint(0, 2, (n, 1), generator=torch.Generator().manual_seed(seed)).float(), _boxes(n, seed)], 1
    )


_X = torch.randn(2, 8, 24, 24, generator=torch.Generator().manual_seed(0))
_ROIS = _rois(12, 1)
# batched_nms: above 4000 coordinates torchvision's per-class loop runs (the path we replace),
# below it the coordinate trick (one nms call). Scores quantized so reduced dtypes tie often.
_BIG = (_boxes(1500, 2, hi=200.0), torch.rand(1500, generator=torch.Generator().manual_seed(3)), 7)
_SMALL = (_boxes(300, 4), torch.rand(300, generator=torch.Generator().manual_seed(5)), 5)


_g = torch.Generator().manual_seed(10)
_OFFSET = torch.randn(2, 18, 22, 22, generator=_g) * 2
_WEIGHT = torch.randn(4, 8, 3, 3, generator=_g) / 8
_MASK = torch.rand(2, 9, 22, 22, generator=_g)


def _idxs(n: int, classes: int) -> torch.Tensor:
    return torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(6))


def _frozen_bn(buffers: torch.dtype) -> torchvision.ops.FrozenBatchNorm2d:
    m = torchvision.ops.FrozenBatchNorm2d(8)
    g = torch.Generator().manual_seed(7)
    for name, lo in (("weight", 0.5), ("bias", -1.0), ("running_mean", -1.0), ("running_var", 0.5)):
        getattr(m, name).copy_(torch.rand(8, generator=g) + lo)
    return m.to(buffers)


@dataclass(frozen=True)
class EntryPoint:
    name: str
    run: Callable[[torch.dtype, torch.dtype], torch.Tensor]  # (feature/score dtype, box dtype)
    autocast_rule: bool  # torchvision has a CPU autocast rule for the op it calls
    has_f16: bool  # torchvision's CPU kernel implements float16


def _multiscale(f, b):
    pooler = torchvision.ops.MultiScaleRoIAlign(["p2", "p3"], 3, 2)
    feats = {"p2": _X.to(f), "p3": _X[:, :, ::2, ::2].to(f)}
    boxes = [_boxes(6, 8, 40.0).to(b), _boxes(5, 9, 40.0).to(b)]
    return pooler(feats, boxes, [(48, 48), (48, 48)])


ENTRY_POINTS = [
    EntryPoint("roi_align", lambda f, b: torchvision.ops.roi_align(_X.to(f), _ROIS.to(b), 3, 0.5, 2, True), True, True),
    EntryPoint("roi_pool", lambda f, b: torchvision.ops.roi_pool(_X.to(f), _ROIS.to(b), 3, 0.5), False, True),
    EntryPoint(
        "ps_roi_align", lambda f, b: torchvision.ops.ps_roi_align(_X.to(f), _ROIS.to(b), 2, 0.5, 2), False, True
    ),
    EntryPoint("ps_roi_pool", lambda f, b: torchvision.ops.ps_roi_pool(_X.to(f), _ROIS.to(b), 2, 0.5), False, True),
    EntryPoint("multiscale_roi_align", _multiscale, True, True),
    EntryPoint("nms", lambda f, b: torchvision.ops.nms(_SMALL[0].to(b), _SMALL[1].to(f), 0.5), True, False),
    EntryPoint(
        "batched_nms_loop",
        lambda f, b: torchvision.ops.batched_nms(_BIG[0].to(b), _BIG[1].to(f), _idxs(1500, _BIG[2]), 0.5),
        True,
        False,
    ),
    EntryPoint(
        "batched_nms_offsets",
        lambda f, b: torchvision.ops.batched_nms(_SMALL[0].to(b), _SMALL[1].to(f), _idxs(300, _SMALL[2]), 0.5),
        True,
        False,
    ),
    # FrozenBatchNorm2d: the "box" dtype is its buffers'.
    EntryPoint("frozen_batch_norm", lambda f, b: _frozen_bn(b)(_X.to(f)), False, True),
    # deform_conv2d: the feature dtype is the input's and weight's, the "box" dtype the offset's
    # and mask's (sampling positions, like boxes).
    EntryPoint(
        "deform_conv2d",
        lambda f, b: torchvision.ops.deform_conv2d(_X.to(f), _OFFSET.to(b), _WEIGHT.to(f), mask=_MASK.to(b)),
        False,
        True,
    ),
]
BY_NAME = {e.name: e for e in ENTRY_POINTS}

CONTEXTS = {"plain": None, "autocast_bf16": BF16, "autocast_f16": F16}


def _cases(reduced: torch.dtype) -> list[tuple[torch.dtype, torch.dtype]]:
    """(feature or score dtype, box dtype): one dtype, boxes float32 with a reduced map, the
    reverse, float64 boxes (which torchvision's autocast rules leave as they are)."""
    return [(F32, F32), (reduced, reduced), (reduced, F32), (F32, reduced), (reduced, F64), (F64, F64)]


MATRIX = [
    (e, ctx, f, b)
    for e in ENTRY_POINTS
    for ctx in CONTEXTS
    for reduced in ((BF16, F16) if ctx == "plain" else (CONTEXTS[ctx],))
    for f, b in _cases(reduced)
]
MATRIX = list(dict.fromkeys(MATRIX))  # (F32, F32) and (F64, F64) appear once per context


def _ids(case) -> str:
    e, ctx, f, b = case
    return f"{e.name}-{ctx}-{str(f)[6:]}-{str(b)[6:]}"


def _cast(t: torch.dtype) -> torch.dtype:
    """at::autocast::cached_cast(float32): every floating dtype but float64 becomes float32."""
    return t if t == F64 else F32


def stock_outcome(e: EntryPoint, ctx: str, f: torch.dtype, b: torch.dtype) -> torch.dtype | None:
    """The dtype torchvision returns for this case, or None where it raises."""
    amp = CONTEXTS[ctx]
    if e.name == "frozen_batch_norm":  # x * scale + bias: type promotion, no autocast rule
        return torch.promote_types(f, b)
    kf, kb = (_cast(f), _cast(b)) if amp is not None and e.autocast_rule else (f, b)
    if kf != kb or kf == BF16 or (kf == F16 and not e.has_f16):
        return None
    return torch.int64 if "nms" in e.name else f


def deviation(e: EntryPoint, ctx: str, f: torch.dtype, b: torch.dtype) -> str | None:
    """Where ours differs from stock on purpose (README: "Where we differ"), and how."""
    amp = CONTEXTS[ctx]
    if e.name == "frozen_batch_norm" and amp is not None and f in REDUCED and b == F32:
        return "keeps_reduced"  # the output keeps the input's dtype (torchvision: float32)
    if e.name == "deform_conv2d" and amp is not None and F64 not in (f, b):
        # torchvision has no CPU rule; ours: input and weight in the autocast dtype, offsets
        # float32 (NOTE [ deform_conv2d under autocast ])
        return "autocast_dtype"
    kf, kb = (_cast(f), _cast(b)) if amp is not None and e.autocast_rule else (f, b)
    if kf == kb and (kf == BF16 or (kf == F16 and not e.has_f16)):
        return "runs_dtype"  # a dtype torchvision's CPU kernel does not implement: ours runs it
    return None


def our_outcome(e: EntryPoint, ctx: str, f: torch.dtype, b: torch.dtype) -> torch.dtype | None:
    dev = deviation(e, ctx, f, b)
    if dev == "keeps_reduced":
        return f
    if dev == "runs_dtype":
        return torch.int64 if "nms" in e.name else f
    if dev == "autocast_dtype":
        return CONTEXTS[ctx]
    return stock_outcome(e, ctx, f, b)


def _call(fn: Callable[[], torch.Tensor], amp: torch.dtype | None):
    ctx = torch.autocast("cpu", dtype=amp) if amp is not None else contextlib.nullcontext()
    try:
        with torch.inference_mode(), ctx:
            return fn()
    except RuntimeError as err:
        return err


def _tol(dtype: torch.dtype) -> dict:
    # float16: torchvision's kernels accumulate in float16, ours in float32.
    return {BF16: dict(rtol=2e-2, atol=2e-2), F16: dict(rtol=2e-2, atol=4e-2)}.get(dtype, dict(rtol=1e-5, atol=1e-5))


@pytest.mark.parametrize("case", MATRIX, ids=_ids)
def test_ours_as_stock(case):
    """Our dtype, or our error, is stock's (with the listed deviations); values are checked
    against torchvision's kernels below, and against references in each op's tests."""
    e, ctx, f, b = case
    out = _call(lambda: e.run(f, b), CONTEXTS[ctx])
    want = our_outcome(e, ctx, f, b)
    if want is None:
        assert isinstance(out, RuntimeError), f"stock raises here; ours returned {getattr(out, 'dtype', out)}"
    else:
        assert not isinstance(out, RuntimeError), f"stock returns {want} here; ours raised: {out}"
        assert out.dtype == want


@pytest.mark.needs_native
@pytest.mark.parametrize("case", MATRIX, ids=_ids)
def test_stock_outcome_is_torchvisions(case):
    """stock_outcome states what torchvision's own kernels do, and ours match their values."""
    e, ctx, f, b = case
    amp = CONTEXTS[ctx]
    with torchvision_cpu_ext.disabled():
        stock = _call(lambda: e.run(f, b), amp)
    want = stock_outcome(e, ctx, f, b)
    if want is None:
        assert isinstance(stock, RuntimeError)
        return
    assert not isinstance(stock, RuntimeError), stock
    assert stock.dtype == want
    ours = _call(lambda: e.run(f, b), amp)
    if stock.dtype == torch.int64:
        assert torch.equal(ours, stock)  # nms: exactly torchvision's indices, in its order
    elif deviation(e, ctx, f, b) is None:
        torch.testing.assert_close(ours, stock, **_tol(f))


# The compiled column: the cases where autocast changes what runs, and their reverse.
COMPILED = [
    case
    for case in MATRIX
    if case[1] in ("plain", "autocast_bf16") and case[2] != case[3] and F64 not in case[2:] and F16 not in case[2:]
]


@pytest.mark.parametrize("case", COMPILED, ids=_ids)
def test_torch_compile_as_eager(case):
    """Under torch.compile (AOTAutograd traces through the autocast rules and our fake
    kernels), the same dtype, values, or error as eager."""
    e, ctx, f, b = case
    amp = CONTEXTS[ctx]
    torch._dynamo.reset()
    compiled = torch.compile(lambda: e.run(f, b), backend="aot_eager")
    eager = _call(lambda: e.run(f, b), amp)
    out = _call(compiled, amp)
    if isinstance(eager, RuntimeError):
        assert isinstance(out, RuntimeError), f"eager raises here; compiled returned {out.dtype}"
        return
    assert not isinstance(out, RuntimeError), out
    assert out.dtype == eager.dtype
    if out.dtype == torch.int64:
        assert torch.equal(out, eager)
    else:
        torch.testing.assert_close(out, eager, **_tol(f))


def test_issue_snippet_detectron2_rpn():
    """detectron2's RPN under bfloat16 autocast: float32 boxes, bfloat16 scores, many classes,
    through the per-class path; stock's indices exactly."""
    g = torch.Generator().manual_seed(11)
    boxes = torch.rand(5000, 4, generator=g) * 100
    boxes[:, 2:] += boxes[:, :2]
    scores = torch.rand(5000, generator=g).bfloat16()
    idx = torch.randint(0, 5, (5000,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kept = torchvision.ops.batched_nms(boxes, scores, idx, 0.7)
    # torchvision's loop: per class, nms on float32 copies; kept indices sorted by score.
    keep = torch.zeros(5000, dtype=torch.bool)
    for c in idx.unique():
        where = torch.where(idx == c)[0]
        keep[where[torch.ops.torchvision.nms(boxes[where], scores[where].float(), 0.7)]] = True
    k = torch.where(keep)[0]
    assert torch.equal(kept, k[scores[k].sort(descending=True)[1]])
