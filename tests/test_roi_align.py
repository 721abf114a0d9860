"""roi_align: our kernels against a float64 reference and torchvision's native kernel."""

from __future__ import annotations

import functools

import pytest
import torch
import torchvision
from conftest import NATIVE
from reference import roi_align as ref_roi_align
from roi_cases import (
    DTYPES,
    LAYOUTS,
    POOLED,
    SCALE,
    TOL,
    C,
    H,
    N,
    W,
    expected_format,
    inf_border_case,
    make_input,
    make_rois,
)
from torchvision.ops import roi_align

import torchvision_cpu_ext

OP = torch.ops.torchvision.roi_align
BWD = torch.ops.torchvision._roi_align_backward
# A reduced input with float32 rois: what the autocast rule calls (NOTE [ roi_align under autocast ]).
MIXED = torch.ops.torchvision_cpu_ext._roi_align_mixed


@functools.cache
def _reference(dtype: torch.dtype, rois_dtype: torch.dtype, aligned: bool, sampling_ratio: int) -> torch.Tensor:
    # The reference sees the input values and boxes the kernel sees (rounded to dtype).
    x = make_input(dtype, "nchw", True).double()
    return ref_roi_align(x, make_rois(dtype=rois_dtype), SCALE, *POOLED, sampling_ratio, aligned)


