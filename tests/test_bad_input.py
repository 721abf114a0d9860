"""Bad input, tabulated (issue 20, part 4): every op the package owns x every class of bad input.

README.md's table "Bad input: what the package guarantees" is this file: ROWS are its rows, and
each case below is one entry of a cell, `test_bad_input[<row>-<op>-<n>]` (`pytest -k <row>` runs
a row). An entry expects one of (op_tester.py runs them: `check_bad_input`)

  Raises(match)       an error (RuntimeError, ValueError, NotImplementedError) whose message
                      matches, naming the op and the argument
  Stock(check)        stock's result: equal to torchvision's own kernels where they load (the
                      native configuration, `torchvision_cpu_ext.disabled()`; for the depthwise
                      ops, F.conv1d/2d with groups=C), and `check(result)` in both configurations
  Differs(check, why) a documented difference: ours meets `check`; torchvision crashes, hangs or
                      returns garbage (`why`), so it is not run

Never a crash or a hang: the case would kill or stall the test run. Nothing here allocates more
than a few KiB: the int32 rows use parameters whose products overflow (sampling grids, pooled
sizes, padding x dilation), empty tensors with huge other dimensions, and meta tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from op_tester import Differs, Raises, Stock, check_bad_input, torchvision_kernels_loaded
from reference import nms as ref_nms
from roi_cases import make_input, make_rois

from torchvision_cpu_ext import depthwise_conv1d, depthwise_conv2d

ROWS = {
    "rank": "wrong rank",
    "box_width": "wrong box width (4 vs 5 columns)",
    "mixed_dtype": "mixed dtypes outside autocast",
    "int_bool": "integer or bool tensors",
    "pooled_size": "negative or zero pooled sizes (convolutions: stride, padding, dilation, kernel)",
    "channels": "channels not divisible (ps ops: by pooled_height * pooled_width; convolutions: groups)",
    "batch_index": "batch index out of range or non-integral (batched_nms: class ids; convolutions: batch sizes)",
    "nan_inf": "NaN / inf in every tensor and float argument",
    "int32_overflow": "sizes whose products overflow int32",
    "zero_size": "zero-size dimensions",
    "meta": "meta tensors, and meta mixed with CPU",
    "other_device": "non-CPU devices",
}

nan, inf = float("nan"), float("inf")
TV = torch.ops.torchvision
CASES: list[tuple[str, str, Callable[[], Any], Any]] = []


def case(row: str, op: str, call: Callable[[], Any], expect: Any) -> None:
    assert row in ROWS, row
    CASES.append((row, op, call, expect))


# ---- checks of a result (both configurations) ---------------------------------------------------


def first(result: Any) -> torch.Tensor:
    return result[0] if isinstance(result, (tuple, list)) else result


def shape(*expected: int, device: str = "cpu") -> Callable[[Any], bool]:
    return lambda r: tuple(first(r).shape) == expected and first(r).device.type == device


def has_nan(r: Any) -> bool:
    return bool(first(r).isnan().any())


def zero_rows(rows: list[int]) -> Callable[[Any], bool]:
    """The ROIs `rows` give zeros, the others finite values."""

    def check(r: Any) -> bool:
        out = first(r)
        mask = torch.zeros(out.shape[0], dtype=torch.bool)
        mask[rows] = True
        return bool((out[mask] == 0).all() and out[~mask].isfinite().all())

    return check


def same_as(call: Callable[[], Any]) -> Callable[[Any], bool]:
    """The result equals another call's (NaN where it has NaN)."""
    return lambda r: all(
        torch.equal(a.nan_to_num(1.5), b.nan_to_num(1.5))
        for a, b in zip(r if isinstance(r, tuple) else (r,), _tuple(call()), strict=True)
    )


def _tuple(r: Any) -> tuple:
    return tuple(r) if isinstance(r, (tuple, list)) else (r,)


# ---- the RoI ops ---------------------------------------------------------------------------------

SCALE = 0.5
ROI_OPS = ("roi_align", "roi_pool", "ps_roi_align", "ps_roi_pool")


def roi_call(op: str) -> Callable[..., Any]:
    def call(x, rois, scale=SCALE, ph=2, pw=2, sr=2):
        if op == "roi_align":
            return TV.roi_align(x, rois, scale, ph, pw, sr, True)
        if op == "ps_roi_align":
            return TV.ps_roi_align(x, rois, scale, ph, pw, sr)
        return getattr(TV, op)(x, rois, scale, ph, pw)

    return call


def with_value(t: torch.Tensor, index: tuple, value: float) -> torch.Tensor:
    t = t.clone()
    t[index] = value
    return t


