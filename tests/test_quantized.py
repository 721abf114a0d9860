"""qnms and qroi_align: torchvision's quantized ops (integer representations in, as its Python
side calls them), against torchvision's native kernels and float64 references, and through
torchvision.ops.nms / roi_align on quantized tensors."""

from __future__ import annotations

import pytest
import torch
import torchvision
from op_tester import Sample
from reference import nms as ref_nms
from reference import roi_align as ref_roi_align

import torchvision_cpu_ext
from torchvision_cpu_ext._info import cpu_kernel_owner

QNMS = torch.ops.torchvision.qnms
QROI_ALIGN = torch.ops.torchvision.qroi_align
INT_TYPES = [torch.uint8, torch.int8, torch.int32]


def torchvision_op(op, *args):
    with torchvision_cpu_ext.disabled():
        return op(*args)


def test_kernels_are_ours():
    assert cpu_kernel_owner("qnms") == "torchvision_cpu_ext"
    assert cpu_kernel_owner("qroi_align") == "torchvision_cpu_ext"


def qnms_case(n: int, seed: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer boxes (some zero-area or inverted, some identical) and few distinct scores, so
    that ties decide which boxes are kept."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.randint(0, 90, (n, 2), generator=g)
    wh = torch.randint(0, 30, (n, 2), generator=g)
    boxes = torch.cat([xy, xy + wh], 1)
    if n >= 4:
        boxes[1] = boxes[0]
        boxes[2, 2:] = boxes[2, :2] - 3  # inverted
    return boxes.to(dtype), torch.randint(0, 6, (n,), generator=g).to(dtype)


@pytest.mark.needs_native
@pytest.mark.parametrize("dtype", INT_TYPES, ids=str)
def test_qnms_equals_torchvision(dtype):
    for seed, n in enumerate([1, 2, 9, 60, 300]):
        boxes, scores = qnms_case(n, seed, dtype)
        for thr in (0.0, 0.3, 0.5, 0.7, 1.0):
            assert torch.equal(QNMS(boxes, scores, thr), torchvision_op(QNMS, boxes, scores, thr)), (n, seed, thr)


@pytest.mark.parametrize("dtype", INT_TYPES, ids=str)
def test_qnms_equals_reference(dtype):
    for seed in range(6):
        boxes, scores = qnms_case(40, seed, dtype)
        for thr in (0.0, 0.5, 0.7):
            # Integers up to 2^24 are exact in float: the float nms of the same values.
            assert torch.equal(QNMS(boxes, scores, thr), ref_nms(boxes.float(), scores.float(), thr)), (seed, thr)


def test_qnms_empty_and_bad_inputs():
    empty = QNMS(torch.empty(0, 4, dtype=torch.uint8), torch.empty(0, dtype=torch.uint8), 0.5)
    assert empty.shape == (0,) and empty.dtype == torch.int64
    boxes, scores = qnms_case(5, 0, torch.uint8)
    with pytest.raises(RuntimeError, match=r"dets must have shape \[N, 4\]"):
        QNMS(boxes[:, :3], scores, 0.5)
    with pytest.raises(RuntimeError, match="same length"):
        QNMS(boxes, scores[:4], 0.5)
    with pytest.raises(RuntimeError, match="same dtype"):
        QNMS(boxes, scores.to(torch.int32), 0.5)
    with pytest.raises(RuntimeError, match="integer representations"):
        QNMS(boxes.float(), scores.float(), 0.5)


def test_torchvision_nms_of_quantized_tensors():
    boxes, scores = qnms_case(50, 3, torch.float32)
    qboxes = torch.quantize_per_tensor(boxes, 0.5, 3, torch.quint8)
    qscores = torch.quantize_per_tensor(scores / 8, 1 / 64, 0, torch.quint8)
    keep = torchvision.ops.nms(qboxes, qscores, 0.5)
    assert torch.equal(keep, QNMS(qboxes.int_repr(), qscores.int_repr(), 0.5))
    assert torch.equal(keep, ref_nms(qboxes.int_repr().float(), qscores.int_repr().float(), 0.5))


def qroi_case(seed: int, dtype: torch.dtype, n_rois: int = 12):
    """An integer map (batch 1) and RoIs quantized with their own scale and zero point, some
    partly outside the map; the batch index column holds the zero point (torchvision ignores it)."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = (0, 256) if dtype == torch.uint8 else (-128, 128)
    x = torch.randint(lo, hi, (1, 3, 11, 13), generator=g).to(dtype)
    xy = torch.rand(n_rois, 2, generator=g) * 14 - 2
    wh = torch.rand(n_rois, 2, generator=g) * 9
    boxes = torch.cat([torch.zeros(n_rois, 1), xy, xy + wh], 1)
    rois_scale, rois_zero_point = 0.125, 20
    rois = ((boxes / rois_scale).round() + rois_zero_point).clamp(lo, hi - 1).to(dtype)
    input_zero_point = 10 if dtype == torch.uint8 else -5
    return x, rois, 0.04, input_zero_point, rois_scale, rois_zero_point


def requantize(value: torch.Tensor, scale: float, zero_point: int, dtype: torch.dtype) -> torch.Tensor:
    info = torch.iinfo(dtype)
    return (torch.round(value / scale) + zero_point).clamp(info.min, info.max).to(dtype)


QROI_CONFIGS = [(1.0, 2, 2, 2, True), (0.75, 3, 2, -1, False), (1.0, 1, 1, 0, True)]


@pytest.mark.needs_native
@pytest.mark.parametrize("dtype", INT_TYPES, ids=str)
def test_qroi_align_equals_torchvision(dtype):
    """The same integers, or one quantization step away where a mean lies on a rounding
    midpoint: torchvision sums the raw integers and subtracts the zero point times the weights
    after, ours sums the centred values (NOTE [ qroi_align ]), so the last float bit of a mean
    can differ and round the other way."""
    differ = total = 0
    for seed in range(4):
        x, rois, *quant = qroi_case(seed, dtype)
        for spatial_scale, ph, pw, sr, aligned in QROI_CONFIGS:
            args = (x, rois, *quant, spatial_scale, ph, pw, sr, aligned)
            ours, theirs = QROI_ALIGN(*args), torchvision_op(QROI_ALIGN, *args)
            assert ours.dtype == theirs.dtype == dtype and ours.shape == theirs.shape
            step = (ours.long() - theirs.long()).abs()
            assert step.max() <= 1
            differ += int((step > 0).sum())
            total += step.numel()
    assert differ <= max(total // 100, 1), (differ, total)


@pytest.mark.parametrize("dtype", INT_TYPES, ids=str)
def test_qroi_align_equals_reference(dtype):
    x, rois, scale, zero_point, rois_scale, rois_zero_point = qroi_case(1, dtype, n_rois=6)
    boxes = (rois.double() - rois_zero_point) * rois_scale
    boxes[:, 0] = 0
    for spatial_scale, ph, pw, sr, aligned in QROI_CONFIGS:
        out = QROI_ALIGN(x, rois, scale, zero_point, rois_scale, rois_zero_point, spatial_scale, ph, pw, sr, aligned)
        mean = ref_roi_align((x.double() - zero_point) * scale, boxes, spatial_scale, ph, pw, sr, aligned)
        assert (out.long() - requantize(mean, scale, zero_point, dtype).long()).abs().max() <= 1


def test_qroi_align_empty_and_bad_inputs():
    x, rois, *quant = qroi_case(0, torch.uint8)
    empty = QROI_ALIGN(x, rois[:0], *quant, 1.0, 2, 2, 2, True)
    assert empty.shape == (0, 3, 2, 2) and empty.dtype == torch.uint8
    with pytest.raises(RuntimeError, match="batch size 1"):
        QROI_ALIGN(x.repeat(2, 1, 1, 1), rois, *quant, 1.0, 2, 2, 2, True)
    with pytest.raises(RuntimeError, match="same dtype"):
        QROI_ALIGN(x, rois.to(torch.int32), *quant, 1.0, 2, 2, 2, True)
    with pytest.raises(RuntimeError, match=r"rois must have shape \[K, 5\]"):
        QROI_ALIGN(x, rois[:, :4], *quant, 1.0, 2, 2, 2, True)
    with pytest.raises(RuntimeError, match="integer representations"):
        QROI_ALIGN(x.float(), rois.float(), *quant, 1.0, 2, 2, 2, True)


def test_torchvision_roi_align_of_quantized_tensors():
    """torchvision.ops.roi_align on a quantized map returns a quantized tensor with the
    input's scale and zero point, computed by qroi_align."""
    g = torch.Generator().manual_seed(0)
    x = torch.quantize_per_tensor(torch.rand(1, 4, 9, 9, generator=g), 1 / 128, 7, torch.quint8)
    rois = torch.quantize_per_tensor(
        torch.tensor([[0.0, 1.0, 1.0, 6.0, 7.0], [0.0, 0.5, 2.0, 8.0, 4.0]]), 0.25, 0, torch.quint8
    )
    out = torchvision.ops.roi_align(x, rois, (3, 2), spatial_scale=1.0, sampling_ratio=2, aligned=True)
    assert out.is_quantized and out.q_scale() == x.q_scale() and out.q_zero_point() == x.q_zero_point()
    expected = QROI_ALIGN(x.int_repr(), rois.int_repr(), 1 / 128, 7, 0.25, 0, 1.0, 3, 2, 2, True)
    assert torch.equal(out.int_repr(), expected)
    # and, dequantized, the float roi_align of the dequantized map within one step
    float_out = torchvision.ops.roi_align(x.dequantize(), rois.dequantize(), (3, 2), 1.0, 2, True)
    assert (out.dequantize() - float_out).abs().max() <= x.q_scale() * 1.01


def test_fake_kernels():
    """torchvision's own fake kernels serve the quantized ops (both configurations)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, rois, *quant = qroi_case(0, torch.uint8)
    with FakeTensorMode() as mode:
        out = QROI_ALIGN(mode.from_tensor(x), mode.from_tensor(rois), *quant, 1.0, 3, 2, 2, True)
    assert out.shape == (rois.shape[0], 3, 3, 2) and out.dtype == torch.uint8


def sample_inputs() -> dict[str, list[Sample]]:
    """qnms's and qroi_align's calls, for the checks that run every op of the op table alike
    (op_tester.Sample)."""
    return {
        "qnms": [
            Sample(f"qnms-{str(dtype).removeprefix('torch.')}", QNMS, (*qnms_case(300, seed, dtype), 0.5))
            for seed, dtype in enumerate((torch.uint8, torch.int32))
        ],
        "qroi_align": [
            Sample(
                f"qroi_align-{str(dtype).removeprefix('torch.')}", QROI_ALIGN, (*qroi_case(seed, dtype, 40), *config)
            )
            for seed, (dtype, config) in enumerate(zip((torch.uint8, torch.int8), QROI_CONFIGS, strict=False))
        ],
    }
