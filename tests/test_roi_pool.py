"""roi_pool: our kernels against a float64 reference and torchvision's native kernel."""

from __future__ import annotations

import pytest
import torch
from op_tester import RoIOpTester, Sample
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

import torchvision_cpu_ext
from torchvision_cpu_ext import _debug

OP = torch.ops.torchvision.roi_pool
BWD = torch.ops.torchvision._roi_pool_backward

# Box extents (in feature pixels) whose bin multiples sit on floor/ceil rounding edges.
EDGE_EXTENTS = [57, 114, 121, 228, 7, 14, 1]


class TestRoIPool(RoIOpTester):
    """Max pooling is exact: values and argmax equal the reference and torchvision bit for bit."""

    op = OP
    backward_op = BWD
    exact = True
    parity_exact = True

    def op_args(self, x, rois):
        return (x, rois, SCALE, *POOLED)

    def backward_args(self, args, result, grad):
        x, rois = args[:2]
        return (grad, rois, result[1], SCALE, *POOLED, *x.shape)

    def reference(self, x, rois, scale, ph, pw):
        return ref_roi_pool(x, rois, scale, ph, pw)

    def check_forward(self, result, expected, args, dtype, layout):
        super().check_forward(result, expected, args, dtype, layout)
        argmax = result[1]
        assert argmax.dtype == torch.int32
        assert argmax.is_contiguous(memory_format=expected_format(layout))
        assert torch.equal(argmax, expected[1])

    def parity_tol(self, dtype):
        return dict(rtol=1e-6, atol=1e-6)

    def reduced_backward_tol(self, dtype):
        return dict(rtol=1e-2, atol=1e-2)

    def gradcheck_inputs(self, layout):
        # Distinct values: max pooling is differentiable away from ties.
        x = torch.randperm(3 * 8 * 9, dtype=torch.float64).reshape(1, 3, 8, 9) / 10
        rois = torch.tensor([[0, 0, 0, 8, 7], [0, 2, 1, 5, 6], [0, -3, -2, 4, 15]], dtype=torch.float64)
        return (x.contiguous(memory_format=expected_format(layout)), rois, 1.0, 3, 2)

    def bad_cases(self):
        x = make_input(torch.float32, "nchw", True)
        rois = make_rois()
        g = torch.zeros(rois.shape[0], C, 2, 2)
        a = torch.zeros(rois.shape[0], C, 2, 2, dtype=torch.int32)
        outside = a.clone()
        outside[0, 0, 0, 0] = H * W
        rest = (SCALE, 2, 2, N, C, H, W)
        return [
            ("input must be a 4-D tensor", OP, (x[0], rois, SCALE, 2, 2)),
            (r"rois must have shape \[K, 5\]", OP, (x, rois[:, 1:], SCALE, 2, 2)),
            ("rois must have the dtype of input", OP, (x, rois.double(), SCALE, 2, 2)),
            ("must be non-negative", OP, (x, rois, SCALE, 2, -2)),
            ("argmax must be the int32 CPU tensor", BWD, (g, rois, a.long(), SCALE, 2, 2, N, C, H, W)),
            ("grad must have shape", BWD, (g[:, :, :1], rois, a, SCALE, 2, 2, N, C, H, W)),
            *(
                ("outside the", BWD, (g.contiguous(memory_format=f), rois, outside.contiguous(memory_format=f), *rest))
                for f in (torch.contiguous_format, torch.channels_last)
            ),
        ]

    # ---- roi_pool's own -----------------------------------------------------------------

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
    @pytest.mark.parametrize("extent", EDGE_EXTENTS)
    def test_rounding_edge_cases(self, extent, dtype, native):
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
                if native:
                    with torchvision_cpu_ext.disabled():
                        tv_out, tv_arg = OP(x, r, scale, *pooled)
                    assert torch.equal(out, tv_out) and torch.equal(argmax, tv_arg)

    # NCHW takes the blocked (transposed) path when the bins read more than half the map, the
    # direct per-plane path otherwise (roi_pool_kernel.cpp): these cases land on each side.
    @pytest.mark.parametrize("case", ["blocked", "direct"])
    def test_nchw_paths(self, case, threads):
        k = 12 if case == "blocked" else 1
        x = torch.randn(2, 3, 30, 40)
        rois = torch.tensor([[i % 2, 2.0 + i, 1.0 + 2 * i, 22.0 + 3 * i, 25.0 + i] for i in range(k)])
        out, argmax = OP(x, rois, 1.0, 3, 4)
        exp_out, exp_arg = ref_roi_pool(x, rois, 1.0, 3, 4)
        assert torch.equal(out.double(), exp_out) and torch.equal(argmax, exp_arg)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
    def test_large_gradient_written_by_streaming_stores(self, dtype, threads):
        """grad_input of 32 MiB per thread and more is written with non-temporal stores
        (roi_schedule.h, stream_grad_input); stream_grad_bytes=0 takes that path on a small map,
        whose planes of an odd size start unaligned. The NCHW gradient must equal the
        channels_last one, which takes the other path (each element gets the same adds, in
        order), and the cached stores' bits."""
        h, w = 23, 33
        g = torch.Generator().manual_seed(5)
        x = torch.randn(1, 19, h, w, generator=g).to(dtype)
        img = torch.tensor([w / SCALE, h / SCALE])
        xy = torch.rand(40, 2, generator=g) * img - 4
        rois = torch.cat([torch.zeros(40, 1), xy, xy + torch.rand(40, 2, generator=g) * img / 2], 1).to(dtype)
        _, argmax = OP(x, rois, SCALE, *POOLED)
        grad = torch.randn(argmax.shape, generator=g).to(dtype)
        cl_args = (
            grad.contiguous(memory_format=torch.channels_last),
            rois,
            argmax.contiguous(memory_format=torch.channels_last),
        )
        with _debug.thresholds(stream_grad_bytes=0, grad_band_bytes=4 * w * 19 * 4):
            nchw = BWD(grad, rois, argmax, SCALE, *POOLED, *x.shape)
            cl = BWD(*cl_args, SCALE, *POOLED, *x.shape)
        assert h * w * x.element_size() % 64 != 0  # planes after the first start unaligned
        assert torch.equal(nchw, cl)
        assert nchw.count_nonzero() > 0
        with _debug.thresholds(stream_grad_bytes=1 << 40):
            assert torch.equal(nchw, BWD(grad, rois, argmax, SCALE, *POOLED, *x.shape))

    @pytest.mark.parametrize(("boxes", "images"), [(60, 2), (150, 1)], ids=["cached", "streamed"])
    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_channels_last_bands(self, dtype, boxes, images, threads, native):
        """channels_last forward sweeps each (image, block of 4 vectors of channels) in bands of
        rows (~256 KiB of the block's lines by default; a few rows here through
        roi_pool_band_bytes) and carries the state of bins spanning bands in scratch slots; 70
        channels give full blocks and a partial one, one image splits its boxes into chunks
        across threads, and results of 16 MiB and more (any size here with
        roi_pool_stream_bytes=0) are written with non-temporal stores (rows of 70 channels start
        unaligned). Equal to the NCHW path, an independent loop, and to torchvision's kernel
        where it has the dtype."""
        x, rois = large_map_case(70, K=boxes, seed=7, n=images, h=29, w=37)
        x, rois = x.to(dtype), rois.to(dtype)
        w = x.shape[3]
        stream = 0 if boxes == 150 else 1 << 40
        # ~3 rows of the widest block (4 vectors of 64 bytes): more rows at narrower vectors.
        with _debug.thresholds(roi_pool_band_bytes=3 * w * 256, roi_pool_stream_bytes=stream):
            out, argmax = OP(x.contiguous(memory_format=torch.channels_last), rois, SCALE, 7, 7)
        assert out.is_contiguous(memory_format=torch.channels_last)
        exp_out, exp_arg = OP(x, rois, SCALE, 7, 7)
        assert torch.equal(out, exp_out) and torch.equal(argmax, exp_arg)
        assert (argmax >= 0).float().mean() > 0.5  # most bins hold pixels
        # The backward takes the same map in bands of rows (3/4 of L2 of opmath elements by
        # default; 3 rows of fp32 here through grad_band_bytes), visiting the bins that meet each
        # band: equal to the NCHW path.
        grad = torch.randn(argmax.shape, generator=torch.Generator().manual_seed(8)).to(dtype)
        with _debug.thresholds(grad_band_bytes=3 * w * 70 * 4):
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
        if native and dtype in (torch.float32, torch.float64):
            with torchvision_cpu_ext.disabled():
                tv_out, tv_arg = OP(x, rois, SCALE, 7, 7)
            assert torch.equal(out, tv_out) and torch.equal(argmax, tv_arg)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
    def test_backward_argmax_outside_its_bin(self, dtype):
        """torchvision's backward adds each gradient at its argmax, wherever that is. The banded
        channels_last backward (bands of 2 rows of fp32 here, through grad_band_bytes) visits
        only the bins meeting a band, so it checks that every argmax lies in its bin's rows and
        otherwise takes the general path: an argmax moved elsewhere on the map (or to -1) gives
        the same gradient as the NCHW path."""
        x, rois = large_map_case(70, K=30, seed=9, h=29, w=37)
        x, rois = x.to(dtype), rois.to(dtype)
        _, argmax = OP(x, rois, SCALE, 7, 7)
        moved = argmax.clone()
        moved[3, 5, 2, 2] = 0  # row 0: outside that box's bins
        moved[4, 6, 1, 1] = x.shape[2] * x.shape[3] - 1  # the last pixel
        moved[5, 7, 0, 0] = -1
        grad = torch.randn(argmax.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
        for a in (argmax, moved):
            with _debug.thresholds(grad_band_bytes=2 * x.shape[3] * 70 * 4):
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

    def test_special_values(self):
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


def sample_inputs() -> dict[str, list[Sample]]:
    """roi_pool's calls for the checks that run every op of the op table alike (op_tester.Sample)."""
    return {"roi_pool": TestRoIPool().sample_inputs()}