for op in ROI_OPS:
    f = roi_call(op)
    ps = op.startswith("ps_")
    align = op.endswith("align")
    C = 8 if ps else 5
    C_out = C // 4 if ps else C
    x = make_input(torch.float32, "nchw", True, channels=C)
    r = make_rois()  # 22 boxes of 2 images
    K = r.shape[0]

    def bi(v, r=r):  # roi 3's batch index
        return with_value(r, (3, 0), v)

    case("rank", op, lambda f=f, x=x, r=r: f(x[0], r), Raises(rf"{op}: input must be a 4-D tensor"))
    case("rank", op, lambda f=f, x=x, r=r: f(x[None], r), Raises(rf"{op}: input must be a 4-D tensor"))
    case("rank", op, lambda f=f, x=x, r=r: f(x, r[0]), Raises(rf"{op}: rois must have shape \[K, 5\]"))
    case("rank", op, lambda f=f, x=x, r=r: f(x, r[None]), Raises(rf"{op}: rois must have shape \[K, 5\]"))
    case("box_width", op, lambda f=f, x=x, r=r: f(x, r[:, 1:]), Raises(r"rois must have shape \[K, 5\].*got \[22, 4\]"))
    case("box_width", op, lambda f=f, x=x, r=r: f(x, torch.cat([r, r[:, :1]], 1)), Raises(r"got \[22, 6\]"))
    dtype_msg = f"{op}: rois must have the dtype of input"
    case("mixed_dtype", op, lambda f=f, x=x, r=r: f(x, r.double()), Raises(dtype_msg))
    case("mixed_dtype", op, lambda f=f, x=x, r=r: f(x.bfloat16(), r), Raises(dtype_msg))
    case("mixed_dtype", op, lambda f=f, x=x, r=r: f(x.half(), r.bfloat16()), Raises(dtype_msg))
    float_msg = f"{op}: input must be float32, float64, bfloat16 or float16, got "
    case("int_bool", op, lambda f=f, x=x, r=r: f(x.int(), r.int()), Raises(float_msg + "Int"))
    case("int_bool", op, lambda f=f, x=x, r=r: f(x.bool(), r.bool()), Raises(float_msg + "Bool"))
    case("int_bool", op, lambda f=f, x=x, r=r: f(x.long(), r), Raises(float_msg + "Long"))
    case("int_bool", op, lambda f=f, x=x, r=r: f(x, r.long()), Raises(dtype_msg))
    negative = Raises(rf"{op}: output size \(pooled_height, pooled_width\) must be non-negative")
    case("pooled_size", op, lambda f=f, x=x, r=r: f(x, r, ph=-1), negative)
    case("pooled_size", op, lambda f=f, x=x, r=r: f(x, r, pw=-3), negative)
    if ps:  # torchvision divides by zero (SIGFPE)
        multiple = Raises(rf"{op}: input channels \(8\) must be a multiple of pooled_height \* pooled_width \(0 \* 2\)")
        case("pooled_size", op, lambda f=f, x=x, r=r: f(x, r, ph=0), multiple)
        case("channels", op, lambda f=f, x=x, r=r: f(x[:, :7], r), Raises(r"input channels \(7\) must be a multiple"))
        case("channels", op, lambda f=f, x=x, r=r: f(x, r, ph=3, pw=3), Raises(r"\(8\) must be a multiple.*\(3 \* 3\)"))
        case("channels", op, lambda f=f, x=x, r=r: f(x[:, :0], r), Stock(shape(K, 0, 2, 2)))
    else:
        case("pooled_size", op, lambda f=f, x=x, r=r: f(x, r, ph=0), Stock(shape(K, C, 0, 2)))
        case("pooled_size", op, lambda f=f, x=x, r=r: f(x, r, pw=0), Stock(shape(K, C, 2, 0)))
    out_of_range = Raises(r"rois\[:, 0\] must hold batch indices in \[0, 2\), got ")
    for v in (2.0, -1.0, -0.5, nan, inf, 1e10):
        case("batch_index", op, lambda f=f, x=x, v=v: f(x, bi(v)), out_of_range)
    # Non-integral: truncated, as torchvision does (0.5 is image 0, 1.9 image 1).
    case("batch_index", op, lambda f=f, x=x: f(x, bi(0.5)), Stock(same_as(lambda f=f, x=x: f(x, bi(0.0)))))
    case("batch_index", op, lambda f=f, x=x: f(x, bi(1.9)), Stock(same_as(lambda f=f, x=x: f(x, bi(1.0)))))

    # NaN / inf in the feature map propagate to the bins that read them.
    xn = with_value(with_value(with_value(x, (0, 0, 3, 3), nan), (1, 1, 5, 5), inf), (1, 1, 6, 6), -inf)
    case("nan_inf", op, lambda f=f, xn=xn, r=r: f(xn, r), Stock(lambda o: not bool(first(o).isfinite().all())))
    # NaN / inf box coordinates. roi_align family: zeros (torchvision reads out of bounds and
    # crashes with sampling_ratio > 0); pool family: stock's bins for NaN, zeros for inf.
    for col, v in ((1, nan), (3, inf), (1, -inf)):
        call = lambda f=f, x=x, r=r, col=col, v=v: f(x, with_value(r, (3, col), v))  # noqa: E731
        if align or (col, v) != (1, nan):
            case("nan_inf", op, call, Differs(zero_rows([3]), "torchvision crashes or returns garbage"))
        else:
            case("nan_inf", op, call, Stock(lambda out: bool(first(out).isfinite().all())))
    case(
        "nan_inf",
        op,
        lambda f=f, x=x, r=r: f(x, with_value(r, (3, 3), 1e30)),
        Stock(lambda o: bool(first(o).isfinite().all())),
    )
    for scale in (nan, inf):
        call = lambda f=f, x=x, r=r, scale=scale: f(x, r, scale=scale)  # noqa: E731
        if align:  # every box non-finite: zeros, documented (torchvision: NaN)
            case("nan_inf", op, call, Differs(zero_rows(list(range(K))), "torchvision returns NaN"))
        else:
            case("nan_inf", op, call, Stock(lambda out: bool(out[0].isfinite().all())))
    case("nan_inf", op, lambda f=f, x=x, r=r: f(x, r, scale=-1.0), Stock(lambda o: bool(first(o).isfinite().all())))

    # int32: a sampling grid over 2^31 - 1 samples (torchvision 0.29's limit; its ps_roi_align
    # hangs), pooled sizes and channel counts whose products overflow, on empty tensors.
    if align:
        too_large = Raises(rf"{op}: sampling grid is too large .*reduce sampling_ratio or the RoI size")
        case("int32_overflow", op, lambda f=f, x=x, r=r: f(x, r[:2], sr=1 << 16), too_large)
        box = torch.tensor([[0, 0, 0, 2e5, 2e5]])
        case("int32_overflow", op, lambda f=f, x=x, box=box: f(x, box, sr=0), too_large)
        # The backward too (torchvision's hangs): the grid of the forward's arguments.
        g_out = torch.zeros(2, C_out, 2, 2)
        bwd = (
            (
                lambda r=r, g_out=g_out, C=C: TV._roi_align_backward(
                    g_out, r[:2], SCALE, 2, 2, 2, C, 11, 13, 1 << 16, True
                )
            )
            if op == "roi_align"
            else (
                lambda r=r, g_out=g_out, C=C: TV._ps_roi_align_backward(
                    g_out,
                    r[:2],
                    torch.arange(8, dtype=torch.int32).view(1, 2, 2, 2).expand(2, 2, 2, 2),
                    SCALE,
                    2,
                    2,
                    1 << 16,
                    2,
                    C,
                    11,
                    13,
                )
            )
        )
        case("int32_overflow", op, bwd, Raises(rf"_{op}_backward: sampling grid is too large"))
        huge = torch.tensor([[0, 0, 0, 1e30, 1e30]])
        case("int32_overflow", op, lambda f=f, x=x, huge=huge: f(x, huge, sr=0), Raises("too large for adaptive"))
        # Just under the limit: ours samples the grid separably (torchvision builds a table of
        # 5e8 entries, ~20 GB, and sums them one by one in float32).
        under = Differs(lambda o: bool(first(o).isfinite().all()), "torchvision allocates ~20 GB")
        case("int32_overflow", op, lambda f=f, x=x, r=r: f(x, r[:2], sr=23170, ph=1, pw=1), under)
    wide = torch.empty(0, C << 31, 1, 1)  # 2^34 channels, no elements
    big = shape(0, (C << 31) // (4 if ps else 1), 2, 2)
    if op == "roi_align":
        case("int32_overflow", op, lambda f=f, r=r, wide=wide: f(wide, r[:0]), Stock(big))
    else:  # torchvision's channel count wraps in int32: (0, 0, 2, 2)
        case("int32_overflow", op, lambda f=f, r=r, wide=wide: f(wide, r[:0]), Differs(big, "torchvision: 0 channels"))
    if ps:
        case("int32_overflow", op, lambda f=f, x=x, r=r: f(x, r[:0], ph=1 << 16, pw=1 << 16), Raises("multiple of"))
    else:
        case(
            "int32_overflow",
            op,
            lambda f=f, x=x, r=r: f(x, r[:0], ph=1 << 16, pw=1 << 16),
            Stock(shape(0, C, 1 << 16, 1 << 16)),
        )

    case("zero_size", op, lambda f=f, x=x, r=r: f(x, r[:0]), Stock(shape(0, C_out, 2, 2)))
    case("zero_size", op, lambda f=f, x=x, r=r: f(x[:0], r[:0]), Stock(shape(0, C_out, 2, 2)))
    case("zero_size", op, lambda f=f, x=x, r=r: f(x[:0], r), Raises(r"batch indices in \[0, 0\)"))
    case("zero_size", op, lambda f=f, x=x, r=r: f(x[:, :0], r), Stock(shape(K, 0, 2, 2)))
    for view in (lambda t: t[:, :, :0], lambda t: t[..., :0]):
        call = lambda f=f, x=x, r=r, view=view: f(view(x), r)  # noqa: E731
        if op == "roi_align":  # torchvision reads out of bounds (SIGSEGV)
            case("zero_size", op, call, Differs(zero_rows(list(range(K))), "torchvision crashes"))
        else:
            case("zero_size", op, call, Stock(zero_rows(list(range(K)))))

    meta_shape = shape(K, C_out, 2, 2, device="meta")
    case("meta", op, lambda f=f, x=x, r=r: f(x.to("meta"), r.to("meta")), Stock(meta_shape))
    one_device = Raises(rf"{op}: tensors must be on one device, got input on (cpu|meta), rois on (meta|cpu)")
    case("meta", op, lambda f=f, x=x, r=r: f(x, r.to("meta")), one_device)  # torchvision: uninitialised memory
    case("meta", op, lambda f=f, x=x, r=r: f(x.to("meta"), r), one_device)


# ---- nms and batched_nms -----------------------------------------------------------------------


def nms_case(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ctr = torch.rand(n, 2, generator=g) * 100
    wh = torch.rand(n, 2, generator=g) * 30 + 1
    return torch.cat([ctr - wh / 2, ctr + wh / 2], 1), torch.rand(n, generator=g)


def kept_indices(kept: torch.Tensor) -> bool:
    return kept.dtype == torch.int64 and kept.dim() == 1 and bool((kept >= 0).all())


def as_reference(boxes, scores, thr) -> Callable[[Any], bool]:
    return lambda kept: torch.equal(kept, ref_nms(boxes, scores, thr))


NMS = TV.nms
b, s = nms_case(40, 1)
case("rank", "nms", lambda: NMS(b[None], s, 0.5), Raises(r"nms: boxes must have shape \[N, 4\], got \[1, 40, 4\]"))
case("rank", "nms", lambda: NMS(b, s[None], 0.5), Raises(r"nms: scores must have shape \[N\], got \[1, 40\]"))
case("rank", "nms", lambda: NMS(b[0], s[:1], 0.5), Raises(r"nms: boxes must have shape \[N, 4\], got \[4\]"))
case("box_width", "nms", lambda: NMS(torch.cat([b, s[:, None]], 1), s, 0.5), Raises(r"got \[40, 5\]"))
case("box_width", "nms", lambda: NMS(b[:, :3], s, 0.5), Raises(r"nms: boxes must have shape \[N, 4\], got \[40, 3\]"))
case("mixed_dtype", "nms", lambda: NMS(b, s.double(), 0.5), Raises("nms: boxes and scores must have the same dtype"))
case("mixed_dtype", "nms", lambda: NMS(b.bfloat16(), s, 0.5), Raises("nms: boxes and scores must have the same dtype"))
case("int_bool", "nms", lambda: NMS(b.int(), s.int(), 0.5), Raises("nms: boxes must be float32, .* got Int"))
case("int_bool", "nms", lambda: NMS(b.bool(), s.bool(), 0.5), Raises("nms: boxes must be float32, .* got Bool"))
case("int_bool", "nms", lambda: NMS(b, s.long(), 0.5), Raises("nms: boxes and scores must have the same dtype"))
for index, v in (((4, 0), nan), ((5, 2), inf), ((5, 0), -inf)):
    bv = with_value(b, index, v)
    case("nan_inf", "nms", lambda bv=bv: NMS(bv, s, 0.5), Stock(as_reference(bv, s, 0.5)))
for v in (nan, inf, -inf):
    sv = with_value(s, (4,), v)
    case("nan_inf", "nms", lambda sv=sv: NMS(b, sv, 0.5), Stock(kept_indices))
case("nan_inf", "nms", lambda: NMS(torch.full_like(b, nan), s, 0.5), Stock(shape(40)))
case("nan_inf", "nms", lambda: NMS(b, s, nan), Stock(shape(40)))  # no IoU exceeds NaN: all kept
case("nan_inf", "nms", lambda: NMS(b, s, inf), Stock(shape(40)))
# 2^16 copies of one box (stride 0): 2^32 pairs, one kept.
case("int32_overflow", "nms", lambda: NMS(b[:1].expand(1 << 16, 4), s[:1].expand(1 << 16), 0.5), Stock(shape(1)))
case("zero_size", "nms", lambda: NMS(b[:0], s[:0], 0.5), Stock(shape(0)))
case(
    "zero_size",
    "nms",
    lambda: NMS(b[:0], s, 0.5),
    Raises("nms: boxes and scores must have the same length, got 0 and 40"),
)
data_dependent = Raises("data-dependent output shape|meta Tensors")  # torchvision's fake kernel: no shape
case("meta", "nms", lambda: NMS(b.to("meta"), s.to("meta"), 0.5), data_dependent)
case("meta", "nms", lambda: NMS(b, s.to("meta"), 0.5), data_dependent)

# batched_nms above 4000 coordinates: torchvision's per-class loop, replaced by our _batched_nms.
batched_nms = __import__("torchvision").ops.batched_nms
BATCHED = torch.ops.torchvision_cpu_ext._batched_nms
bb, bs = nms_case(1200, 2)
ids = torch.randint(0, 40, (1200,), generator=torch.Generator().manual_seed(0))


def per_class_reference(boxes, scores, idxs, thr) -> Callable[[Any], bool]:
    """torchvision's result: per-class nms, kept indices by descending score."""

    def check(kept: torch.Tensor) -> bool:
        keep = torch.cat(
            [torch.where(idxs == c)[0][ref_nms(boxes[idxs == c], scores[idxs == c], thr)] for c in idxs.unique()]
        )
        return torch.equal(kept.sort().values, keep.sort().values)

    return check


BN = "batched_nms"
ids_msg = r"batched_nms: idxs must be an integer tensor of shape \[N\] = \[1200\]"
case("rank", BN, lambda: batched_nms(bb, bs, ids[None], 0.5), Raises(ids_msg))  # torchvision: a wrong result
case("rank", BN, lambda: batched_nms(bb, bs[None], ids, 0.5), Raises(r"nms: scores must have shape \[N\]"))
case("box_width", BN, lambda: batched_nms(bb[:, :3], bs, ids, 0.5), Raises(r"boxes must have shape \[N, 4\]"))
case("box_width", BN, lambda: batched_nms(torch.cat([bb, bs[:, None]], 1), bs, ids, 0.5), Raises(r"got \[1200, 5\]"))
case("mixed_dtype", BN, lambda: batched_nms(bb, bs.double(), ids, 0.5), Raises("must have the same dtype"))
case("mixed_dtype", BN, lambda: batched_nms(bb.bfloat16(), bs, ids, 0.5), Raises("must have the same dtype"))
case("int_bool", BN, lambda: batched_nms(bb.int(), bs.int(), ids, 0.5), Raises("boxes must be float32, .* got Int"))
for cast in (torch.Tensor.float, torch.Tensor.int):
    case(
        "int_bool",
        BN,
        lambda cast=cast: batched_nms(bb, bs, cast(ids), 0.5),
        Stock(per_class_reference(bb, bs, ids, 0.5)),
    )
two = ids.bool()
case(
    "int_bool", BN, lambda: batched_nms(bb, bs, two, 0.5), Stock(same_as(lambda: batched_nms(bb, bs, two.long(), 0.5)))
)
case("batch_index", BN, lambda: batched_nms(bb, bs, ids - 3, 0.5), Stock(per_class_reference(bb, bs, ids, 0.5)))
case("batch_index", BN, lambda: batched_nms(bb, bs, ids[:100], 0.5), Raises(ids_msg))  # torchvision: a wrong result
bbn = with_value(bb, (4, 0), nan)
case("nan_inf", BN, lambda: batched_nms(bbn, bs, ids, 0.5), Stock(per_class_reference(bbn, bs, ids, 0.5)))
bbi = with_value(bb, (5, 2), inf)
case("nan_inf", BN, lambda: batched_nms(bbi, bs, ids, 0.5), Stock(per_class_reference(bbi, bs, ids, 0.5)))
bsn = torch.where(ids == 1, nan, bs)
case("nan_inf", BN, lambda: batched_nms(bb, bsn, ids, 0.5), Stock(kept_indices))
case("nan_inf", BN, lambda: batched_nms(bb, bs, ids, nan), Stock(shape(1200)))
# Class ids near 2^40: torchvision's small-input path offsets boxes by id * (max coordinate + 1).
case("int32_overflow", BN, lambda: batched_nms(bb, bs, ids << 40, 0.5), Stock(per_class_reference(bb, bs, ids, 0.5)))
case("zero_size", BN, lambda: batched_nms(bb[:0], bs[:0], ids[:0], 0.5), Stock(shape(0)))
case("meta", BN, lambda: batched_nms(bb.to("meta"), bs.to("meta"), ids.to("meta"), 0.5), data_dependent)
case(
    "meta",
    BN,
    lambda: BATCHED(bb, bs.to("meta"), ids, 0.5),
    Raises("batched_nms: tensors must be on one device, got boxes on cpu, scores on meta, idxs on cpu"),
)


# ---- FrozenBatchNorm2d (under inference_mode: the fused kernel, or torchvision's expression) -----

FBN = "frozen_batch_norm"
FOP = torch.ops.torchvision_cpu_ext.frozen_batch_norm


def fbn_module(**buffers: torch.Tensor):
    from torchvision.ops.misc import FrozenBatchNorm2d

    m = FrozenBatchNorm2d(4)
    g = torch.Generator().manual_seed(0)
    m.weight.copy_(torch.randn(4, generator=g))
    m.bias.copy_(torch.randn(4, generator=g))
    m.running_mean.copy_(torch.randn(4, generator=g))
    m.running_var.copy_(torch.rand(4, generator=g) + 0.5)
    for name, value in buffers.items():
        setattr(m, name, value)
    return m


def fbn(x: torch.Tensor, m=None) -> torch.Tensor:
    with torch.inference_mode():
        return (m if m is not None else fbn_module())(x)


xb = torch.randn(2, 4, 5, 6, generator=torch.Generator().manual_seed(1))
case("rank", FBN, lambda: fbn(xb[0]), Stock(shape(1, 4, 5, 6)))  # broadcasting, as torchvision's expression
case("rank", FBN, lambda: fbn(xb[None]), Stock(shape(1, 2, 4, 5, 6)))
case("rank", FBN, lambda: fbn(xb[:, :, 0]), Raises("must match the size of tensor b"))
case("rank", FBN, lambda: FOP(xb[0], *fbn_args()), Raises("frozen_batch_norm: input must be a 4-D tensor"))
case("mixed_dtype", FBN, lambda: fbn(xb.double()), Stock(lambda o: o.dtype == torch.float64))
case("mixed_dtype", FBN, lambda: fbn(xb.bfloat16()), Stock(lambda o: o.dtype == torch.float32))
case(
    "mixed_dtype",
    FBN,
    lambda: fbn(xb, fbn_module(weight=torch.ones(4, dtype=torch.float64))),
    Stock(lambda o: o.dtype == torch.float64),
)
for dtype in (torch.int32, torch.bool, torch.uint8):
    case("int_bool", FBN, lambda dtype=dtype: fbn((xb * 3).to(dtype)), Stock(lambda o: o.dtype == torch.float32))
case("int_bool", FBN, lambda: FOP(xb.int(), *fbn_args()), Raises("frozen_batch_norm: input must be float32"))
case("nan_inf", FBN, lambda: fbn(torch.where(xb > 1, nan, xb)), Stock(has_nan))
case("nan_inf", FBN, lambda: fbn(torch.where(xb > 1, -inf, xb)), Stock(lambda o: bool(o.isinf().any())))
case("nan_inf", FBN, lambda: fbn(xb, fbn_module(running_var=torch.tensor([0.0, -1, nan, inf]))), Stock(has_nan))
case("nan_inf", FBN, lambda: fbn(xb, fbn_module(weight=torch.tensor([nan, inf, -inf, 0.0]))), Stock(has_nan))
case("nan_inf", FBN, lambda: fbn(xb, fbn_module(eps=nan)), Stock(lambda o: bool(o.isnan().all())))
case("int32_overflow", FBN, lambda: fbn(torch.empty(0, 4, 1 << 16, 1 << 16)), Stock(shape(0, 4, 1 << 16, 1 << 16)))
case(
    "int32_overflow",
    FBN,
    lambda: FOP(torch.empty(1, 4, 1 << 16, 1 << 16, device="meta"), *fbn_args("meta")),
    Stock(shape(1, 4, 1 << 16, 1 << 16, device="meta")),
)
case("zero_size", FBN, lambda: fbn(xb[:0]), Stock(shape(0, 4, 5, 6)))
case("zero_size", FBN, lambda: fbn(xb[:, :, :0]), Stock(shape(2, 4, 0, 6)))
case("zero_size", FBN, lambda: fbn(xb[:, :0]), Raises("must match the size of tensor b"))
case("meta", FBN, lambda: fbn(xb.to("meta"), fbn_module().to("meta")), Stock(shape(2, 4, 5, 6, device="meta")))
case("meta", FBN, lambda: fbn(xb.to("meta")), Raises("is not on the expected device"))
case("meta", FBN, lambda: FOP(xb, *fbn_args("meta")), Raises("frozen_batch_norm: tensors must be on one device"))


def fbn_args(device: str = "cpu") -> tuple:
    m = fbn_module()
    return (*(t.to(device) for t in (m.weight, m.bias, m.running_mean, m.running_var)), m.eps)


# ---- box_iou_rotated ---------------------------------------------------------------------------

BIR = "box_iou_rotated"
r1 = torch.tensor([[10.0, 10, 4, 6, 30], [5, 5, 2, 2, 0], [20, 20, 8, 1, 90]])
iou = TV.box_iou_rotated


def unit_iou(o: torch.Tensor) -> bool:
    return bool(((o >= 0) & (o <= 1)).all())


case("rank", BIR, lambda: iou(r1[0], r1), Raises(r"box_iou_rotated: boxes1 must have shape \[N, 5\]"))
case("rank", BIR, lambda: iou(r1, r1[None]), Raises(r"box_iou_rotated: boxes2 must have shape \[N, 5\]"))
case("box_width", BIR, lambda: iou(r1[:, :4], r1), Raises(r"boxes1 must have shape \[N, 5\] .*got \[3, 4\]"))
case("box_width", BIR, lambda: iou(r1, torch.cat([r1, r1[:, :1]], 1)), Raises(r"boxes2 .*got \[3, 6\]"))
case("mixed_dtype", BIR, lambda: iou(r1, r1.double()), Raises("boxes1 and boxes2 must have the same dtype"))
for dtype in (torch.int32, torch.bool, torch.bfloat16):
    case(
        "int_bool",
        BIR,
        lambda dtype=dtype: iou(r1.to(dtype), r1.to(dtype)),
        Raises("boxes1 must be float32 or float64"),
    )
for index, v in (((1, 0), nan), ((1, 2), inf), ((1, 4), inf), ((1, 2), 1e30), ((1, 2), -3.0)):
    rv = with_value(r1, index, v)
    case("nan_inf", BIR, lambda rv=rv: iou(rv, r1), Stock(unit_iou))
case("zero_size", BIR, lambda: iou(r1[:0], r1), Stock(shape(0, 3)))
case("zero_size", BIR, lambda: iou(r1, r1[:0]), Stock(shape(3, 0)))
no_fake = Raises("box_iou_rotated: attempted to run this operator with Meta tensors")  # as torchvision: no fake
case("meta", BIR, lambda: iou(r1.to("meta"), r1.to("meta")), no_fake)
case("meta", BIR, lambda: iou(r1, r1.to("meta")), no_fake)


# ---- qnms and qroi_align (integer representations of quantized tensors) -------------------------

QNMS, QROI = TV.qnms, TV.qroi_align
qx = torch.randint(0, 256, (1, 3, 11, 13), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
qr = torch.tensor([[20, 28, 36, 60, 80], [20, 40, 20, 100, 90], [20, 0, 0, 120, 110]], dtype=torch.uint8)
QP = (0.04, 10, 0.125, 20)  # input scale, zero point; rois scale, zero point


def qroi(x, rois, spatial_scale=1.0, ph=2, pw=2, sr=2):
    return QROI(x, rois, *QP, spatial_scale, ph, pw, sr, True)


case("rank", "qroi_align", lambda: qroi(qx[0], qr), Raises("qroi_align: input must be a 4-D tensor"))
case("rank", "qroi_align", lambda: qroi(qx, qr[0]), Raises(r"qroi_align: rois must have shape \[K, 5\]"))
case(
    "box_width",
    "qroi_align",
    lambda: qroi(qx, qr[:, 1:]),
    Raises(r"qroi_align: rois must have shape \[K, 5\], got \[3, 4\]"),
)
case(
    "mixed_dtype",
    "qroi_align",
    lambda: qroi(qx, qr.to(torch.int8)),
    Raises("qroi_align: input and rois must have the same dtype"),
)
case("int_bool", "qroi_align", lambda: qroi(qx.float(), qr.float()), Raises("qroi_align: input must hold integer"))
case("int_bool", "qroi_align", lambda: qroi(qx.bool(), qr.bool()), Raises("qroi_align: input must hold integer"))
case("pooled_size", "qroi_align", lambda: qroi(qx, qr, ph=0), Stock(shape(3, 3, 0, 2)))
case("pooled_size", "qroi_align", lambda: qroi(qx, qr, ph=-1), Raises("output size .* must be non-negative"))
case(
    "batch_index",
    "qroi_align",
    lambda: qroi(qx.repeat(2, 1, 1, 1), qr),
    Raises("qroi_align: input must hold one image"),
)
# Non-finite boxes are zeros: a quantized zero is the zero point (torchvision: integer 0).
zero_point = Differs(lambda o: bool((o == QP[1]).all()), "torchvision returns the integer 0")
case("nan_inf", "qroi_align", lambda: qroi(qx, qr, spatial_scale=nan), zero_point)
case("int32_overflow", "qroi_align", lambda: qroi(qx, qr, sr=1 << 16), Raises("sampling grid is too large"))
case("zero_size", "qroi_align", lambda: qroi(qx[:, :0], qr), Stock(shape(3, 0, 2, 2)))
case(
    "zero_size",
    "qroi_align",
    lambda: qroi(qx[:, :, :0], qr),
    Differs(lambda o: bool((o == QP[1]).all()), "torchvision crashes"),
)
case("zero_size", "qroi_align", lambda: qroi(qx, qr[:0]), Stock(shape(0, 3, 2, 2)))
case("meta", "qroi_align", lambda: qroi(qx.to("meta"), qr.to("meta")), Stock(shape(3, 3, 2, 2, device="meta")))
qb = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 70]], dtype=torch.uint8)
qs = torch.tensor([9, 8, 7], dtype=torch.uint8)
case("rank", "qnms", lambda: QNMS(qb[None], qs, 0.5), Raises(r"qnms: dets must have shape \[N, 4\]"))
case("rank", "qnms", lambda: QNMS(qb, qs[None], 0.5), Raises(r"qnms: scores must have shape \[N\]"))
case(
    "box_width", "qnms", lambda: QNMS(qb[:, :3], qs, 0.5), Raises(r"qnms: dets must have shape \[N, 4\], got \[3, 3\]")
)
case(
    "mixed_dtype",
    "qnms",
    lambda: QNMS(qb, qs.to(torch.int8), 0.5),
    Raises("qnms: dets and scores must have the same dtype"),
)
case("int_bool", "qnms", lambda: QNMS(qb.float(), qs.float(), 0.5), Raises("qnms: dets must hold integer"))
case("int_bool", "qnms", lambda: QNMS(qb.bool(), qs.bool(), 0.5), Raises("qnms: dets must hold integer"))
case("nan_inf", "qnms", lambda: QNMS(qb, qs, nan), Stock(shape(3)))
case("zero_size", "qnms", lambda: QNMS(qb[:0], qs[:0], 0.5), Stock(shape(0)))
case("meta", "qnms", lambda: QNMS(qb.to("meta"), qs.to("meta"), 0.5), data_dependent)


