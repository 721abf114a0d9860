"""Every size-dependent path of the kernels, reached with small tensors through the debug
thresholds (torchvision_cpu_ext._debug, NOTE [ debug thresholds ] in csrc/cpu/debug_thresholds.h).

Paths that must agree bit for bit (streamed or cached stores, band heights, groups of ROIs,
pooled or fresh outputs, nms' sorts and threading) are compared with the default path exactly;
paths that may round differently (roi_align's transposed and direct NCHW loops) with the float64
reference of tests/reference.py.
"""

from __future__ import annotations

import pytest
import torch
from reference import nms as ref_nms
from reference import ps_roi_align as ref_ps_roi_align
from reference import ps_roi_pool as ref_ps_roi_pool
from reference import roi_align as ref_roi_align
from reference import roi_pool as ref_roi_pool
from roi_cases import LAYOUTS, POOLED, SCALE, TOL, expected_format, large_map_case, make_rois

import torchvision_cpu_ext
from torchvision_cpu_ext import _debug

ops = torch.ops.torchvision
DTYPES = [torch.float32, torch.float64, torch.bfloat16]

# A map several bands tall at the smallest band sizes, with boxes crossing band borders.
N_IMG, H_MAP, W_MAP = 2, 23, 17


def _case(channels: int, dtype: torch.dtype, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    x, rois = large_map_case(channels, K=12, n=N_IMG, h=H_MAP, w=W_MAP)
    rois = torch.cat([rois, make_rois(K=2)[-8:]])  # + degenerate, inverted and outside boxes
    rois[:, 0] = rois[:, 0].clamp(max=N_IMG - 1)
    return x.to(dtype).contiguous(memory_format=expected_format(layout)), rois.to(dtype)


def _grad(shape, dtype: torch.dtype, layout: str) -> torch.Tensor:
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(7)).to(dtype)
    return g.contiguous(memory_format=expected_format(layout))


# (op, input channels, forward, backward from (grad, rois, forward outputs, x)).
def _roi_align_fwd(x, rois):
    return (ops.roi_align(x, rois, SCALE, *POOLED, 2, True),)


def _roi_align_bwd(g, rois, outs, x):
    return ops._roi_align_backward(g, rois, SCALE, *POOLED, *x.shape, 2, True)


def _roi_pool_fwd(x, rois):
    return ops.roi_pool(x, rois, SCALE, *POOLED)


def _roi_pool_bwd(g, rois, outs, x):
    return ops._roi_pool_backward(g, rois, outs[1], SCALE, *POOLED, *x.shape)


def _ps_roi_align_fwd(x, rois):
    return ops.ps_roi_align(x, rois, SCALE, *POOLED, 2)


def _ps_roi_align_bwd(g, rois, outs, x):
    return ops._ps_roi_align_backward(g, rois, outs[1], SCALE, *POOLED, 2, *x.shape)


def _ps_roi_pool_fwd(x, rois):
    return ops.ps_roi_pool(x, rois, SCALE, *POOLED)


def _ps_roi_pool_bwd(g, rois, outs, x):
    return ops._ps_roi_pool_backward(g, rois, outs[1], SCALE, *POOLED, *x.shape)


P = POOLED[0] * POOLED[1]
OPS = {
    # 19 channels: two full vector blocks and a tail at every ISA; 3 ps output channels likewise.
    "roi_align": (19, _roi_align_fwd, _roi_align_bwd),
    "roi_pool": (19, _roi_pool_fwd, _roi_pool_bwd),
    "ps_roi_align": (3 * P, _ps_roi_align_fwd, _ps_roi_align_bwd),
    "ps_roi_pool": (3 * P, _ps_roi_pool_fwd, _ps_roi_pool_bwd),
}


def _run(name: str, dtype: torch.dtype, layout: str):
    """(forward outputs, grad_input) of op `name` on the small case."""
    channels, fwd, bwd = OPS[name]
    x, rois = _case(channels, dtype, layout)
    outs = fwd(x, rois)
    g = _grad(outs[0].shape, dtype, layout)
    return outs, bwd(g, rois, outs, x)


def _bitwise(a: torch.Tensor, b: torch.Tensor) -> None:
    """The same tensor bit for bit: dtype, shape, strides and every value's bits (NaN included)."""
    assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    assert torch.equal(a.contiguous().view(ints), b.contiguous().view(ints))


