"""nms: the kept indices equal torchvision's native kernel and a pure-Python reference, exactly."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from op_tester import Sample
from reference import nms as ref_nms
from reference import nms_rows
from torchvision.ops import batched_nms, nms

import torchvision_cpu_ext
from torchvision_cpu_ext import _debug

OP = torch.ops.torchvision.nms


def torchvision_nms(boxes, scores, thr):
    with torchvision_cpu_ext.disabled():
        return OP(boxes, scores, thr)


def random_case(n: int, seed: int, crowded: bool, ties: bool, special: bool, dtype=torch.float32):
    """Random boxes (or many jittered around a few centres), optionally with tied scores and
    NaN/inf/zero-area/inverted boxes mixed in."""
    g = torch.Generator().manual_seed(seed)
    if crowded:
        centres = torch.rand(max(n // 50, 1), 2, generator=g) * 500
        ctr = centres[torch.randint(0, centres.shape[0], (n,), generator=g)] + torch.randn(n, 2, generator=g) * 6
        wh = 40 + torch.randn(n, 2, generator=g) * 4
    else:
        ctr = torch.rand(n, 2, generator=g) * 500
        wh = torch.rand(n, 2, generator=g) * 120 + 0.5
    boxes = torch.cat([ctr - wh / 2, ctr + wh / 2], 1).to(dtype)
    scores = torch.rand(n, generator=g).to(dtype)
    if ties:
        scores = (scores * 8).round() / 8
    if special and n >= 8:
        boxes[0] = boxes[1]  # identical boxes
        boxes[2, 2:] = boxes[2, :2]  # zero area
        boxes[3] = boxes[3].flip(0)  # inverted
        boxes[4, 0] = float("nan")
        boxes[5, 2] = float("inf")
        scores[6] = float("nan")
        scores[7] = float("-inf")
    return boxes, scores


THRESHOLDS = [0.0, 0.3, 0.5, 0.7, 1.0]


@pytest.mark.needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("crowded", [False, True], ids=["random", "crowded"])
def test_equals_torchvision(crowded, dtype, threads):
    for seed, n in enumerate([1, 2, 17, 255, 256, 257, 700, 3000]):
        for thr in THRESHOLDS:
            boxes, scores = random_case(n, seed, crowded, ties=seed % 2 == 0, special=seed % 3 == 0, dtype=dtype)
            assert torch.equal(OP(boxes, scores, thr), torchvision_nms(boxes, scores, thr)), (n, thr, seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_equals_reference(dtype, threads):
    for seed in range(12):
        boxes, scores = random_case(
            40 + seed, seed, crowded=seed % 2 == 1, ties=seed % 3 == 0, special=True, dtype=dtype
        )
        for thr in THRESHOLDS:
            assert torch.equal(OP(boxes, scores, thr), ref_nms(boxes, scores, thr)), (seed, thr)


def test_row_reference_equals_pair_reference():
    """nms_rows (used for the large cases below) is checked against the pair-at-a-time one."""
    for seed in range(6):
        boxes, scores = random_case(60, seed, crowded=seed % 2 == 1, ties=True, special=True)
        for thr in (-0.1, *THRESHOLDS):
            assert torch.equal(nms_rows(boxes, scores, thr), ref_nms(boxes, scores, thr)), (seed, thr)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("crowded", [False, True], ids=["random", "crowded"])
def test_large_inputs_equal_reference(crowded, dtype, threads):
    """Hundreds of boxes with the large-input paths forced (nms_radix_min=0: the radix sort,
    nms_parallel_work=1: every block's suppression split across the threads): many blocks, the
    spatial pruning (finite boxes, threshold >= 0) with its compaction, and the unpruned path
    (NaN/inf boxes, or a negative threshold). Crowded boxes need more of them for several
    blocks (a block grows up to 512 boxes while few are kept)."""
    sizes = [(1100, False), (1207, True)] if crowded else [(300, False), (307, True)]
    for seed, (n, special) in enumerate(sizes):
        boxes, scores = random_case(n, 100 + seed, crowded, ties=seed == 1, special=special, dtype=dtype)
        for thr in (-0.1, 0.0, 0.5, 0.7):
            with _debug.thresholds(nms_radix_min=0, nms_parallel_work=1):
                forced = OP(boxes, scores, thr)
            assert torch.equal(forced, nms_rows(boxes, scores, thr)), (n, thr)
            assert torch.equal(forced, OP(boxes, scores, thr)), (n, thr)  # default paths


@pytest.mark.slow
def test_large_inputs_at_default_thresholds():
    """Thousands of boxes at the kernel's own thresholds: the sizes at which the radix sort and
    the multi-threaded suppression (2 threads) are chosen without any override, once."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for crowded in (False, True):
            for seed, (n, special) in enumerate([(5000, False), (6007, True)]):
                boxes, scores = random_case(n, 100 + seed, crowded, ties=seed == 1, special=special)
                for thr in (-0.1, 0.0, 0.5, 0.7):
                    assert torch.equal(OP(boxes, scores, thr), nms_rows(boxes, scores, thr)), (n, thr)
    finally:
        torch.set_num_threads(before)


def test_huge_finite_coordinates():
    """The spatial grid's extent overflows in float64 (1.5e308 - -1e308): cells are clamped."""
    boxes, scores = random_case(300, 13, crowded=False, ties=False, special=False, dtype=torch.float64)
    far = [[-1e308, -1e308, -1e307, -1e307], [1.5e308, 1.5e308, 1.7e308, 1.7e308]]
    boxes[:5] = torch.tensor(far * 2 + [[0, 0, 1, 1]])
    for thr in (0.0, 0.5):
        assert torch.equal(OP(boxes, scores, thr), nms_rows(boxes, scores, thr))
        assert torch.equal(OP(boxes.float(), scores.float(), thr), nms_rows(boxes.float(), scores.float(), thr))


def test_signed_zero_and_nan_scores_order_like_torchvision(native):
    """-0.0 and +0.0 scores tie (index order), NaN scores come first: the radix sort's keys."""
    boxes, _ = random_case(3000, 11, crowded=True, ties=False, special=False)
    g = torch.Generator().manual_seed(12)
    scores = torch.tensor([0.0, -0.0, 0.5, float("nan"), -0.5, float("inf"), float("-inf")])[
        torch.randint(0, 7, (3000,), generator=g)
    ]
    for thr in (0.3, 0.7):
        assert torch.equal(OP(boxes, scores, thr), nms_rows(boxes, scores, thr))
        if native:
            assert torch.equal(OP(boxes, scores, thr), torchvision_nms(boxes, scores, thr))


def test_iou_exactly_at_threshold_is_kept():
    # IoU of these two is exactly 1/2 (inter 1, union 2): suppression needs IoU > threshold.
    boxes = torch.tensor([[0.0, 0.0, 2.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
    scores = torch.tensor([0.9, 0.8])
    assert OP(boxes, scores, 0.5).tolist() == [0, 1]
    assert OP(boxes, scores, 0.4999999).tolist() == [0]
    # Identical boxes have IoU 1: kept at threshold 1.0, suppressed below it.
    same = torch.tensor([[1.0, 1.0, 3.0, 3.0]] * 2)
    assert OP(same, scores, 1.0).tolist() == [0, 1]
    assert OP(same, scores, 0.99).tolist() == [0]


def test_threshold_between_floats():
    """A double threshold that no float equals: the comparison must act as in double."""
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 7.0]])  # IoU 0.7 in float
    scores = torch.tensor([0.9, 0.8])
    iou = torch.tensor(70.0) / torch.tensor(100.0)
    for thr in (0.7, float(iou), float(iou) - 1e-12, float(iou) + 1e-12, 0.69999999, 0.70000001):
        assert torch.equal(OP(boxes, scores, thr), ref_nms(boxes, scores, thr)), thr


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_reduced_precision_boxes_run_in_float32(dtype):
    boxes, scores = random_case(300, 5, crowded=True, ties=True, special=False)
    boxes, scores = boxes.to(dtype), scores.to(dtype)
    assert torch.equal(OP(boxes, scores, 0.5), OP(boxes.float(), scores.float(), 0.5))


def test_empty_and_single():
    assert OP(torch.zeros(0, 4), torch.zeros(0), 0.5).tolist() == []
    assert OP(torch.tensor([[0.0, 0, 1, 1]]), torch.tensor([0.3]), 0.5).tolist() == [0]


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(RuntimeError, match=r"boxes must have shape \[N, 4\]"):
        OP(torch.zeros(3, 3), torch.zeros(3), 0.5)
    with pytest.raises(RuntimeError, match=r"scores must have shape \[N\]"):
        OP(torch.zeros(3, 4), torch.zeros(3, 1), 0.5)
    with pytest.raises(RuntimeError, match="must have the same length"):
        OP(torch.zeros(3, 4), torch.zeros(2), 0.5)
    with pytest.raises(RuntimeError, match="must have the same dtype"):
        OP(torch.zeros(3, 4), torch.zeros(3, dtype=torch.float64), 0.5)
    with pytest.raises(RuntimeError, match="boxes must be float32, float64, bfloat16 or float16"):
        OP(torch.zeros(3, 4, dtype=torch.int32), torch.zeros(3, dtype=torch.int32), 0.5)


def test_autocast_keeps_boxes_in_fp32():
    boxes, scores = random_case(200, 3, crowded=True, ties=False, special=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kept = nms(boxes.bfloat16(), scores.bfloat16(), 0.5)
    assert torch.equal(kept, OP(boxes.bfloat16().float(), scores.bfloat16().float(), 0.5))


@pytest.mark.variant_independent
def test_opcheck():
    boxes, scores = random_case(50, 1, crowded=True, ties=True, special=False)
    torch.library.opcheck(OP, (boxes, scores, 0.5), test_utils=("test_schema", "test_faketensor"))


def test_batched_nms_runs_on_our_kernel():
    boxes, scores = random_case(400, 2, crowded=True, ties=False, special=False)
    idxs = torch.randint(0, 5, (400,))
    kept = batched_nms(boxes, scores, idxs, 0.5)
    expected = torch.cat(
        [torch.nonzero(idxs == c).flatten()[ref_nms(boxes[idxs == c], scores[idxs == c], 0.5)] for c in range(5)]
    )
    assert torch.equal(kept.sort().values, expected.sort().values)


small_boxes = st.lists(
    st.tuples(*[st.sampled_from([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, float("nan")])] * 4),
    min_size=0,
    max_size=24,
)


@settings(max_examples=1500, deadline=None)
@given(
    boxes=small_boxes,
    scores=st.lists(st.sampled_from([0.1, 0.2, 0.5, 0.9, 1.0]), min_size=24, max_size=24),
    thr=st.sampled_from([0.0, 1 / 3, 0.5, 2 / 3, 0.7, 1.0]),
)
def test_property_matches_reference(boxes, scores, thr, native):
    """Small coordinates from a lattice: many exact ties of IoU with the threshold and of scores."""
    b = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    s = torch.tensor(scores[: len(boxes)], dtype=torch.float32)
    ours = OP(b, s, thr)
    assert torch.equal(ours, ref_nms(b, s, thr))
    if native:  # a session fixture: hypothesis runs every example in one test call
        assert torch.equal(ours, torchvision_nms(b, s, thr))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("n", [1200, 5000])
def test_batched_nms_large_path_is_identical(n, ties, dtype, threads, native):
    """Above 4000 coordinates torchvision loops over classes in Python (_batched_nms_vanilla);
    ours replaces that loop and must return the very same tensor, including the order of the
    unstable score sort (distinct kept scores: our own sort; ties: the same tensor sort)."""
    import torchvision.ops.boxes as tv_boxes

    boxes, scores = random_case(n, 7, crowded=True, ties=False, special=False)
    if ties:
        scores = (scores * 64).round() / 64
    else:  # distinct
        scores = torch.randperm(n, generator=torch.Generator().manual_seed(4)).float() / n
    boxes, scores = boxes.to(dtype), scores.to(dtype)
    compare = native and dtype != torch.bfloat16  # torchvision's nms has no bfloat16
    idxs = torch.randint(0, 80, (n,), generator=torch.Generator().manual_seed(3))
    assert tv_boxes._batched_nms_vanilla.__module__ == "torchvision_cpu_ext.ops.nms"
    ours = batched_nms(boxes, scores, idxs, 0.5)
    expected = torch.zeros(n, dtype=torch.bool)
    for c in torch.unique(idxs):
        members = torch.where(idxs == c)[0]
        expected[members[ref_nms(boxes[members], scores[members], 0.5)]] = True
    kept = torch.where(expected)[0]
    expected_order = kept[scores[kept].sort(descending=True)[1]]
    assert torch.equal(ours, expected_order)
    if compare:
        with torchvision_cpu_ext.disabled():
            assert tv_boxes._batched_nms_vanilla.__module__ == "torchvision.ops.boxes"
            assert torch.equal(ours, batched_nms(boxes, scores, idxs, 0.5))


def test_batched_nms_opcheck_and_errors():
    boxes, scores = random_case(60, 2, crowded=True, ties=False, special=False)
    idxs = torch.randint(0, 4, (60,))
    torch.library.opcheck(
        torch.ops.torchvision_cpu_ext._batched_nms,
        (boxes, scores, idxs, 0.5),
        test_utils=("test_schema", "test_faketensor"),
    )
    with pytest.raises(RuntimeError, match="idxs must be an integer tensor of shape"):
        torch.ops.torchvision_cpu_ext._batched_nms(boxes, scores, idxs.float(), 0.5)
    with pytest.raises(RuntimeError, match=r"boxes must have shape \[N, 4\]"):
        torch.ops.torchvision_cpu_ext._batched_nms(boxes[:, :3], scores, idxs, 0.5)


def sample_inputs() -> dict[str, list[Sample]]:
    """nms's calls (crowded, tied and special boxes) and batched_nms on the per-class path (our
    _batched_nms), for the checks that run every op of the op table alike (op_tester.Sample)."""
    boxes, scores = random_case(700, 1, crowded=True, ties=True, special=True)
    large, large_scores = random_case(1200, 7, crowded=True, ties=False, special=False)
    idxs = torch.randint(0, 80, (1200,), generator=torch.Generator().manual_seed(3))
    return {
        "nms": [
            Sample("nms", OP, (boxes, scores, 0.5)),
            Sample("nms-float64", OP, (boxes.double(), scores.double(), 0.7)),
            Sample("batched_nms", batched_nms, (large, large_scores, idxs, 0.5)),
        ]
    }