# ---- deform_conv2d ---------------------------------------------------------------------------

DC = "deform_conv2d"
g = torch.Generator().manual_seed(2)
D_ARGS = {  # dcnv2: N=2, C=6, 9x8 map, 3x3 kernel, 4 output channels, padding 1
    "input": torch.randn(2, 6, 9, 8, generator=g),
    "weight": torch.randn(4, 6, 3, 3, generator=g),
    "offset": torch.randn(2, 18, 9, 8, generator=g),
    "mask": torch.rand(2, 9, 9, 8, generator=g),
    "bias": torch.randn(4, generator=g),
    "stride_h": 1,
    "stride_w": 1,
    "pad_h": 1,
    "pad_w": 1,
    "dilation_h": 1,
    "dilation_w": 1,
    "groups": 1,
    "offset_groups": 1,
    "use_mask": True,
}


def deform(**changes: Any) -> torch.Tensor:
    args = dict(D_ARGS)
    for k, v in changes.items():
        args[k] = v(args[k]) if callable(v) else v
    return TV.deform_conv2d(*args.values())


def where(cond: Callable, value: float) -> Callable:
    return lambda t: torch.where(cond(t), value, t)


case("rank", DC, lambda: deform(input=lambda t: t[0]), Raises("deform_conv2d: input must be a 4-D tensor"))
case("rank", DC, lambda: deform(weight=lambda t: t[None]), Raises("deform_conv2d: weight must be a 4-D tensor"))
case("rank", DC, lambda: deform(offset=lambda t: t[0]), Raises("deform_conv2d: offset must be a 4-D tensor"))
case("rank", DC, lambda: deform(mask=lambda t: t[0]), Raises("deform_conv2d: mask must be a 4-D tensor"))
case("rank", DC, lambda: deform(bias=lambda t: t[None]), Stock(shape(2, 4, 9, 8)))  # [1, C_out]: as torchvision
case("mixed_dtype", DC, lambda: deform(offset=torch.Tensor.double), Raises("offset must have the dtype of input"))
case("mixed_dtype", DC, lambda: deform(weight=torch.Tensor.bfloat16), Raises("weight must have the dtype of input"))
case("mixed_dtype", DC, lambda: deform(bias=torch.Tensor.double), Raises("bias must have the dtype of input"))
ints = {k: torch.Tensor.int for k in ("input", "weight", "offset", "mask", "bias")}
case("int_bool", DC, lambda: deform(**ints), Raises("deform_conv2d: input must be float32, .* got Int"))
case("int_bool", DC, lambda: deform(mask=torch.Tensor.bool), Raises("mask must have the dtype of input"))
case("pooled_size", DC, lambda: deform(stride_h=0), Raises("deform_conv2d: stride must be positive"))
case("pooled_size", DC, lambda: deform(pad_w=-1), Raises("deform_conv2d: padding must be non-negative"))
case("pooled_size", DC, lambda: deform(dilation_w=0), Raises("deform_conv2d: dilation must be positive"))
case("pooled_size", DC, lambda: deform(weight=lambda t: t[..., :0]), Raises("kernel size must be positive"))
case("channels", DC, lambda: deform(groups=4), Raises(r"weight.size\(1\) \* groups"))
case("channels", DC, lambda: deform(offset_groups=4), Raises("multiple of offset_groups"))
case("channels", DC, lambda: deform(groups=0), Raises("groups must be positive"))
case("batch_index", DC, lambda: deform(offset=lambda t: t[:1]), Raises(r"offset.size\(0\) must be the batch size"))
case("batch_index", DC, lambda: deform(mask=lambda t: t[:1]), Raises(r"mask.size\(0\)"))
far = lambda: deform(offset=where(lambda t: t > 1, 1e30))  # noqa: E731
# A NaN offset samples nothing, as a far one (torchvision reads out of bounds: SIGSEGV).
case("nan_inf", DC, lambda: deform(offset=where(lambda t: t > 1, nan)), Differs(same_as(far), "torchvision crashes"))
case("nan_inf", DC, lambda: deform(offset=where(lambda t: t > 1, inf)), Stock(same_as(far)))
case("nan_inf", DC, far, Stock(lambda o: bool(o.isfinite().all())))
case("nan_inf", DC, lambda: deform(input=where(lambda t: t > 1, nan)), Stock(has_nan))
case("nan_inf", DC, lambda: deform(weight=where(lambda t: t > 1, -inf)), Stock(has_nan))
# A non-finite mask is folded into the bilinear weights: NaN wherever it meets a sample in
# the map; torchvision multiplies it by the sample instead, so also NaN (mask * 0) outside it.
nan_mask = Differs(has_nan, "torchvision: also NaN where the mask meets a sample outside the map")
case("nan_inf", DC, lambda: deform(mask=where(lambda t: t > 0.9, nan)), nan_mask)
case("nan_inf", DC, lambda: deform(mask=where(lambda t: t > 0.9, inf)), nan_mask)
too_far = Raises(r"deform_conv2d: the sampling positions .* must fit in int32: reduce stride, padding or dilation")
case("int32_overflow", DC, lambda: deform(dilation_h=1 << 30, pad_h=1 << 30), too_far)
case(
    "int32_overflow",
    DC,
    lambda: deform(stride_w=1 << 31),
    Raises(r"offset's spatial size must be the output's \(9, 1\)"),
)
empty = {k: (lambda t: t[:0]) for k in ("input", "offset", "mask")}
case("int32_overflow", DC, lambda: deform(**empty, pad_h=1 << 20), Raises(r"must be the output's \(2097159, 8\)"))
case("zero_size", DC, lambda: deform(**empty), Stock(shape(0, 4, 9, 8)))
case("zero_size", DC, lambda: deform(weight=lambda t: t[:0], bias=lambda t: t[:0]), Stock(shape(2, 0, 9, 8)))
case("zero_size", DC, lambda: deform(input=lambda t: t[:, :0], weight=lambda t: t[:, :0]), Stock(shape(2, 4, 9, 8)))
case("zero_size", DC, lambda: deform(input=lambda t: t[:, :, :0]), Raises("offset's spatial size"))
to_meta = {k: (lambda t: t.to("meta")) for k in ("input", "weight", "offset", "mask", "bias")}
case("meta", DC, lambda: deform(**to_meta), Stock(shape(2, 4, 9, 8, device="meta")))
case("meta", DC, lambda: deform(offset=lambda t: t.to("meta")), Raises("deform_conv2d: tensors must be on one device"))