def test_names():
    assert set(_debug.names()) == {
        "stream_grad_bytes",
        "grad_band_bytes",
        "roi_pool_band_bytes",
        "roi_pool_stream_bytes",
        "ps_roi_pool_group_bytes",
        "nchw_transpose",
        "output_pool_min_bytes",
        "nms_radix_min",
        "nms_parallel_work",
        "deform_tile_pixels",
        "deform_brgemm",
        "deform_serial_work",
        "depthwise_serial_work",
        "depthwise_band_bytes",
        "depthwise_block_width",
    }
    with pytest.raises(ValueError, match="unknown debug thresholds"):
        with _debug.thresholds(no_such_threshold=1):
            pass


def test_restores_previous_values():
    with _debug.thresholds(grad_band_bytes=5):
        with _debug.thresholds(grad_band_bytes=7, stream_grad_bytes=0):
            assert _debug.set_threshold("grad_band_bytes", 7) == 7
        assert _debug.set_threshold("grad_band_bytes", 5) == 5
        assert _debug.set_threshold("stream_grad_bytes", None) is None
    assert _debug.set_threshold("grad_band_bytes", None) is None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", ["roi_pool", "ps_roi_align", "ps_roi_pool"])
def test_streamed_gradient_is_bit_equal(name, layout, dtype, threads):
    """Backwards writing grad_input with non-temporal stores (stream_grad_input) give the bits
    of the cached stores, NCHW planes and channels_last bands alike."""
    with _debug.thresholds(stream_grad_bytes=1 << 40):
        _, cached = _run(name, dtype, layout)
    with _debug.thresholds(stream_grad_bytes=0):
        _, streamed = _run(name, dtype, layout)
    _bitwise(cached, streamed)
    assert cached.is_contiguous(memory_format=expected_format(layout))


@pytest.mark.parametrize("band_bytes", [1, 700, 5000])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["roi_pool", "ps_roi_align", "ps_roi_pool"])
def test_gradient_bands_are_bit_equal(name, dtype, band_bytes, threads):
    """channels_last backwards by bands of rows (by_bands): one row per band, a few rows, and
    the whole map in one band give the same bits, streamed or not, and the NCHW gradient's."""
    _, whole = _run(name, dtype, "channels_last")
    _, nchw = _run(name, dtype, "nchw")
    for stream in (0, 1 << 40):
        with _debug.thresholds(grad_band_bytes=band_bytes, stream_grad_bytes=stream):
            _, banded = _run(name, dtype, "channels_last")
        _bitwise(whole, banded)
    torch.testing.assert_close(nchw, whole.contiguous(), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("transpose", [0, 1])
@pytest.mark.parametrize("name", ["roi_align", "roi_pool"])
def test_nchw_forward_paths(name, transpose, dtype, threads):
    """roi_align's and roi_pool's NCHW forwards, transposed blocks and direct loops
    (use_transposed_nchw), against the float64 reference; roi_pool's max is exact, so its
    paths agree bit for bit with channels_last."""
    channels, fwd, _ = OPS[name]
    x, rois = _case(channels, dtype, "nchw")
    with _debug.thresholds(nchw_transpose=transpose):
        outs = fwd(x, rois)
    if name == "roi_align":
        expected = ref_roi_align(x, rois, SCALE, *POOLED, 2, True)
        torch.testing.assert_close(outs[0].double(), expected, **TOL[dtype])
    else:
        expected, arg = ref_roi_pool(x, rois, SCALE, *POOLED)
        torch.testing.assert_close(outs[0].double(), expected, rtol=0, atol=0)
        assert torch.equal(outs[1], arg.to(torch.int32))
        cl = fwd(x.contiguous(memory_format=torch.channels_last), rois)
        for a, b in zip(outs, cl, strict=True):
            assert torch.equal(a, b.contiguous())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("band_bytes", "stream_bytes"), [(1, 0), (1, 1 << 40), (3000, 0), (1 << 30, 0)])
