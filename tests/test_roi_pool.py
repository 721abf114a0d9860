"""roi_pool: our kernels against a float64 reference and torchvision's native kernel."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import NATIVE
from reference import roi_pool as ref_roi_pool
from roi_cases import (
    DTYPES,
    LAYOUTS,
    POOLED,
    SCALE,
    C,
    H,
    N,
    W,
    expected_format,
    large_map_case,
    make_input,
    make_rois,
)
from torchvision.ops import roi_pool

import torchvision_cpu_ext

OP = torch.ops.torchvision.roi_pool
BWD = torch.ops.torchvision._roi_pool_backward


@functools.cache
def _reference(dtype: torch.dtype):
    return ref_roi_pool(make_input(dtype, "nchw", True), make_rois(dtype=dtype), SCALE, *POOLED)


@pytest.mark.parametrize("contiguous", [True, False], ids=["contig", "strided"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_matches_reference_exactly(dtype, layout, contiguous, threads):
    """Max pooling is exact: values and argmax equal the reference bit for bit."""
    x = make_input(dtype, layout, contiguous)
    out, argmax = OP(x, make_rois(dtype=dtype), SCALE, *POOLED)
    assert out.dtype == dtype and argmax.dtype == torch.int32
    assert out.is_contiguous(memory_format=expected_format(layout))
    assert argmax.is_contiguous(memory_format=expected_format(layout))
    exp_out, exp_arg = _reference(dtype)
    # bf16 cannot hold -FLT_MAX (a bin of values <= -FLT_MAX): it rounds to -inf.
    assert torch.equal(out.double(), exp_out.to(dtype).double())
    assert torch.equal(argmax, exp_arg)


# Box extents (in feature pixels) whose bin multiples sit on floor/ceil rounding edges.
EDGE_EXTENTS = [57, 114, 121, 228, 7, 14, 1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("extent", EDGE_EXTENTS)
def test_rounding_edge_cases(extent, dtype):
    x = torch.randn(1, 2, 240, 240, dtype=dtype)
    rois = torch.tensor(
        [[0, 0, 0, extent - 1, extent - 1], [0, 3.5, 2.5, extent + 2.5, extent / 2 + 1.5], [0, 0.5, 1.5, 0.5, 1.5]],
        dtype=dtype,
    )
    for scale in (1.0, 0.5, 0.25, 1 / 16):
        for pooled in ((7, 7), (14, 14), (3, 5)):
            r = rois.clone()
            r[:, 1:] = r[:, 1:] / scale
            out, argmax = OP(x, r, scale, *pooled)
            exp_out, exp_arg = ref_roi_pool(x, r, scale, *pooled)
            assert torch.equal(out.double(), exp_out) and torch.equal(argmax, exp_arg)
            if NATIVE:
                torchvision_cpu_ext.disable()
                try:
                    tv_out, tv_arg = OP(x, r, scale, *pooled)
                finally:
                    torchvision_cpu_ext.enable()
                assert torch.equal(out, tv_out) and torch.equal(argmax, tv_arg)


@pytest.mark.skipif(not NATIVE, reason="torchvision's compiled kernels are not loaded")
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_forward_backward_equal_torchvision(dtype, layout, threads):
    x = make_input(dtype, layout, True).requires_grad_()
    rois = make_rois(dtype=dtype)
    g = torch.randn(rois.shape[0], C, *POOLED, dtype=dtype)

    def run():
        x.grad = None
        out = roi_pool(x, rois, POOLED, SCALE)
        out.backward(g)
        return out.detach(), x.grad.clone()

    out, grad = run()
    torchvision_cpu_ext.disable()
    try:
        tv_out, tv_grad = run()
        tv_arg = OP(x.detach(), rois, SCALE, *POOLED)[1]
    finally:
        torchvision_cpu_ext.enable()
    assert torch.equal(out, tv_out)
    assert torch.equal(OP(x.detach(), rois, SCALE, *POOLED)[1], tv_arg)
    torch.testing.assert_close(grad, tv_grad, rtol=1e-6, atol=1e-6)
    assert grad.is_contiguous(memory_format=expected_format(layout))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradcheck(layout):
    # Distinct values: max pooling is differentiable away from ties.
    x = torch.randperm(3 * 8 * 9, dtype=torch.float64).reshape(1, 3, 8, 9) / 10
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    rois = torch.tensor([[0, 0, 0, 8, 7], [0, 2, 1, 5, 6], [0, -3, -2, 4, 15]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: roi_pool(t, rois, (3, 2), 1.0), (x,))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_reduced_precision_backward(dtype, layout, threads):
    x = make_input(dtype, layout, True).requires_grad_()
    rois = make_rois(dtype=dtype)
    g = torch.randn(rois.shape[0], C, *POOLED).to(dtype)
    roi_pool(x, rois, POOLED, SCALE).backward(g)
    x64 = x.detach().double().requires_grad_()
    roi_pool(x64, rois.double(), POOLED, SCALE).backward(g.double())
    assert x.grad.dtype == dtype and x.grad.is_contiguous(memory_format=expected_format(layout))
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-2, atol=1e-2)


# NCHW takes the blocked (transposed) path when the bins read more than half the map, the
# direct per-plane path otherwise (roi_pool_kernel.cpp): these cases land on each side.
@pytest.mark.parametrize("case", ["blocked", "direct"])
def test_nchw_paths(case, threads):
    k = 12 if case == "blocked" else 1
    x = torch.randn(2, 3, 30, 40)
    rois = torch.tensor([[i % 2, 2.0 + i, 1.0 + 2 * i, 22.0 + 3 * i, 25.0 + i] for i in range(k)])
    out, argmax = OP(x, rois, 1.0, 3, 4)
    exp_out, exp_arg = ref_roi_pool(x, rois, 1.0, 3, 4)
    assert torch.equal(out.double(), exp_out) and torch.equal(argmax, exp_arg)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_large_gradient_written_by_streaming_stores(dtype, threads):
    """grad_input of 32 MiB per thread and more (64 MiB here, so at 1 and 2 threads) is written
    with non-temporal stores (roi_schedule.h, stream_grad_input); planes of an odd size start
    unaligned. The NCHW gradient must equal the channels_last one, which takes the other path
    (each element gets the same adds, in order)."""
    h, w = (200, 331) if dtype == torch.float32 else (400, 331)  # ~68 MB of grad_input either way
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 256, h, w, generator=g).to(dtype)
    img = torch.tensor([w / SCALE, h / SCALE])
    xy = torch.rand(40, 2, generator=g) * img - 4
    rois = torch.cat([torch.zeros(40, 1), xy, xy + torch.rand(40, 2, generator=g) * img / 2], 1).to(dtype)
    _, argmax = OP(x, rois, SCALE, *POOLED)
    grad = torch.randn(argmax.shape, generator=g).to(dtype)
    nchw = BWD(grad, rois, argmax, SCALE, *POOLED, *x.shape)
    assert nchw.nbytes >= 64 << 20
    cl_args = (
        grad.contiguous(memory_format=torch.channels_last),
        rois,
        argmax.contiguous(memory_format=torch.channels_last),
    )
    cl = BWD(*cl_args, SCALE, *POOLED, *x.shape)
    assert torch.equal(nchw, cl)
    assert nchw.count_nonzero() > 0


@pytest.mark.parametrize(("boxes", "images"), [(60, 2), (900, 1)], ids=["cached", "streamed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_channels_last_bands(dtype, boxes, images, threads):
    """channels_last forward sweeps each (image, block of 4 vectors of channels) in bands of
    rows (~256 KiB of the block's lines: 4 rows of fp32 here) and carries the state of bins
    spanning bands in scratch slots; 70 channels give full blocks and a partial one, one image
    splits its boxes into chunks across threads, and results of 16 MiB and more are written
    with non-temporal stores (rows of 70 channels start unaligned). Equal to the NCHW path, an
    independent loop, and to torchvision's kernel where it has the dtype."""
    x, rois = large_map_case(70, K=boxes, seed=7, n=images)
    x, rois = x.to(dtype), rois.to(dtype)
    out, argmax = OP(x.contiguous(memory_format=torch.channels_last), rois, SCALE, 7, 7)
    assert out.is_contiguous(memory_format=torch.channels_last)
    if boxes == 900:
        assert out.nbytes + argmax.nbytes >= 16 << 20
    exp_out, exp_arg = OP(x, rois, SCALE, 7, 7)
    assert torch.equal(out, exp_out) and torch.equal(argmax, exp_arg)
    assert (argmax >= 0).float().mean() > 0.5  # most bins hold pixels
    # The backward takes the same map in bands of rows (3/4 of L2 of opmath elements: 21 rows of
    # fp32 with a 2 MiB L2), visiting the bins that meet each band: equal to the NCHW path.
    grad = torch.randn(argmax.shape, generator=torch.Generator().manual_seed(8)).to(dtype)
    cl_grad = BWD(
        grad.contiguous(memory_format=torch.channels_last),
        rois,
        argmax.contiguous(memory_format=torch.channels_last),
        SCALE,
        7,
        7,
        *x.shape,
    )
    assert cl_grad.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(cl_grad, BWD(grad, rois, argmax, SCALE, 7, 7, *x.shape))
    if NATIVE and dtype in (torch.float32, torch.float64):
        torchvision_cpu_ext.disable()
        try:
            tv_out, tv_arg = OP(x, rois, SCALE, 7, 7)
        finally:
            torchvision_cpu_ext.enable()
        assert torch.equal(out, tv_out) and torch.equal(argmax, tv_arg)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_backward_argmax_outside_its_bin(dtype):
    """torchvision's backward adds each gradient at its argmax, wherever that is. The banded
    channels_last backward visits only the bins meeting a band, so it checks that every argmax
    lies in its bin's rows and otherwise takes the general path: an argmax moved elsewhere on
    the map (or to -1) gives the same gradient as the NCHW path."""
    x, rois = large_map_case(70, K=30, seed=9)
    x, rois = x.to(dtype), rois.to(dtype)
    _, argmax = OP(x, rois, SCALE, 7, 7)
    moved = argmax.clone()
    moved[3, 5, 2, 2] = 0  # row 0: outside that box's bins
    moved[4, 6, 1, 1] = x.shape[2] * x.shape[3] - 1  # the last pixel
    moved[5, 7, 0, 0] = -1
    grad = torch.randn(argmax.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    for a in (argmax, moved):
        cl = BWD(
            grad.contiguous(memory_format=torch.channels_last),
            rois,
            a.contiguous(memory_format=torch.channels_last),
            SCALE,
            7,
            7,
            *x.shape,
        )
        assert torch.equal(cl, BWD(grad, rois, a, SCALE, 7, 7, *x.shape))
    assert cl[rois[3, 0].long(), 5, 0, 0] != 0


def test_special_values():
    x = torch.full((1, 2, 4, 4), -float("inf"))
    x[0, 1, 1, 1] = float("nan")
    x[0, 1, 2, 2] = 5.0
    x[0, 1, 3, 3] = 5.0  # a tie: the first maximum in scan order wins
    for layout in LAYOUTS:
        xx = x.contiguous(memory_format=expected_format(layout))
        out, argmax = OP(xx, torch.tensor([[0, 0.0, 0.0, 3.0, 3.0], [0, 10.0, 10.0, 12.0, 12.0]]), 1.0, 1, 1)
        assert out[0, 0].item() == -torch.finfo(torch.float32).max and argmax[0, 0].item() == -1
        assert out[0, 1].item() == 5.0 and argmax[0, 1].item() == 2 * 4 + 2
        assert out[1].eq(0).all() and argmax[1].eq(-1).all()  # empty bin (outside the map)


def test_empty_and_bad_inputs():
    x = make_input(torch.float32, "nchw", True)
    out, argmax = OP(x, torch.zeros(0, 5), SCALE, *POOLED)
    assert out.shape == argmax.shape == (0, C, *POOLED)
    rois = make_rois()
    with pytest.raises(RuntimeError, match="input must be a 4-D tensor"):
        OP(x[0], rois, SCALE, 2, 2)
    with pytest.raises(RuntimeError, match=r"rois must have shape \[K, 5\]"):
        OP(x, rois[:, 1:], SCALE, 2, 2)
    with pytest.raises(RuntimeError, match="rois must have the dtype of input"):
        OP(x, rois.double(), SCALE, 2, 2)
    with pytest.raises(RuntimeError, match="must be non-negative"):
        OP(x, rois, SCALE, 2, -2)
    g = torch.zeros(rois.shape[0], C, 2, 2)
    a = torch.zeros(rois.shape[0], C, 2, 2, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="argmax must be the int32 CPU tensor"):
        BWD(g, rois, a.long(), SCALE, 2, 2, N, C, H, W)
    with pytest.raises(RuntimeError, match="grad must have shape"):
        BWD(g[:, :, :1], rois, a, SCALE, 2, 2, N, C, H, W)
    a[0, 0, 0, 0] = H * W
    for fmt in (torch.contiguous_format, torch.channels_last):
        with pytest.raises(RuntimeError, match="outside the"):
            BWD(g.contiguous(memory_format=fmt), rois, a.contiguous(memory_format=fmt), SCALE, 2, 2, N, C, H, W)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck(layout, dtype):
    x = make_input(dtype, layout, True).requires_grad_(dtype == torch.float32)
    rois = make_rois(K=4, dtype=dtype)
    torch.library.opcheck(OP, (x, rois, SCALE, 3, 4))
    out, argmax = OP(x.detach(), rois, SCALE, 3, 4)
    torch.library.opcheck(BWD, (torch.randn_like(out), rois, argmax, SCALE, 3, 4, N, C, H, W))