# ---- depthwise_conv1d / depthwise_conv2d (stock: F.conv1d / F.conv2d with groups=C) -------------

g = torch.Generator().manual_seed(3)
X2, W2, B2 = torch.randn(2, 4, 7, 8, generator=g), torch.randn(8, 1, 3, 3, generator=g), torch.randn(8, generator=g)
X1, W1 = X2[:, :, 0], W2[:, :, 0]


def dw(dims: int, x=None, w=None, b=B2, **kw) -> Callable[[], Any]:
    """depthwise_conv<dims>d's call, and F.conv<dims>d's (stock) beside it."""
    x = (X1 if dims == 1 else X2) if x is None else x
    w = (W1 if dims == 1 else W2) if w is None else w
    ours = depthwise_conv1d if dims == 1 else depthwise_conv2d
    conv = F.conv1d if dims == 1 else F.conv2d
    call = lambda: ours(x, w, b, **kw)  # noqa: E731
    call.stock = lambda: conv(x, w, b, groups=x.shape[1] if x.dim() > 1 else 1, **kw)
    return call


DW2, DW1 = "depthwise_conv2d", "depthwise_conv1d"
case("rank", DW2, dw(2, x=X2[0]), Raises(r"depthwise_conv2d: input must be a 4-D tensor"))
case("rank", DW2, dw(2, w=W2[0], b=None), Raises(r"depthwise_conv2d: weight must have shape \[C \* M, 1"))
case("rank", DW2, dw(2, b=B2[None]), Raises(r"depthwise_conv2d: bias must have shape \[8\]"))
case("rank", DW1, dw(1, x=X1[0]), Raises(r"depthwise_conv1d: input must be a 3-D tensor"))
case("rank", DW1, dw(1, x=X2), Raises(r"depthwise_conv1d: input must be a 3-D tensor"))
case("mixed_dtype", DW2, dw(2, w=W2.double()), Raises("depthwise_conv2d: weight must have the dtype of input"))
case("mixed_dtype", DW2, dw(2, x=X2.bfloat16(), b=None), Raises("weight must have the dtype of input"))
case("mixed_dtype", DW1, dw(1, b=B2.double()), Raises("depthwise_conv1d: bias must have the dtype of input"))
for dims, name, dtype in ((2, DW2, torch.int32), (2, DW2, torch.bool), (1, DW1, torch.int64)):
    x, w = (X2, W2) if dims == 2 else (X1, W1)
    case("int_bool", name, dw(dims, x.to(dtype), w.to(dtype), None), Raises(f"{name}: input must be float32, "))
