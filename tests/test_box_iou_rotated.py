"""box_iou_rotated: torchvision's values (native kernel), a float64 clipping reference,
degenerate boxes, and torchvision's Python entry points (box_iou with a rotated fmt, TorchScript)."""

from __future__ import annotations

import pytest
import torch
import torchvision
from op_tester import Sample
from reference import box_iou_rotated as ref_iou

import torchvision_cpu_ext
from torchvision_cpu_ext._info import cpu_kernel_owner

OP = torch.ops.torchvision.box_iou_rotated


def torchvision_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    with torchvision_cpu_ext.disabled():
        return OP(boxes1, boxes2)


def random_boxes(n: int, seed: int, dtype: torch.dtype = torch.float32, spread: float = 100.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ctr = torch.rand(n, 2, generator=g) * spread
    wh = torch.rand(n, 2, generator=g) * 40 + 0.5
    angle = torch.rand(n, 1, generator=g) * 720 - 360
    return torch.cat([ctr, wh, angle], 1).to(dtype)


def tricky_pair(n: int, seed: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Random boxes, and a second set holding copies, quarter turns, shared centres, shared
    edges (axis-aligned, integer coordinates), zero-area boxes and far-away boxes."""
    a = random_boxes(n, seed, dtype)
    b = random_boxes(n, seed + 1, dtype)
    q = n // 8
    b[:q] = a[:q]  # identical
    b[q : 2 * q] = a[q : 2 * q]
    b[q : 2 * q, 4] += 90  # a quarter turn about the same centre
    b[2 * q : 3 * q, :2] = a[2 * q : 3 * q, :2]  # same centre, other size and angle
    a[3 * q : 4 * q] = a[3 * q : 4 * q].round()
    b[3 * q : 4 * q] = a[3 * q : 4 * q]
    b[3 * q : 4 * q, 0] += a[3 * q : 4 * q, 2]  # side by side: a shared edge
    a[3 * q : 4 * q, 4] = 0
    b[3 * q : 4 * q, 4] = 180
    b[4 * q : 5 * q, 2] = 0  # zero width
    b[5 * q : 6 * q, :2] += 1e4  # far away
    return a, b


def test_kernel_is_ours():
    assert cpu_kernel_owner("box_iou_rotated") == "torchvision_cpu_ext"


@pytest.mark.needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_equals_torchvision(dtype, threads):
    for seed, n in enumerate([1, 7, 64, 200]):
        a, b = tricky_pair(n, seed, dtype)
        ours, theirs = OP(a, b), torchvision_iou(a, b)
        assert ours.dtype == theirs.dtype == torch.float32
        # The same algorithm step for step: measured bit-equal here; allow float rounding.
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
        torch.testing.assert_close(OP(b, a), torchvision_iou(b, a), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_equals_reference(dtype):
    a, b = tricky_pair(24, 7, dtype)
    # float32 boxes lose ~1e-5 px on corners ~50 px from the shifted origin; float64 keeps ~1e-12.
    atol = 2e-5 if dtype == torch.float32 else 1e-6
    torch.testing.assert_close(OP(a, b).double(), ref_iou(a, b), rtol=0, atol=atol)


def test_threads_do_not_change_results(threads):
    a, b = tricky_pair(300, 3, torch.float32)
    torch.set_num_threads(1)
    one = OP(a, b)
    torch.set_num_threads(threads)
    assert torch.equal(OP(a, b), one)


def test_degenerate_boxes():
    box = torch.tensor([[10.0, 20.0, 4.0, 6.0, 30.0]])
    assert OP(box, box).item() == pytest.approx(1.0, abs=1e-6)
    half = torch.tensor([[10.0, 20.0, 4.0, 3.0, 0.0]])
    full = torch.tensor([[10.0, 20.0, 4.0, 6.0, 0.0]])
    assert OP(full, half).item() == pytest.approx(0.5, abs=1e-6)  # contained: 12 / 24
    turned = torch.tensor([[0.0, 0.0, 2.0, 2.0, 45.0]])
    square = torch.tensor([[0.0, 0.0, 2.0, 2.0, 0.0]])
    # square and its 45-degree turn: the octagon 8 (sqrt 2 - 1), over 8 - octagon
    octagon = 8 * (2**0.5 - 1)
    assert OP(square, turned).item() == pytest.approx(octagon / (8 - octagon), abs=1e-6)
    zero = torch.tensor([[10.0, 20.0, 0.0, 6.0, 0.0], [10.0, 20.0, 4.0, 0.0, 15.0], [10.0, 20.0, 0.0, 0.0, 0.0]])
    assert torch.equal(OP(zero, box), torch.zeros(3, 1))
    assert torch.equal(OP(box, zero), torch.zeros(1, 3))
    assert torch.equal(OP(zero, zero), torch.zeros(3, 3))
    far = box.clone()
    far[0, 0] += 1000
    assert OP(box, far).item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_empty(dtype):
    box = torch.ones(3, 5, dtype=dtype)
    for a, b, shape in [(box[:0], box, (0, 3)), (box, box[:0], (3, 0)), (box[:0], box[:0], (0, 0))]:
        out = OP(a, b)
        assert out.shape == shape and out.dtype == torch.float32


def test_non_contiguous_input():
    a = random_boxes(20, 0)
    wide = torch.cat([a, a], 1)[:, ::2]  # strided rows and columns
    b = random_boxes(10, 1).t().contiguous().t()
    assert torch.equal(OP(wide, b), OP(wide.contiguous(), b.contiguous()))


def test_bad_inputs_raise():
    box = torch.ones(2, 5)
    with pytest.raises(RuntimeError, match=r"boxes1 must have shape \[N, 5\]"):
        OP(torch.ones(2, 4), box)
    with pytest.raises(RuntimeError, match=r"boxes2 must have shape \[N, 5\]"):
        OP(box, torch.ones(5))
    with pytest.raises(RuntimeError, match="same dtype"):
        OP(box, box.double())
    with pytest.raises(RuntimeError, match="boxes1 must be float32 or float64"):
        OP(box.half(), box.half())


@pytest.mark.parametrize("fmt", ["cxcywhr", "xywhr", "xyxyxyxy"])
def test_torchvision_box_iou_rotated_formats(fmt):
    """torchvision's Python entry point converts the format and calls the op (in the fallback
    configuration it raised AttributeError before the op existed)."""
    from torchvision.ops import box_convert

    a, b = random_boxes(6, 0), random_boxes(5, 1)
    out = torchvision.ops.box_iou(box_convert(a, "cxcywhr", fmt), box_convert(b, "cxcywhr", fmt), fmt=fmt)
    torch.testing.assert_close(out, OP(a, b), rtol=0, atol=1e-4)


def test_box_iou_torchscript():
    """torch.jit.script compiles every branch of box_iou, the rotated one's op included."""
    scripted = torch.jit.script(torchvision.ops.box_iou)
    a = torch.tensor([[0.0, 0.0, 4.0, 4.0], [1.0, 1.0, 5.0, 5.0]])
    assert torch.equal(scripted(a, a), torchvision.ops.box_iou(a, a))
    r = random_boxes(4, 2)
    assert torch.equal(scripted(r, r, "cxcywhr"), OP(r, r))


def sample_inputs() -> dict[str, list[Sample]]:
    """box_iou_rotated's calls, for the checks that run every op of the op table alike
    (op_tester.Sample)."""
    return {
        "box_iou_rotated": [
            Sample(f"box_iou_rotated-{str(dtype).removeprefix('torch.')}", OP, tricky_pair(160, seed, dtype))
            for seed, dtype in enumerate((torch.float32, torch.float64))
        ]
    }
