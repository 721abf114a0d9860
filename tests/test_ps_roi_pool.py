"""ps_roi_pool: our kernels against a float64 reference and torchvision's native kernel."""

from __future__ import annotations

import pytest
import torch
from op_tester import RoIOpTester, Sample
from reference import ps_roi_pool as ref_ps_roi_pool
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
    large_map_case,
    make_input,
    make_rois,
    ps_layout_case,
)
from torchvision.ops import ps_roi_pool

import torchvision_cpu_ext
from torchvision_cpu_ext import _debug

OP = torch.ops.torchvision.ps_roi_pool
BWD = torch.ops.torchvision._ps_roi_pool_backward
C_IN = 2 * POOLED[0] * POOLED[1]
C_OUT = 2


def interior(rois: torch.Tensor) -> torch.Tensor:
    """Which boxes keep their bins off the last row and column of the map, where torchvision's
    backward disagrees with its own forward (NOTE [ ps_roi_pool backward ])."""
    return (rois[:, 3] * SCALE < W - 2) & (rois[:, 4] * SCALE < H - 2)


class TestPSRoIPool(RoIOpTester):
    op = OP
    backward_op = BWD
    channels = C_IN
    out_channels = C_OUT
    # The same bins summed in the same order: equal to torchvision's forward bit for bit.
    parity_exact = True

    def op_args(self, x, rois):
        return (x, rois, SCALE, *POOLED)

    def backward_args(self, args, result, grad):
        x, rois = args[:2]
        return (grad, rois, result[1], SCALE, *POOLED, *x.shape)

    def reference(self, x, rois, scale, ph, pw):
        return ref_ps_roi_pool(x, rois, scale, ph, pw)

    def check_forward(self, result, expected, args, dtype, layout):
        super().check_forward(result, expected, args, dtype, layout)
        mapping = result[1]
        canonical = torch.arange(C_IN, dtype=torch.int32).view(1, C_OUT, *POOLED).expand_as(mapping)
        assert torch.equal(mapping, canonical)

    def parity_backward_inputs(self, args):
        x, rois = args[:2]
        inside = interior(rois)
        assert inside.sum() >= 5
        return (x, rois[inside], *args[2:])

    def gradcheck_inputs(self, layout):
        x = torch.rand(1, 12, 6, 7, dtype=torch.float64).contiguous(memory_format=expected_format(layout))
        # The first and last boxes reach the last row/column: torchvision's backward fails here.
        rois = torch.tensor([[0, 0, 0, 9, 9], [0, 1, 2, 5, 4], [0, 2, 1, 6.4, 5.6]], dtype=torch.float64)
        return (x, rois, 1.0, 3, 2)

    def bad_cases(self):
        x = make_input(torch.float32, "nchw", True, channels=C_IN)
        rois = make_rois()
        out, mapping = OP(x, rois, SCALE, *POOLED)
        g = torch.randn_like(out)
        return [
            (r"input channels \(24\) must be a multiple", OP, (x, rois, SCALE, 5, 5)),
            (r"rois must have shape \[K, 5\]", OP, (x, rois[:, :3], SCALE, *POOLED)),
            ("channel_mapping must map output channel", BWD, (g, rois, mapping + 1, SCALE, *POOLED, N, C_IN, H, W)),
            ("must be non-negative", BWD, (g, rois, mapping, SCALE, *POOLED, N, C_IN, -1, W)),
        ]

    # ---- ps_roi_pool's own --------------------------------------------------------------

    @pytest.mark.parametrize("layout", LAYOUTS)
    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_more_output_channels_than_a_vector(self, dtype, layout, threads, native):
        """19 output channels: two or three vector blocks per bin, as items of their own."""
        c_out = 19
        x = make_input(dtype, layout, True, channels=c_out * POOLED[0] * POOLED[1])
        rois = make_rois(K=30, seed=3, dtype=dtype)
        out, mapping = OP(x, rois, SCALE, *POOLED)
        torch.testing.assert_close(out.double(), ref_ps_roi_pool(x, rois, SCALE, *POOLED), **TOL[dtype])
        canonical = torch.arange(x.shape[1], dtype=torch.int32).view(1, c_out, *POOLED).expand_as(mapping)
        assert torch.equal(mapping, canonical)
        if native and dtype in (torch.float32, torch.float64):
            g = torch.randn(out.shape, dtype=dtype, generator=torch.Generator().manual_seed(4))
            inside = interior(rois)
            args = (rois[inside], mapping[inside], SCALE, *POOLED, *x.shape)
            ours = BWD(g[inside], *args)
            with torchvision_cpu_ext.disabled():
                tv_out = OP(x, rois, SCALE, *POOLED)
                tv_grad = BWD(g[inside], *args)
            assert torch.equal(out, tv_out[0])
            torch.testing.assert_close(ours, tv_grad, **TOL[dtype])

    @pytest.mark.parametrize("n_images", [1, 3])
    @pytest.mark.parametrize("c_out", [2, 19])
    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_channels_last_sweep_equals_nchw(self, dtype, c_out, n_images, threads):
        """channels_last sweeps each image's rows once per block of output channels (narrower
        blocks when there are fewer images than threads), NCHW pools bin by bin: the same sums in
        the same order, so equal bit for bit; one image has no ROI, boxes cross every row."""
        x, rois = ps_layout_case(c_out, n_images, dtype)
        nchw, mapping = OP(x, rois, SCALE, *POOLED)
        cl, cl_mapping = OP(x.contiguous(memory_format=torch.channels_last), rois, SCALE, *POOLED)
        assert cl.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(nchw, cl) and torch.equal(mapping, cl_mapping)
        torch.testing.assert_close(cl.double(), ref_ps_roi_pool(x, rois, SCALE, *POOLED), **TOL[dtype])

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
    def test_channels_last_sweep_in_groups_of_rois(self, dtype, threads):
        """Many boxes on one image: the channels_last sweep takes them in groups (its running
        sums bounded to 4 MiB by default, ~1300 boxes at 7x7 in float; here 8 KiB through
        ps_roi_pool_group_bytes, a few boxes per group), still equal to NCHW and to one group."""
        x, rois = large_map_case(2 * 49, K=60, n=1, h=23, w=31)
        rois = rois.to(dtype)
        x = x.to(dtype).contiguous(memory_format=torch.channels_last)
        nchw, _ = OP(x.contiguous(), rois, SCALE, 7, 7)
        with _debug.thresholds(ps_roi_pool_group_bytes=8 << 10):
            cl, _ = OP(x, rois, SCALE, 7, 7)
        assert torch.equal(nchw, cl) and (cl != 0).float().mean() > 0.5
        assert torch.equal(cl, OP(x, rois, SCALE, 7, 7)[0])  # the default: one group

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
    def test_backward_layouts_agree_on_a_large_map(self, dtype, threads):
        """channels_last fills grad_input by row bands, NCHW by planes: on a map of several bands
        (3 rows of fp32 here, through grad_band_bytes) both give the same gradient (each element
        gets the same adds in the same order)."""
        x, rois = large_map_case(C_IN, h=29, w=37)
        rois = rois.to(dtype)
        g = torch.randn(rois.shape[0], C_OUT, *POOLED, generator=torch.Generator().manual_seed(0)).to(dtype)
        _, mapping = OP(x.to(dtype), rois, SCALE, *POOLED)
        args = (rois, mapping, SCALE, *POOLED, *x.shape)
        nchw = BWD(g, *args)
        with _debug.thresholds(grad_band_bytes=3 * x.shape[3] * C_IN * 4):
            cl = BWD(g.contiguous(memory_format=torch.channels_last), *args)
        assert cl.dtype == dtype and cl.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(nchw, cl)
        assert (nchw != 0).any(3).any(1).any(0).float().mean() > 0.9  # gradient in nearly every row
        # ps_roi_pool's gradient is its bin's mean gradient spread over every pixel of the bin.
        x64 = x.double().requires_grad_()
        ps_roi_pool(x64, rois.double(), POOLED, SCALE).backward(g.double())
        torch.testing.assert_close(cl.double(), x64.grad, **TOL[dtype])

    def test_large_gradient_written_by_streaming_stores(self, threads):
        """grad_input of 32 MiB per thread and more is written with non-temporal stores
        (roi_schedule.h, stream_grad_input); stream_grad_bytes=0 takes that path on a small map,
        by planes in NCHW and by row bands (3 rows here) in channels_last: both agree, and give
        the cached stores' bits."""
        x, rois = large_map_case(C_IN, K=40, n=1, h=29, w=37)
        g = torch.randn(rois.shape[0], C_OUT, *POOLED, generator=torch.Generator().manual_seed(0))
        _, mapping = OP(x, rois, SCALE, *POOLED)
        args = (rois, mapping, SCALE, *POOLED, *x.shape)
        with _debug.thresholds(stream_grad_bytes=0, grad_band_bytes=3 * x.shape[3] * C_IN * 4):
            nchw = BWD(g, *args)
            cl = BWD(g.contiguous(memory_format=torch.channels_last), *args)
        assert torch.equal(nchw, cl)
        assert (nchw != 0).any(3).any(1).any(0).float().mean() > 0.9
        with _debug.thresholds(stream_grad_bytes=1 << 40):
            assert torch.equal(nchw, BWD(g, *args))


def sample_inputs() -> dict[str, list[Sample]]:
    """ps_roi_pool's calls for the checks that run every op of the op table alike (op_tester.Sample)."""
    return {"ps_roi_pool": TestPSRoIPool().sample_inputs()}