case("pooled_size", DW2, dw(2, stride=0), Raises("depthwise_conv2d: stride must be positive"))
case("pooled_size", DW2, dw(2, stride=-1), Raises("depthwise_conv2d: stride must be positive"))
case("pooled_size", DW2, dw(2, dilation=0), Raises("depthwise_conv2d: dilation must be positive"))
case("pooled_size", DW2, dw(2, padding=-1), Raises("depthwise_conv2d: padding must be non-negative"))
case("pooled_size", DW2, dw(2, w=W2[..., :0]), Raises("depthwise_conv2d: weight's kernel size must be positive"))
case("pooled_size", DW1, dw(1, stride=0), Raises("depthwise_conv1d: stride must be positive"))
case("channels", DW2, dw(2, w=W2[:6], b=B2[:6]), Raises("must be a positive multiple of input channels"))
case("channels", DW2, dw(2, x=X2[:, :0], w=W2[:0], b=B2[:0]), Raises("input must have at least one channel"))
padded_taps = "depthwise_conv_kernel.cpp skips padded taps: a NaN/inf weight there is not NaN as in F.conv1d"


def not_finite(o: torch.Tensor) -> bool:
    return bool(o.isfinite().logical_not().any())


for dims, name in ((2, DW2), (1, DW1)):
    x, w = (X2, W2) if dims == 2 else (X1, W1)
    for t in ("x", "w"):
        for v in (nan, inf):
            spoilt = {t: torch.where((x if t == "x" else w) > 1, v, x if t == "x" else w)}
            # F.conv1d multiplies the zero padding by the weights (0 * inf is NaN); F.conv2d and ours do not.
            xfail = padded_taps if (dims, t) == (1, "w") else None
            case("nan_inf", name, dw(dims, **spoilt, padding=1), Stock(not_finite, xfail=xfail))