def test_roi_pool_channels_last_forward_bands(dtype, band_bytes, stream_bytes, threads):
    """roi_pool's channels_last forward in bands of rows (one row, a few, the whole map), its
    results streamed or not: the reference's values and argmax exactly."""
    channels, fwd, _ = OPS["roi_pool"]
    x, rois = _case(channels, dtype, "channels_last")
    with _debug.thresholds(roi_pool_band_bytes=band_bytes, roi_pool_stream_bytes=stream_bytes):
        out, argmax = fwd(x, rois)
    expected, arg = ref_roi_pool(x, rois, SCALE, *POOLED)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=0)
    assert torch.equal(argmax, arg.to(torch.int32))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group_bytes", [1, 2000])
def test_ps_roi_pool_channels_last_groups(dtype, group_bytes, threads):
    """ps_roi_pool's channels_last forward with each image's ROIs split into groups of one or a
    few ROIs: the bits of one group per image, and the reference's values."""
    (whole, mapping), _ = _run("ps_roi_pool", dtype, "channels_last")
    with _debug.thresholds(ps_roi_pool_group_bytes=group_bytes):
        (grouped, mapping2), _ = _run("ps_roi_pool", dtype, "channels_last")
    _bitwise(whole, grouped)
    assert torch.equal(mapping, mapping2)
    x, rois = _case(OPS["ps_roi_pool"][0], dtype, "nchw")
    torch.testing.assert_close(grouped.double(), ref_ps_roi_pool(x, rois, SCALE, *POOLED), **TOL[dtype])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", sorted(OPS))
def test_small_paths_match_reference(name, layout):
    """With every threshold at its small extreme at once, forwards still match the float64
    reference (a check that the forced paths compute the op, not only agree with each other)."""
    channels, fwd, _ = OPS[name]
    x, rois = _case(channels, torch.float32, layout)
    with _debug.thresholds(
        stream_grad_bytes=0,
        grad_band_bytes=1,
        roi_pool_band_bytes=1,
        roi_pool_stream_bytes=0,
        ps_roi_pool_group_bytes=1,
        nchw_transpose=1,
        output_pool_min_bytes=0,
    ):
        out = fwd(x, rois)[0]
    expected = {
        "roi_align": lambda: ref_roi_align(x, rois, SCALE, *POOLED, 2, True),
        "roi_pool": lambda: ref_roi_pool(x, rois, SCALE, *POOLED)[0],
        "ps_roi_align": lambda: ref_ps_roi_align(x, rois, SCALE, *POOLED, 2),
        "ps_roi_pool": lambda: ref_ps_roi_pool(x, rois, SCALE, *POOLED),
    }[name]()
    torch.testing.assert_close(out.double(), expected, **TOL[torch.float32])


def test_output_pool_serves_small_outputs():
    """With the pool's minimum lowered, a small output is taken from the pool, its block comes
    back when the output dies, and the next output of that size reuses it with the same values."""
    torchvision_cpu_ext.empty_cache()
    x, rois = _case(19, torch.float32, "nchw")
    fresh = _roi_align_fwd(x, rois)[0]
    with _debug.thresholds(output_pool_min_bytes=0):
        out = _roi_align_fwd(x, rois)[0]
        assert torch.equal(out, fresh)
        ptr = out.data_ptr()
        del out
        assert torch.ops.torchvision_cpu_ext._output_pool_stats()[0] >= fresh.nbytes
        again = _roi_align_fwd(x, rois)[0]
        assert again.data_ptr() == ptr
        assert torch.equal(again, fresh)
        del again
    torchvision_cpu_ext.empty_cache()
    assert torch.ops.torchvision_cpu_ext._output_pool_stats()[0] == 0


def _nms_boxes(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 100
    wh = torch.rand(n, 2, generator=g) * 30 + 1
    scores = torch.rand(n, generator=g)
    scores[::7] = scores[3]  # ties
    return torch.cat([xy, xy + wh], 1), scores


@pytest.mark.parametrize("n", [5, 60, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_nms_radix_sort_and_parallel_suppression(n, dtype, threads):
    """nms on a few boxes with the radix sort (nms_radix_min) and multi-threaded suppression
    (nms_parallel_work) forced: the reference's indices, as by default."""
    boxes, scores = _nms_boxes(n, seed=n)
    boxes, scores = boxes.to(dtype), scores.to(dtype)
    default = ops.nms(boxes, scores, 0.3)
    with _debug.thresholds(nms_radix_min=0, nms_parallel_work=1):
        forced = ops.nms(boxes, scores, 0.3)
    assert torch.equal(forced, default)
    assert torch.equal(forced, ref_nms(boxes, scores, 0.3))
