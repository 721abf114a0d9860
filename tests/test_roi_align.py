"""roi_align: our kernels against a float64 reference and torchvision's native kernel."""

from __future__ import annotations

import pytest
import torch
import torchvision
from op_tester import RoIOpTester, Sample
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

OP = torch.ops.torchvision.roi_align
BWD = torch.ops.torchvision._roi_align_backward
# A reduced input with float32 rois: what the autocast rule calls (NOTE [ roi_align under autocast ]).
MIXED = torch.ops.torchvision_cpu_ext._roi_align_mixed

# NCHW takes one of two paths (roi_align_kernel.cpp, use_blocked_nchw): channel blocks
# transposed to pixel-major when the ROIs' taps (3 x 4 bins x 2 x 2 samples each) reach half the
# map's pixels, direct per-plane loops otherwise. These (n, c, h, w, boxes) land on each side of
# that line: 12 boxes x 48 taps >= 2 x 9 x 10 / 2, and 2 x 48 < 2 x 12 x 16 / 2 (a small map keeps
# the direct path's gradcheck quick).
NCHW_PATHS = {"blocked": (2, 3, 9, 10, 12), "direct": (2, 3, 12, 16, 2)}


class TestRoIAlign(RoIOpTester):
    op = OP
    backward_op = BWD
    params = {"aligned": [True, False], "sampling_ratio": [2, 0, -1, 3]}
    param_ids = {"aligned": {True: "aligned", False: "legacy"}, "sampling_ratio": {2: "2", 0: "0", -1: "-1", 3: "3"}}
    parity_dtypes = (torch.float32, torch.float64, torch.float16)
    parity_params = {"aligned": [True, False], "sampling_ratio": [2, 0]}
    gradcheck_params = parity_params
    opcheck_dtypes = (torch.float32, torch.bfloat16, torch.float64)
    deterministic_params = {"aligned": True, "sampling_ratio": 0}

    def op_args(self, x, rois, aligned=True, sampling_ratio=2):
        return (x, rois, SCALE, *POOLED, sampling_ratio, aligned)

    def backward_args(self, args, result, grad):
        x, rois = args[:2]
        return (grad, rois, SCALE, *POOLED, *x.shape, *args[5:])

    def reference(self, x, rois, scale, ph, pw, sampling_ratio, aligned):
        # The reference sees the input values and boxes the kernel sees (rounded to dtype).
        return ref_roi_align(x.double(), rois, scale, ph, pw, sampling_ratio, aligned)

    def parity_tol(self, dtype):
        # torchvision computes float16 in float16 arithmetic (each step rounded: errors of a few
        # 1e-2 on unit-variance data); we accumulate in float32, which the reference test checks.
        return dict(rtol=5e-2, atol=5e-2) if dtype == torch.float16 else TOL[dtype]

    def gradcheck_inputs(self, layout, aligned, sampling_ratio):
        x = torch.rand(1, 3, 6, 7, dtype=torch.float64).contiguous(memory_format=expected_format(layout))
        rois = torch.tensor(
            [[0, 0.0, 0.0, 9.0, 9.0], [0, 1.5, 2.5, 7.0, 6.0], [0, -3.0, -2.0, 4.0, 15.0], [0, 5.0, 5.0, 5.0, 5.0]],
            dtype=torch.float64,
        )
        return (x, rois, 0.75, 4, 3, sampling_ratio, aligned)

    def empty_cases(self, layout):
        x = make_input(torch.float32, layout, True)
        return [
            *super().empty_cases(layout),
            # No channels, and a zero-sized output grid.
            (self.op_args(x[:, :0], make_rois()), (22, 0, *POOLED)),
            ((x, make_rois(), SCALE, 0, 4, 2, True), (22, C, 0, 4)),
        ]

    def bad_cases(self):
        x = make_input(torch.float32, "nchw", True)
        rois = make_rois()
        bad_batch = rois.clone()
        bad_batch[3, 0] = N
        nan_batch = rois.clone()
        nan_batch[3, 0] = float("nan")
        g = torch.zeros(rois.shape[0], C, 2, 2)
        return [
            ("input must be a 4-D tensor", OP, (x[0], rois, SCALE, 2, 2, 2, True)),
            (r"rois must have shape \[K, 5\]", OP, (x, rois[:, :4], SCALE, 2, 2, 2, True)),
            (r"rois must have shape \[K, 5\]", OP, (x, rois[0], SCALE, 2, 2, 2, True)),
            ("rois must have the dtype of input", OP, (x, rois.double(), SCALE, 2, 2, 2, True)),
            # As torchvision: mixed dtypes only under autocast.
            (
                "rois must have the dtype of input, got input BFloat16 and rois Float",
                OP,
                (x.bfloat16(), rois, SCALE, 2, 2, 2, True),
            ),
            (
                "_roi_align_mixed: rois must have the dtype of input or float32",
                MIXED,
                (x.bfloat16(), rois.double(), SCALE, 2, 2, 2, True),
            ),
            ("input must be float32, float64, bfloat16 or float16", OP, (x.int(), rois.int(), SCALE, 2, 2, 2, True)),
            ("output size .* must be non-negative", OP, (x, rois, SCALE, -1, 2, 2, True)),
            (r"rois\[:, 0\] must hold batch indices in \[0, 2\)", OP, (x, bad_batch, SCALE, 2, 2, 2, True)),
            ("batch indices", OP, (x, nan_batch, SCALE, 2, 2, 2, True)),
            ("grad must have shape", BWD, (g, rois, SCALE, 2, 3, N, C, H, W, 2, True)),
            ("must be non-negative", BWD, (g, rois, SCALE, 2, 2, N, C, -H, W, 2, True)),
        ]

    def opcheck_cases(self, dtype, layout):
        if dtype != torch.bfloat16:
            return super().opcheck_cases(dtype, layout)
        # A bfloat16 map takes float32 boxes through the mixed op (what autocast calls).
        args = (make_input(dtype, layout, True), make_rois(K=4), SCALE, *POOLED, 2, True)
        grad = torch.randn_like(MIXED(*args))
        return [(MIXED, args), (BWD, self.backward_args(args, None, grad))]

    # ---- roi_align's own ----------------------------------------------------------------

    @pytest.mark.parametrize("contiguous", [True, False], ids=["contig", "strided"])
    @pytest.mark.parametrize("layout", LAYOUTS)
    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
    def test_mixed_rois_match_reference(self, dtype, layout, contiguous, threads):
        """A reduced map with float32 boxes (the mixed op), every aligned x sampling_ratio."""
        x = make_input(dtype, layout, contiguous)
        rois = make_rois()
        for aligned in (True, False):
            for sampling_ratio in self.params["sampling_ratio"]:
                out = MIXED(x, rois, SCALE, *POOLED, sampling_ratio, aligned)
                assert out.dtype == dtype
                assert out.is_contiguous(memory_format=expected_format(layout))
                expected = self._mixed_reference(dtype, aligned, sampling_ratio)
                torch.testing.assert_close(out.double(), expected, **TOL[dtype])

    def _mixed_reference(self, dtype, aligned, sampling_ratio):
        return self._reference_of(
            ("mixed", dtype, aligned, sampling_ratio),
            lambda: self.reference(
                make_input(dtype, "nchw", True), make_rois(), SCALE, *POOLED, sampling_ratio, aligned
            ),
        )

    @pytest.mark.parametrize("sampling_ratio", [2, 0])
    @pytest.mark.parametrize("layout", LAYOUTS)
    def test_non_finite_boxes_give_zeros(self, layout, sampling_ratio):
        """torchvision gives zeros with adaptive sampling and reads out of bounds (crashes) with a
        fixed ratio; we give zeros in both cases, and no gradient."""
        x = make_input(torch.float32, layout, True).requires_grad_()
        nan, inf = float("nan"), float("inf")
        rois = torch.tensor(
            [[0, nan, 1, 3, 3], [1, 1, 1, nan, 3], [0, 0, 0, inf, 3], [1, -inf, 0, 2, 2], [0, 1, 1, 8, 8]]
        )
        out = roi_align(x, rois, POOLED, SCALE, sampling_ratio, True)
        assert torch.equal(out[:4], torch.zeros_like(out[:4]))
        assert out[4].abs().sum() > 0
        out[:4].sum().backward()
        assert torch.equal(x.grad, torch.zeros_like(x))

    @pytest.mark.parametrize("sampling_ratio", [2, 0])
    @pytest.mark.parametrize("layout", LAYOUTS)
    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_pixels_outside_the_bins_are_not_read(self, dtype, layout, sampling_ratio, threads):
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

    def test_large_adaptive_box_matches_reference(self):
        x = make_input(torch.float32, "nchw", True)
        rois = torch.tensor([[0, -500.0, -400.0, 900.0, 700.0]])
        out = roi_align(x, rois, (2, 2), SCALE, 0, True)
        expected = ref_roi_align(x, rois, SCALE, 2, 2, 0, True)
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)

    @pytest.mark.parametrize("shape", [(2, 3, 1, 1), (2, 1, 4, 4), (1, 4, 1, 5)])
    def test_fake_kernel_strides_match_for_ambiguous_layouts(self, shape):
        """Shapes whose strides fit both layouts: the fake kernel must agree with the real one."""
        for fmt in (torch.contiguous_format, torch.channels_last):
            x = torch.randn(shape).contiguous(memory_format=fmt)
            rois = make_rois(K=3)
            rois[:, 0] = 0
            torch.library.opcheck(OP, (x, rois, SCALE, 2, 2, 2, True), test_utils="test_faketensor")

    # Autocast: roi_align's own rule (NOTE [ roi_align under autocast ]).

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

    @pytest.mark.variant_independent
    @pytest.mark.parametrize("layout", LAYOUTS)
    def test_torch_compile_inductor(self, layout):
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

    def test_multiscale_roi_align_module(self):
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

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
    @pytest.mark.parametrize("path", NCHW_PATHS)
    def test_nchw_paths_match_reference(self, path, dtype, threads):
        n, c, h, w, k = NCHW_PATHS[path]
        g = torch.Generator().manual_seed(3)
        x = torch.randn(n, c, h, w, generator=g).to(dtype)
        rois = torch.tensor([[i % n, 2.0 + i, 1.0 + 2 * i, 12.0 + 3 * i, 15.0 + i] for i in range(k)]).to(dtype)
        out = roi_align(x, rois, (3, 4), 0.5, 2, True)
        expected = ref_roi_align(x.double(), rois, 0.5, 3, 4, 2, True)
        torch.testing.assert_close(out.double(), expected, **TOL[dtype])

    @pytest.mark.parametrize("path", NCHW_PATHS)
    def test_nchw_paths_gradcheck(self, path):
        n, c, h, w, k = NCHW_PATHS[path]
        x = torch.rand(n, c, h, w, dtype=torch.float64, requires_grad=True)
        rois = torch.tensor(
            [[i % n, 2.0 + i, 1.0 + 2 * i, 12.0 + 3 * i, 15.0 + i] for i in range(k)], dtype=torch.float64
        )
        assert torch.autograd.gradcheck(lambda t: roi_align(t, rois, (3, 4), 0.5, 2, True), (x,))


def _under_bf16_autocast(*args):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return roi_align(*args)


def sample_inputs() -> dict[str, list[Sample]]:
    """roi_align's calls, and one under bfloat16 autocast (the mixed op), for the checks that run
    every op of the op table alike (op_tester.Sample)."""
    x, rois = make_input(torch.bfloat16, "channels_last", True), make_rois()
    autocast = Sample("roi_align-autocast-bf16", _under_bf16_autocast, (x, rois, POOLED, SCALE, 2, True), (0,))
    return {"roi_align": [*TestRoIAlign().sample_inputs(), autocast]}