# Padding and dilation of 2^30, a stride of 2^31: F.conv2d gives [2, 8, 7, 6] and [2, 8, 1, 6]
# (ours hands such geometries to ATen's convolution: its band scratch would be gigabytes).
case("int32_overflow", DW2, dw(2, padding=(1 << 30, 0), dilation=(1 << 30, 1)), Stock(shape(2, 8, 7, 6)))
case("int32_overflow", DW2, dw(2, stride=(1 << 31, 1)), Stock(shape(2, 8, 1, 6)))
case("int32_overflow", DW2, dw(2, x=X2[:0], padding=1 << 20), Stock(shape(0, 8, (1 << 21) + 5, (1 << 21) + 6)))
case("zero_size", DW2, dw(2, x=X2[:0]), Stock(shape(0, 8, 5, 6)))
case("zero_size", DW1, dw(1, x=X1[:0]), Stock(shape(0, 8, 6)))
case("zero_size", DW2, dw(2, x=X2[:, :, :0], padding=1), Raises("is smaller than the dilated kernel"))
case("meta", DW2, dw(2, x=X2.to("meta"), w=W2.to("meta"), b=B2.to("meta")), Stock(shape(2, 8, 5, 6, device="meta")))
case("meta", DW1, dw(1, x=X1.to("meta"), w=W1.to("meta"), b=None), Stock(shape(2, 8, 6, device="meta")))
case("meta", DW2, dw(2, w=W2.to("meta")), Raises("depthwise_conv2d: tensors must be on one device"))


