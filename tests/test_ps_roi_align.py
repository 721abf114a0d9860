"""ps_roi_align: our kernels against a float64 reference and torchvision's native kernel."""

from __future__ import annotations

import pytest
import torch
from op_tester import RoIOpTester, Sample
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
from torchvision_cpu_ext import _debug

OP = torch.ops.torchvision.ps_roi_align
BWD = torch.ops.torchvision._ps_roi_align_backward
C_IN = 2 * POOLED[0] * POOLED[1]  # two output channels
C_OUT = 2


class TestPSRoIAlign(RoIOpTester):
    op = OP
    backward_op = BWD
    channels = C_IN
    out_channels = C_OUT
    params = {"sampling_ratio": [2, 0]}
    param_ids = {"sampling_ratio": {2: "2", 0: "0"}}
    deterministic_params = {"sampling_ratio": 0}
    # An empty adaptive grid divides by zero, in torchvision and here.
    equal_nan = True

    def op_args(self, x, rois, sampling_ratio=2):
        return (x, rois, SCALE, *POOLED, sampling_ratio)

    def backward_args(self, args, result, grad):
        x, rois = args[:2]
        return (grad, rois, result[1], SCALE, *POOLED, args[5], *x.shape)

    def reference(self, x, rois, scale, ph, pw, sampling_ratio):
        return ref_ps_roi_align(x, rois, scale, ph, pw, sampling_ratio)

    def check_forward(self, result, expected, args, dtype, layout):
        super().check_forward(result, expected, args, dtype, layout)
        mapping = result[1]
        canonical = torch.arange(C_IN, dtype=torch.int32).view(1, C_OUT, *POOLED).expand_as(mapping)
        assert torch.equal(mapping, canonical)

    def gradcheck_inputs(self, layout):
        x = torch.rand(1, 12, 6, 7, dtype=torch.float64).contiguous(memory_format=expected_format(layout))
        rois = torch.tensor([[0, 0.0, 0.0, 9.0, 9.0], [0, 1.5, 2.5, 7.0, 6.0], [0, -3.0, -2.0, 4.0, 15.0]]).double()
        return (x, rois, 0.75, 3, 2, 2)

    def bad_cases(self):
        x = make_input(torch.float32, "nchw", True, channels=C_IN)
        rois = make_rois()
        out, mapping = OP(x, rois, SCALE, *POOLED, 2)
        g = torch.randn_like(out)
        return [
            (
                r"input channels \(24\) must be a multiple of pooled_height \* pooled_width",
                OP,
                (x, rois, SCALE, 5, 5, 2),
            ),
            ("input must be a 4-D tensor", OP, (x[0], rois, SCALE, *POOLED, 2)),
            ("rois must have the dtype of input", OP, (x, rois.double(), SCALE, *POOLED, 2)),
            (
                "channel_mapping must map output channel",
                BWD,
                (g, rois, mapping.flip(1), SCALE, *POOLED, 2, N, C_IN, H, W),
            ),
            (
                "channel_mapping must be the int32 CPU tensor",
                BWD,
                (g, rois, mapping.long(), SCALE, *POOLED, 2, N, C_IN, H, W),
            ),
            ("grad must have shape", BWD, (g[:, :1], rois, mapping[:, :1], SCALE, *POOLED, 2, N, C_IN, H, W)),
        ]

    # ---- ps_roi_align's own -------------------------------------------------------------

    @pytest.mark.parametrize("layout", LAYOUTS)
    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_more_output_channels_than_a_vector(self, dtype, layout, threads, native):
        """19 output channels: two or three vector blocks per bin, as items of their own."""
        c_out = 19
        x = make_input(dtype, layout, True, channels=c_out * POOLED[0] * POOLED[1])
        rois = make_rois(K=30, seed=3, dtype=dtype)
        out, mapping = OP(x, rois, SCALE, *POOLED, 2)
        expected = ref_ps_roi_align(x, rois, SCALE, *POOLED, 2)
        torch.testing.assert_close(out.double(), expected, equal_nan=True, **TOL[dtype])
        canonical = torch.arange(x.shape[1], dtype=torch.int32).view(1, c_out, *POOLED).expand_as(mapping)
        assert torch.equal(mapping, canonical)
        if native and dtype in (torch.float32, torch.float64):
            g = torch.randn(out.shape, dtype=dtype, generator=torch.Generator().manual_seed(4))
            args = (rois, mapping, SCALE, *POOLED, 2, *x.shape)
            ours = BWD(g, *args)
            with torchvision_cpu_ext.disabled():
                tv_grad = BWD(g, *args)
            torch.testing.assert_close(ours, tv_grad, **TOL[dtype])

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
    def test_backward_layouts_agree_on_a_large_map(self, dtype, threads, native):
        """channels_last fills grad_input by row bands, NCHW by planes: on a map of several bands
        both give the same gradient (each element gets the same adds in the same order); the
        bands are 3 rows of fp32 here, through grad_band_bytes."""
        x, rois = large_map_case(C_IN, h=29, w=37)
        rois = rois.to(dtype)
        g = torch.randn(rois.shape[0], C_OUT, *POOLED, generator=torch.Generator().manual_seed(0)).to(dtype)
        _, mapping = OP(x.to(dtype), rois, SCALE, *POOLED, 2)
        args = (rois, mapping, SCALE, *POOLED, 2, *x.shape)
        nchw = BWD(g, *args)
        with _debug.thresholds(grad_band_bytes=3 * x.shape[3] * C_IN * 4):
            cl = BWD(g.contiguous(memory_format=torch.channels_last), *args)
        assert cl.dtype == dtype and cl.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(nchw, cl)
        assert (nchw != 0).any(3).any(1).any(0).float().mean() > 0.9  # gradient in nearly every row
        if native and dtype == torch.float32:
            with torchvision_cpu_ext.disabled():
                expected = BWD(g, *args)
            torch.testing.assert_close(cl, expected, **TOL[dtype])

    def test_non_finite_boxes_give_zeros(self):
        x = make_input(torch.float32, "nchw", True, channels=C_IN)
        nan, inf = float("nan"), float("inf")
        rois = torch.tensor([[0, nan, 1, 3, 3], [1, 1, 1, inf, 3]])
        for sr in (2, 0):
            assert OP(x, rois, SCALE, *POOLED, sr)[0].eq(0).all()

    @pytest.mark.parametrize("sampling_ratio", [2, 0])
    @pytest.mark.parametrize("layout", LAYOUTS)
    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_pixels_outside_the_bins_are_not_read(self, dtype, layout, sampling_ratio, threads):
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
    def test_layouts_agree_bit_for_bit(self, dtype, c_out, n_images, sampling_ratio, threads):
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


def sample_inputs() -> dict[str, list[Sample]]:
    """ps_roi_align's calls for the checks that run every op of the op table alike (op_tester.Sample)."""
    return {"ps_roi_align": TestPSRoIAlign().sample_inputs()}