@pytest.mark.parametrize("sampling_ratio", [2, 0, -1, 3])
@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "legacy"])
@pytest.mark.parametrize("contiguous", [True, False], ids=["contig", "strided"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_matches_reference(dtype, layout, contiguous, aligned, sampling_ratio, threads):
    x = make_input(dtype, layout, contiguous)
    for rois_dtype in {dtype, torch.float32} if dtype in (torch.bfloat16, torch.float16) else {dtype}:
        rois = make_rois(dtype=rois_dtype)
        if rois_dtype == dtype:
            out = roi_align(x, rois, POOLED, SCALE, sampling_ratio, aligned)
        else:
            out = MIXED(x, rois, SCALE, *POOLED, sampling_ratio, aligned)
        assert out.dtype == dtype
        assert out.is_contiguous(memory_format=expected_format(layout))
        expected = _reference(dtype, rois_dtype, aligned, sampling_ratio)
        torch.testing.assert_close(out.double(), expected, **TOL[dtype])


@pytest.mark.skipif(not NATIVE, reason="torchvision's compiled kernels are not loaded")
@pytest.mark.parametrize("sampling_ratio", [2, 0])
@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "legacy"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=str)
def test_forward_backward_match_torchvision(dtype, layout, aligned, sampling_ratio, threads):
    x = make_input(dtype, layout, True).requires_grad_()
    rois = make_rois(dtype=dtype)
    g = torch.randn(rois.shape[0], C, *POOLED, dtype=torch.float64).to(dtype)

    def run():
        x.grad = None
        out = roi_align(x, rois, POOLED, SCALE, sampling_ratio, aligned)
        out.backward(g)
        return out.detach(), x.grad.clone()

    out, grad = run()
    torchvision_cpu_ext.disable()
    try:
        tv_out, tv_grad = run()
    finally:
        torchvision_cpu_ext.enable()
    # torchvision computes float16 in float16 arithmetic (each step rounded: errors of a few
    # 1e-2 on unit-variance data); we accumulate in float32, which the reference test checks.
    tol = dict(rtol=5e-2, atol=5e-2) if dtype == torch.float16 else TOL[dtype]
    torch.testing.assert_close(out, tv_out, **tol)
    torch.testing.assert_close(grad, tv_grad, **tol)
    assert grad.is_contiguous(memory_format=expected_format(layout))


@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "legacy"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("sampling_ratio", [2, 0])
def test_gradcheck(layout, aligned, sampling_ratio):
    x = torch.rand(1, 3, 6, 7, dtype=torch.float64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    rois = torch.tensor(
        [[0, 0.0, 0.0, 9.0, 9.0], [0, 1.5, 2.5, 7.0, 6.0], [0, -3.0, -2.0, 4.0, 15.0], [0, 5.0, 5.0, 5.0, 5.0]],
        dtype=torch.float64,
    )
    assert torch.autograd.gradcheck(
        lambda t: roi_align(t, rois, (4, 3), 0.75, sampling_ratio, aligned), (x,), fast_mode=False
    )


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_reduced_precision_backward(dtype, layout, threads):
    x64 = make_input(torch.float64, layout, True)
    rois = make_rois(dtype=dtype)
    g = torch.randn(rois.shape[0], C, *POOLED, dtype=torch.float64)
    xr = x64.to(dtype).requires_grad_()
    roi_align(xr, rois, POOLED, SCALE, 2, True).backward(g.to(dtype))
    x_ref = x64.to(dtype).double().requires_grad_()
    roi_align(x_ref, rois.double(), POOLED, SCALE, 2, True).backward(g.to(dtype).double())
    assert xr.grad.dtype == dtype
    assert xr.grad.is_contiguous(memory_format=expected_format(layout))
    torch.testing.assert_close(xr.grad.double(), x_ref.grad, **TOL[dtype])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_backward_is_deterministic_across_threads(layout):
    x = make_input(torch.float32, layout, True).requires_grad_()
    # Many overlapping boxes: every pixel receives gradient from several ROIs.
    rois = torch.cat([make_rois(K=60, seed=s) for s in range(4)])
    g = torch.randn(rois.shape[0], C, *POOLED)
    grads = []
    before = torch.get_num_threads()
    try:
        for n in (1, 2, 1, 2):
            torch.set_num_threads(n)
            x.grad = None
            roi_align(x, rois, POOLED, SCALE, 0, True).backward(g)
            grads.append(x.grad.clone())
    finally:
        torch.set_num_threads(before)
    for other in grads[1:]:
        assert torch.equal(grads[0], other)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_empty_inputs(layout):
    x = make_input(torch.float32, layout, True).requires_grad_()
    out = roi_align(x, torch.zeros(0, 5), POOLED, SCALE, 2, True)
    assert out.shape == (0, C, *POOLED)
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    # No channels, and a zero-sized output grid.
    assert roi_align(x[:, :0], make_rois(), POOLED, SCALE, 2, True).shape == (22, 0, *POOLED)
    assert OP(x.detach(), make_rois(), SCALE, 0, 4, 2, True).shape == (22, C, 0, 4)


@pytest.mark.parametrize("sampling_ratio", [2, 0])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_non_finite_boxes_give_zeros(layout, sampling_ratio):
    """torchvision gives zeros with adaptive sampling and reads out of bounds (crashes) with a
    fixed ratio; we give zeros in both cases, and no gradient."""
    x = make_input(torch.float32, layout, True).requires_grad_()
    nan, inf = float("nan"), float("inf")
    rois = torch.tensor([[0, nan, 1, 3, 3], [1, 1, 1, nan, 3], [0, 0, 0, inf, 3], [1, -inf, 0, 2, 2], [0, 1, 1, 8, 8]])
    out = roi_align(x, rois, POOLED, SCALE, sampling_ratio, True)
    assert torch.equal(out[:4], torch.zeros_like(out[:4]))
    assert out[4].abs().sum() > 0
    out[:4].sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("sampling_ratio", [2, 0])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pixels_outside_the_bins_are_not_read(dtype, layout, sampling_ratio, threads):
    """inf in the first row and column, boxes away from them: outputs finite and as the
    reference; an inf gradient reaches only pixels the boxes sample, never that row/column."""
    x, rois = inf_border_case(C, dtype, layout)
    x.requires_grad_()
    out = roi_align(x, rois, POOLED, SCALE, sampling_ratio, True)
    assert out.isfinite().all()
    ref = ref_roi_align(x.detach().double(), rois, SCALE, *POOLED, sampling_ratio, True)
    torch.testing.assert_close(out.double(), ref, **TOL[dtype])
    out.backward(torch.full_like(out, float("inf")))
    assert (x.grad[:, :, 0, :] == 0).all() and (x.grad[:, :, :, 0] == 0).all()


def test_large_adaptive_box_matches_reference():
    x = make_input(torch.float32, "nchw", True)
    rois = torch.tensor([[0, -500.0, -400.0, 900.0, 700.0]])
    out = roi_align(x, rois, (2, 2), SCALE, 0, True)
    torch.testing.assert_close(out.double(), ref_roi_align(x, rois, SCALE, 2, 2, 0, True), rtol=1e-5, atol=1e-5)


def test_bad_inputs_raise_clear_errors():
    x = make_input(torch.float32, "nchw", True)
    rois = make_rois()
    with pytest.raises(RuntimeError, match="input must be a 4-D tensor"):
        OP(x[0], rois, SCALE, 2, 2, 2, True)
    with pytest.raises(RuntimeError, match=r"rois must have shape \[K, 5\]"):
        OP(x, rois[:, :4], SCALE, 2, 2, 2, True)
    with pytest.raises(RuntimeError, match=r"rois must have shape \[K, 5\]"):
        OP(x, rois[0], SCALE, 2, 2, 2, True)
    with pytest.raises(RuntimeError, match="rois must have the dtype of input"):
        OP(x, rois.double(), SCALE, 2, 2, 2, True)
    with pytest.raises(RuntimeError, match="rois must have the dtype of input, got input BFloat16 and rois Float"):
        OP(x.bfloat16(), rois, SCALE, 2, 2, 2, True)  # as torchvision: mixed only under autocast
    with pytest.raises(RuntimeError, match="_roi_align_mixed: rois must have the dtype of input or float32"):
        MIXED(x.bfloat16(), rois.double(), SCALE, 2, 2, 2, True)
    with pytest.raises(RuntimeError, match="input must be float32, float64, bfloat16 or float16"):
        OP(x.int(), rois.int(), SCALE, 2, 2, 2, True)
    with pytest.raises(RuntimeError, match="output size .* must be non-negative"):
        OP(x, rois, SCALE, -1, 2, 2, True)
    bad_batch = rois.clone()
    bad_batch[3, 0] = N
    with pytest.raises(RuntimeError, match=r"rois\[:, 0\] must hold batch indices in \[0, 2\)"):
        OP(x, bad_batch, SCALE, 2, 2, 2, True)
    bad_batch[3, 0] = float("nan")
    with pytest.raises(RuntimeError, match="batch indices"):
        OP(x, bad_batch, SCALE, 2, 2, 2, True)
    g = torch.zeros(rois.shape[0], C, 2, 2)
    with pytest.raises(RuntimeError, match="grad must have shape"):
        BWD(g, rois, SCALE, 2, 3, N, C, H, W, 2, True)
    with pytest.raises(RuntimeError, match="must be non-negative"):
        BWD(g, rois, SCALE, 2, 2, N, C, -H, W, 2, True)


@pytest.mark.parametrize(
    "dtype,rois_dtype",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float64, torch.float64)],
)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck(layout, dtype, rois_dtype):
    x = make_input(dtype, layout, True).requires_grad_(dtype != torch.bfloat16)
    rois = make_rois(K=5, dtype=rois_dtype)
    torch.library.opcheck(OP if dtype == rois_dtype else MIXED, (x, rois, SCALE, 3, 4, 2, True))
    g = torch.randn(rois.shape[0], C, 3, 4, dtype=torch.float64).to(dtype)
    if layout == "channels_last":
        g = g.contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(BWD, (g, rois, SCALE, 3, 4, N, C, H, W, 2, True))