# ---- non-CPU devices: our kernels are on the CPU key only ----------------------------------------

OTHER_KEYS = ("CUDA", "XPU", "MPS", "HPU", "PrivateUse1")
for op, qualnames in (
    ("roi_align", ["torchvision::roi_align", "torchvision::_roi_align_backward"]),
    ("roi_pool", ["torchvision::roi_pool", "torchvision::_roi_pool_backward"]),
    ("ps_roi_align", ["torchvision::ps_roi_align", "torchvision::_ps_roi_align_backward"]),
    ("ps_roi_pool", ["torchvision::ps_roi_pool", "torchvision::_ps_roi_pool_backward"]),
    ("nms", ["torchvision::nms"]),
    (BN, ["torchvision_cpu_ext::_batched_nms"]),
    (FBN, ["torchvision_cpu_ext::frozen_batch_norm"]),
    (BIR, ["torchvision::box_iou_rotated"]),
    ("qnms", ["torchvision::qnms"]),
    ("qroi_align", ["torchvision::qroi_align"]),
    (DC, ["torchvision::deform_conv2d", "torchvision::_deform_conv2d_backward"]),
    (DW2, ["torchvision_cpu_ext::depthwise_conv2d", "torchvision_cpu_ext::_depthwise_conv2d_backward"]),
    (DW1, ["torchvision_cpu_ext::depthwise_conv1d", "torchvision_cpu_ext::_depthwise_conv1d_backward"]),
):

    def kernels(qualnames=qualnames) -> list[tuple[str, str, bool]]:
        """Which keys have a kernel: a CUDA (or other) tensor reaches torchvision's kernel there,
        or the dispatcher's "could not run ... with arguments from the 'CUDA' backend"."""
        has = torch._C._dispatch_has_kernel_for_dispatch_key
        return [(q, key, has(q, key)) for q in qualnames for key in ("CPU", *OTHER_KEYS)]

    # A CPU kernel, and another device's only where torchvision has one (its CUDA kernels, in
    # the native configuration): the registrations equal stock's there, ours add none.
    theirs = torchvision_kernels_loaded() and op not in (BN, FBN, DW1, DW2)
    expected = Stock(lambda ks, theirs=theirs: all(has == (key == "CPU") or theirs for _, key, has in ks))
    case("other_device", op, kernels, expected)


def _id(c: tuple) -> str:
    row, op, _, _ = c
    n = sum(1 for other in CASES[: CASES.index(c)] if other[:2] == (row, op))
    return f"{row}-{op}-{n}"


def _marks(c: tuple) -> list:
    marks = [] if c[0] == "nan_inf" else [pytest.mark.variant_independent]
    xfail = getattr(c[3], "xfail", None)
    if xfail:
        marks.append(pytest.mark.xfail(reason=xfail, strict=True))
    return marks


@pytest.mark.parametrize("c", [pytest.param(c, id=_id(c), marks=_marks(c)) for c in CASES])
def test_bad_input(c, native):
    row, op, call, expect = c
    check_bad_input(call, expect, native, stock_call=getattr(call, "stock", None))


def test_every_cell_is_in_the_readme():
    """The README's table has a row per ROWS entry, naming the test that backs it."""
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    table = readme.split("## Bad input: what the package guarantees", 1)[1].split("\n## ", 1)[0]
    for row in ROWS:
        assert f"`-k {row}`" in table, row
    assert {op for _, op, _, _ in CASES} >= {*ROI_OPS, "nms", BN, FBN, BIR, "qnms", "qroi_align", DC, DW1, DW2}
