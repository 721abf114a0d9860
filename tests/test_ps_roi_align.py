"""ps_roi_align: our kernels against a float64 reference and torchvision's native kernel."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import NATIVE
from reference import ps_roi_align as ref_ps_roi_align
from roi_cases import (
    DTYPES,
    LAYOUTS,
    POOLED,
    SCALE,
    TOL,
    H,
    N,
    W,
    expected_format,
    inf_border_case,
    large_map_case,
    make_input,
    make_rois,
    ps_layout_case,
)
from torchvision.ops import ps_roi_align

import torchvision_cpu_ext

OP = torch.ops.torchvision.ps_roi_align
BWD = torch.ops.torchvision._ps_roi_align_backward
C_IN = 2 * POOLED[0] * POOLED[1]  # two output channels
C_OUT = 2


@functools.cache
def _reference(dtype: torch.dtype, sampling_ratio: int):
    x = make_input(dtype, "nchw", True, channels=C_IN)
    return ref_ps_roi_align(x, make_rois(dtype=dtype), SCALE, *POOLED, sampling_ratio)


@pytest.mark.parametrize("sampling_ratio", [2, 0])
@pytest.mark.parametrize("contiguous", [True, False], ids=["contig", "strided"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_matches_reference(dtype, layout, contiguous, sampling_ratio, threads):
    x = make_input(dtype, layout, contiguous, channels=C_IN)
    out, mapping = OP(x, make_rois(dtype=dtype), SCALE, *POOLED, sampling_ratio)
    assert out.dtype == dtype and out.shape[1] == C_OUT
    assert out.is_contiguous(memory_format=expected_format(layout))
    expected = _reference(dtype, sampling_ratio)
    # equal_nan: an empty adaptive grid divides by zero, in torchvision and here.
    torch.testing.assert_close(out.double(), expected, equal_nan=True, **TOL[dtype])
    canonical = torch.arange(C_IN, dtype=torch.int32).view(1, C_OUT, *POOLED).expand_as(mapping)
    assert torch.equal(mapping, canonical)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_more_output_channels_than_a_vector(dtype, layout, threads):
    """19 output channels: two or three vector blocks per bin, as items of their own."""
    c_out = 19
    x = make_input(dtype, layout, True, channels=c_out * POOLED[0] * POOLED[1])
    rois = make_rois(K=30, seed=3, dtype=dtype)
    out, mapping = OP(x, rois, SCALE, *POOLED, 2)
    expected = ref_ps_roi_align(x, rois, SCALE, *POOLED, 2)
    torch.testing.assert_close(out.double(), expected, equal_nan=True, **TOL[dtype])
    canonical = torch.arange(x.shape[1], dtype=torch.int32).view(1, c_out, *POOLED).expand_as(mapping)
    assert torch.equal(mapping, canonical)
    if NATIVE and dtype in (torch.float32, torch.float64):
        g = torch.randn(out.shape, dtype=dtype, generator=torch.Generator().manual_seed(4))
        args = (rois, mapping, SCALE, *POOLED, 2, *x.shape)
        ours = BWD(g, *args)
        torchvision_cpu_ext.disable()
        try:
            tv_grad = BWD(g, *args)
        finally:
            torchvision_cpu_ext.enable()
        torch.testing.assert_close(ours, tv_grad, **TOL[dtype])


@pytest.mark.skipif(not NATIVE, reason="torchvision's compiled kernels are not loaded")
@pytest.mark.parametrize("sampling_ratio", [2, 0])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_forward_backward_match_torchvision(dtype, layout, sampling_ratio, threads):
    x = make_input(dtype, layout, True, channels=C_IN).requires_grad_()
    rois = make_rois(dtype=dtype)
    g = torch.randn(rois.shape[0], C_OUT, *POOLED, dtype=dtype)

    def run():
        x.grad = None
        out = ps_roi_align(x, rois, POOLED, SCALE, sampling_ratio)
        out.backward(g)
        return out.detach(), x.grad.clone()

    out, grad = run()
    torchvision_cpu_ext.disable()
    try:
        tv_out, tv_grad = run()
        tv_map = OP(x.detach(), rois, SCALE, *POOLED, sampling_ratio)[1]
    finally:
        torchvision_cpu_ext.enable()
    torch.testing.assert_close(out, tv_out, equal_nan=True, **TOL[dtype])
    torch.testing.assert_close(grad, tv_grad, **TOL[dtype])
    assert torch.equal(OP(x.detach(), rois, SCALE, *POOLED, sampling_ratio)[1], tv_map)
    assert grad.is_contiguous(memory_format=expected_format(layout))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradcheck(layout):
    x = torch.rand(1, 12, 6, 7, dtype=torch.float64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    rois = torch.tensor([[0, 0.0, 0.0, 9.0, 9.0], [0, 1.5, 2.5, 7.0, 6.0], [0, -3.0, -2.0, 4.0, 15.0]]).double()
    assert torch.autograd.gradcheck(lambda t: ps_roi_align(t, rois, (3, 2), 0.75, 2), (x,))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_reduced_precision_backward(dtype, layout, threads):
    x = make_input(dtype, layout, True, channels=C_IN).requires_grad_()
    rois = make_rois(dtype=dtype)
    g = torch.randn(rois.shape[0], C_OUT, *POOLED).to(dtype)
    ps_roi_align(x, rois, POOLED, SCALE, 2).backward(g)
    x64 = x.detach().double().requires_grad_()
    ps_roi_align(x64, rois.double(), POOLED, SCALE, 2).backward(g.double())
    assert x.grad.dtype == dtype and x.grad.is_contiguous(memory_format=expected_format(layout))
    torch.testing.assert_close(x.grad.double(), x64.grad, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backward_layouts_agree_on_a_large_map(dtype, threads):
    """channels_last fills grad_input by row bands, NCHW by planes: on a map of several bands
    both give the same gradient (each element gets the same adds in the same order)."""
    x, rois = large_map_case(C_IN)
    rois = rois.to(dtype)
    g = torch.randn(rois.shape[0], C_OUT, *POOLED, generator=torch.Generator().manual_seed(0)).to(dtype)
    _, mapping = OP(x.to(dtype), rois, SCALE, *POOLED, 2)
    args = (rois, mapping, SCALE, *POOLED, 2, *x.shape)
    nchw = BWD(g, *args)
    cl = BWD(g.contiguous(memory_format=torch.channels_last), *args)
    assert cl.dtype == dtype and cl.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(nchw, cl)
    assert (nchw != 0).any(3).any(1).any(0).float().mean() > 0.9  # gradient in nearly every row
    if NATIVE and dtype == torch.float32:
        torchvision_cpu_ext.disable()
        try:
            expected = BWD(g, *args)
        finally:
            torchvision_cpu_ext.enable()
        torch.testing.assert_close(cl, expected, **TOL[dtype])


def test_backward_is_deterministic_across_threads():
    x = make_input(torch.float32, "channels_last", True, channels=C_IN).requires_grad_()
    rois = torch.cat([make_rois(K=40, seed=s) for s in range(3)])
    g = torch.randn(rois.shape[0], C_OUT, *POOLED)
    grads = []
    before = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            x.grad = None
            ps_roi_align(x, rois, POOLED, SCALE, 0).backward(g)
            grads.append(x.grad.clone())
    finally:
        torch.set_num_threads(before)
    assert torch.equal(grads[0], grads[1])


def test_non_finite_boxes_give_zeros():
    x = make_input(torch.float32, "nchw", True, channels=C_IN)
    nan, inf = float("nan"), float("inf")
    rois = torch.tensor([[0, nan, 1, 3, 3], [1, 1, 1, inf, 3]])
    for sr in (2, 0):
        assert OP(x, rois, SCALE, *POOLED, sr)[0].eq(0).all()


@pytest.mark.parametrize("sampling_ratio", [2, 0])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pixels_outside_the_bins_are_not_read(dtype, layout, sampling_ratio, threads):
    """inf in the first row and column, boxes away from them: outputs finite and as the
    reference; an inf gradient reaches only pixels the boxes sample, never that row/column."""
    x, rois = inf_border_case(C_IN, dtype, layout)
    x.requires_grad_()
    out = ps_roi_align(x, rois, POOLED, SCALE, sampling_ratio)
    assert out.isfinite().all()
    ref = ref_ps_roi_align(x.detach(), rois, SCALE, *POOLED, sampling_ratio)
    torch.testing.assert_close(out.double(), ref, **TOL[dtype])
    out.backward(torch.full_like(out, float("inf")))
    assert (x.grad[:, :, 0, :] == 0).all() and (x.grad[:, :, :, 0] == 0).all()


@pytest.mark.parametrize("sampling_ratio", [2, 0])
@pytest.mark.parametrize("n_images", [1, 3])
@pytest.mark.parametrize("c_out", [2, 19])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layouts_agree_bit_for_bit(dtype, c_out, n_images, sampling_ratio, threads):
    """channels_last items are (ROI, block), NCHW items (bin, image, block): the same taps summed
    in the same order, so equal bit for bit; inverted, degenerate and outside boxes included,
    one image without boxes."""
    x, rois = ps_layout_case(c_out, n_images, dtype)
    nchw, _ = OP(x, rois, SCALE, *POOLED, sampling_ratio)
    cl, _ = OP(x.contiguous(memory_format=torch.channels_last), rois, SCALE, *POOLED, sampling_ratio)
    assert cl.is_contiguous(memory_format=torch.channels_last)
    # Bit for bit; the degenerate boxes' adaptive grid is empty and divides by zero (NaN).
    torch.testing.assert_close(nchw, cl, rtol=0, atol=0, equal_nan=True)
    ref = ref_ps_roi_align(x, rois, SCALE, *POOLED, sampling_ratio)
    torch.testing.assert_close(cl.double(), ref, **TOL[dtype], equal_nan=True)


def test_empty_and_bad_inputs():
    x = make_input(torch.float32, "nchw", True, channels=C_IN)
    out, mapping = OP(x, torch.zeros(0, 5), SCALE, *POOLED, 2)
    assert out.shape == mapping.shape == (0, C_OUT, *POOLED)
    rois = make_rois()
    with pytest.raises(
        RuntimeError, match=r"input channels \(24\) must be a multiple of pooled_height \* pooled_width"
    ):
        OP(x, rois, SCALE, 5, 5, 2)
    with pytest.raises(RuntimeError, match="input must be a 4-D tensor"):
        OP(x[0], rois, SCALE, *POOLED, 2)
    with pytest.raises(RuntimeError, match="rois must have the dtype of input"):
        OP(x, rois.double(), SCALE, *POOLED, 2)
    out, mapping = OP(x, rois, SCALE, *POOLED, 2)
    g = torch.randn_like(out)
    with pytest.raises(RuntimeError, match="channel_mapping must map output channel"):
        BWD(g, rois, mapping.flip(1), SCALE, *POOLED, 2, N, C_IN, H, W)
    with pytest.raises(RuntimeError, match="channel_mapping must be the int32 CPU tensor"):
        BWD(g, rois, mapping.long(), SCALE, *POOLED, 2, N, C_IN, H, W)
    with pytest.raises(RuntimeError, match="grad must have shape"):
        BWD(g[:, :1], rois, mapping[:, :1], SCALE, *POOLED, 2, N, C_IN, H, W)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck(layout, dtype):
    x = make_input(dtype, layout, True, channels=C_IN).requires_grad_(dtype == torch.float32)
    rois = make_rois(K=4, dtype=dtype)
    torch.library.opcheck(OP, (x, rois, SCALE, *POOLED, 2))
    out, mapping = OP(x.detach(), rois, SCALE, *POOLED, 2)
    torch.library.opcheck(BWD, (torch.randn_like(out), rois, mapping, SCALE, *POOLED, 2, N, C_IN, H, W))