@pytest.mark.parametrize("shape", [(2, 3, 1, 1), (2, 1, 4, 4), (1, 4, 1, 5)])
def test_fake_kernel_strides_match_for_ambiguous_layouts(shape):
    """Shapes whose strides fit both layouts: the fake kernel must agree with the real one."""
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(shape).contiguous(memory_format=fmt)
        rois = make_rois(K=3)
        rois[:, 0] = 0
        torch.library.opcheck(OP, (x, rois, SCALE, 2, 2, 2, True), test_utils="test_faketensor")


class TestAutocast:
    def test_bf16_input_stays_bf16_with_fp32_rois(self):
        x = make_input(torch.bfloat16, "channels_last", True)
        rois = make_rois(dtype=torch.bfloat16)
        seen = []

        class Log(torch.utils._python_dispatch.TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                tensors = [a for a in args if isinstance(a, torch.Tensor)]
                seen.append((str(func), [a.dtype for a in tensors], [tuple(a.shape) for a in tensors]))
                return func(*args, **(kwargs or {}))

        with torch.autocast("cpu", dtype=torch.bfloat16), Log():
            out = roi_align(x, rois, POOLED, SCALE, 2, True)
        assert out.dtype == torch.bfloat16
        calls = [s[:2] for s in seen if "roi_align" in s[0]]
        assert calls == [("torchvision_cpu_ext._roi_align_mixed.default", [torch.bfloat16, torch.float32])]
        # The feature map is never copied (torchvision's rule casts it to fp32 and back).
        assert not any("_to_copy" in f and shapes == [tuple(x.shape)] for f, _, shapes in seen)
        expected = MIXED(x, rois.float(), SCALE, *POOLED, 2, True)
        assert torch.equal(out, expected)

    def test_fp32_input_stays_fp32(self):
        x = make_input(torch.float32, "nchw", True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = roi_align(x, make_rois(), POOLED, SCALE, 2, True)
        assert out.dtype == torch.float32
        assert torch.equal(out, roi_align(x, make_rois(), POOLED, SCALE, 2, True))

    def test_autocast_backward(self):
        """The mixed op's autograd: a bfloat16 gradient, the float32 computation's within bf16."""
        x = make_input(torch.bfloat16, "channels_last", True).requires_grad_()
        g = torch.randn(make_rois().shape[0], C, *POOLED, generator=torch.Generator().manual_seed(1))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = roi_align(x, make_rois(), POOLED, SCALE, 2, True)
        out.backward(g.bfloat16())
        assert x.grad.dtype == torch.bfloat16
        x32 = x.detach().float().requires_grad_()
        roi_align(x32, make_rois(), POOLED, SCALE, 2, True).backward(g.bfloat16().float())
        torch.testing.assert_close(x.grad.float(), x32.grad, **TOL[torch.bfloat16])

    def test_under_torch_compile(self):
        x = make_input(torch.bfloat16, "channels_last", True)
        rois = make_rois()

        def f(x, rois):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return roi_align(x, rois, POOLED, SCALE, 2, True) * 2

        out = torch.compile(f, backend="aot_eager", fullgraph=True)(x, rois)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out, f(x, rois))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_torch_compile_inductor(layout):
    x = make_input(torch.float32, layout, True).requires_grad_()
    rois = make_rois()

    def f(x, rois):
        return (roi_align(x, rois, POOLED, SCALE, 2, True) + 1).sum(dim=1)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    # Inductor's own vectorized C++ (not ours) corrupts the heap on this AMX machine with its
    # default ISA pick, and does not compile under ATEN_CPU_CAPABILITY=default (torch 2.14.1,
    # reproducible without this package); scalar codegen keeps this test about our op.
    with torch._inductor.config.patch({"cpp.simdlen": 1}):
        out = compiled(x, rois)
        torch.testing.assert_close(out, f(x, rois))
        out.sum().backward()
    g = x.grad.clone()
    x.grad = None
    f(x, rois).sum().backward()
    torch.testing.assert_close(g, x.grad)


def test_multiscale_roi_align_module():
    """torchvision's detection pooler (used by its detection models) runs on our kernel."""
    pooler = torchvision.ops.MultiScaleRoIAlign(["p2", "p3"], 7, 2)
    feats = {"p2": torch.randn(1, 8, 64, 64), "p3": torch.randn(1, 8, 32, 32)}
    boxes = [torch.tensor([[0.0, 0.0, 40.0, 40.0], [10.0, 20.0, 250.0, 200.0]])]
    out = pooler(feats, boxes, [(256, 256)])
    assert out.shape == (2, 8, 7, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as detection models run bf16 (boxes stay fp32)
        out_bf16 = pooler({k: v.bfloat16() for k, v in feats.items()}, boxes, [(256, 256)])
    assert out_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(out_bf16.float(), out, rtol=2e-2, atol=2e-2)


# NCHW takes one of two paths (roi_align_kernel.cpp, use_blocked_nchw): channel blocks
# transposed to pixel-major when the ROIs read more than half the map's pixels, direct per-plane
# loops otherwise. These shapes land on each side of that line.
NCHW_PATHS = {"blocked": (2, 3, 9, 10, 12), "direct": (2, 3, 40, 50, 2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("path", NCHW_PATHS)
def test_nchw_paths_match_reference(path, dtype, threads):
    n, c, h, w, k = NCHW_PATHS[path]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, c, h, w, generator=g).to(dtype)
    rois = torch.tensor([[i % n, 2.0 + i, 1.0 + 2 * i, 12.0 + 3 * i, 15.0 + i] for i in range(k)]).to(dtype)
    out = roi_align(x, rois, (3, 4), 0.5, 2, True)
    torch.testing.assert_close(out.double(), ref_roi_align(x.double(), rois, 0.5, 3, 4, 2, True), **TOL[dtype])


@pytest.mark.parametrize("path", NCHW_PATHS)
def test_nchw_paths_gradcheck(path):
    n, c, h, w, k = NCHW_PATHS[path]
    x = torch.rand(n, c, h, w, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[i % n, 2.0 + i, 1.0 + 2 * i, 12.0 + 3 * i, 15.0 + i] for i in range(k)], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: roi_align(t, rois, (3, 4), 0.5, 2, True), (x,))
