"""depthwise_conv1d / depthwise_conv2d: our kernels against ATen's convolution (F.conv1d/2d with
groups = input channels), in float64 as the reference and in the tested dtype as the stock
equivalent (NOTE [ depthwise_conv design ] in csrc/cpu/depthwise_conv_kernel.cpp).

Two OpTester subclasses, one per op; their hooks take the ops' positional arguments (input,
weight, bias, stride, padding, dilation), built from a Case. The kernel has three passes (NCHW
planes, channels_last rows, channel blocks) chosen by output width: the shared checks run with
the default choice, `test_every_path` forces each pass over the kernels with and without fast
paths, strides, dilations and multipliers. Errors are measured against the larger of 1 and the
expected values' largest magnitude (`assert_close`): a sum of K products rounds by its terms.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools

import pytest
import torch
import torch.nn.functional as F
from op_tester import OpTester, Sample, seeded_randn

import torchvision_cpu_ext
from torchvision_cpu_ext import _debug
from torchvision_cpu_ext.ops import depthwise_conv1d, depthwise_conv2d

OP2 = torch.ops.torchvision_cpu_ext.depthwise_conv2d
OP1 = torch.ops.torchvision_cpu_ext.depthwise_conv1d
BWD2 = torch.ops.torchvision_cpu_ext._depthwise_conv2d_backward
BWD1 = torch.ops.torchvision_cpu_ext._depthwise_conv1d_backward

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# Relative to the output's scale: float32/float64 within rounding of K products; bfloat16/half
# round the input once (ours and ATen's alike) and the output once.
TOL = {torch.float64: 1e-12, torch.float32: 3e-6, torch.bfloat16: 2e-2, torch.float16: 3e-3}


@pytest.fixture(autouse=True)
def parallel_small_calls():
    """The maps here are small: left alone, every call would run on the calling thread; the
    threads=2 tests are meant to take the parallel items."""
    with _debug.thresholds(depthwise_serial_work=0):
        yield


@dataclasses.dataclass(frozen=True)
class Case:
    N: int = 2
    C: int = 5
    M: int = 1
    H: int = 9
    W: int = 11
    kernel: tuple[int, int] = (3, 3)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (1, 1)
    dilation: tuple[int, int] = (1, 1)
    bias: bool = True


CASES = {
    "k3": Case(),
    "k5_wide_c": Case(N=1, C=19, H=12, W=40, kernel=(5, 5), padding=(2, 2)),
    "s2_multiplier": Case(C=3, M=2, H=10, W=9, stride=(2, 2)),
    "k7_no_bias": Case(N=1, C=17, H=14, W=14, kernel=(7, 7), padding=(3, 3), bias=False),
    "generic": Case(N=1, C=4, M=3, H=10, W=9, kernel=(3, 2), stride=(2, 1), padding=(0, 2), dilation=(1, 2)),
}
# gradcheck: the variants on small maps.
GRADCHECK = {
    "k3": Case(N=2, C=3, H=5, W=6),
    "s2_multiplier": Case(N=1, C=2, M=2, H=6, W=5, stride=(2, 2)),
    "generic": Case(N=1, C=2, M=2, H=6, W=7, kernel=(3, 2), stride=(2, 3), padding=(0, 2), dilation=(1, 2)),
}


def out_size(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def layout_of(t: torch.Tensor, layout: str, contiguous: bool) -> torch.Tensor:
    """t in NCHW or channels_last ([N, L, C]-strided for 3-D), or in a strided view of it."""
    if t.dim() == 3:
        t = t.transpose(1, 2).contiguous().transpose(1, 2) if layout == "channels_last" else t.contiguous()
    else:
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        t = t.contiguous(memory_format=fmt)
    if contiguous:
        return t
    # Every other column of a buffer twice as wide, in the same layout.
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    if layout == "channels_last":
        wide = (
            wide.transpose(1, 2).contiguous().transpose(1, 2)
            if t.dim() == 3
            else wide.contiguous(memory_format=torch.channels_last)
        )
    view = wide[..., ::2]
    view.copy_(t)
    return view


def is_layout(t: torch.Tensor, layout: str) -> bool:
    """Dense in NCHW or channels_last ([N, L, C]-strided for 3-D)."""
    if t.dim() == 3:
        return t.transpose(1, 2).is_contiguous() if layout == "channels_last" else t.is_contiguous()
    return t.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)


def conv_ref(x, w, b, stride, padding, dilation):
    """ATen's convolution with groups = input channels (in whatever dtype it is given)."""
    fn = F.conv1d if x.dim() == 3 else F.conv2d
    return fn(x, w, b, stride, padding, dilation, x.shape[1])


class DepthwiseTester(OpTester):
    dims = 2
    dtypes = DTYPES
    layouts = ["nchw", "channels_last"]
    params = {"case": list(CASES)}
    parity_dtypes = (torch.float32, torch.bfloat16)
    gradcheck_params = {"case": list(GRADCHECK)}
    opcheck_dtypes = (torch.float32, torch.bfloat16)
    grad_args = (0, 1, 2)
    cases = CASES
    gradcheck_cases = GRADCHECK
    opcheck_case = "s2_multiplier"

    def case_args(self, case: Case, dtype, layout, contiguous, seed=0) -> tuple:
        g = torch.Generator().manual_seed(seed)
        spatial = (case.H, case.W)[-self.dims :]
        kernel, stride = case.kernel[-self.dims :], list(case.stride[-self.dims :])
        padding, dilation = list(case.padding[-self.dims :]), list(case.dilation[-self.dims :])
        x = torch.randn(case.N, case.C, *spatial, generator=g, dtype=torch.float64).to(dtype)
        w = (torch.randn(case.C * case.M, 1, *kernel, generator=g, dtype=torch.float64) / 2).to(dtype)
        b = torch.randn(case.C * case.M, generator=g, dtype=torch.float64).to(dtype) if case.bias else None
        return layout_of(x, layout, contiguous), w, b, stride, padding, dilation

    def make_inputs(self, dtype, layout, contiguous, case="k3"):
        return self.case_args(self.cases[case], dtype, layout, contiguous)

    def reference(self, x, w, b, stride, padding, dilation):
        return conv_ref(x.double(), w.double(), None if b is None else b.double(), stride, padding, dilation)

    def assert_close(self, actual, expected, equal_nan=False, **tol):
        scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
        torch.testing.assert_close(actual.double(), expected.double(), rtol=0, atol=tol["tol"] * scale)

    def tol(self, dtype):
        return {"tol": TOL[dtype]}

    def parity_tol(self, dtype):
        return {"tol": TOL[dtype]}

    def reduced_backward_tol(self, dtype):
        return {"tol": 4 * TOL[dtype]}

    def in_layout(self, t, layout):
        return is_layout(t, layout)

    def check_forward(self, result, expected, args, dtype, layout):
        assert result.dtype == dtype and is_layout(result, layout)
        self.assert_close(result, expected, **self.tol(dtype))

    def stock_run_with_grad(self, args):
        """ATen's convolution of the same tensors: the module the op replaces."""
        x, w, b, *rest = (a.detach().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args)
        out = conv_ref(x, w, b, *rest)
        out.backward(seeded_randn(out.shape, out.dtype))
        return (out.detach(),), (x.grad, w.grad, None if b is None else b.grad)

    def test_matches_torchvision(self, dtype, layout, op_kwargs, threads):
        """Against ATen's convolution in the same dtype (no torchvision kernel: runs in both
        configurations)."""
        super().test_matches_torchvision(dtype, layout, op_kwargs, threads)

    def gradcheck_inputs(self, layout, case="k3"):
        return self.case_args(self.gradcheck_cases[case], torch.float64, layout, True)

    def deterministic_inputs(self, layout):
        case = Case(N=3, C=21, M=2, H=30, W=33, kernel=(5, 5), padding=(2, 2))
        return self.case_args(case, torch.float32, layout, True)

    def empty_cases(self, layout):
        case = self.cases["k3"]
        x, w, b, *rest = self.case_args(case, torch.float32, layout, True)
        x = x[:0]
        spatial = [
            out_size(s, k, *a) for s, k, a in zip(x.shape[2:], w.shape[2:], zip(*rest, strict=True), strict=True)
        ]
        return [((x, w, b, *rest), (0, w.shape[0], *spatial))]

    def bad_cases(self):
        x, w, b, s, p, d = self.case_args(self.cases["k3"], torch.float32, "nchw", True)
        name = self.op_name
        cases = [
            ("weight must have the dtype of input", (x, w.double(), b, s, p, d)),
            ("bias must have the dtype of input", (x, w, b.double(), s, p, d)),
            (r"must be a positive multiple of input channels", (x, w[:4], b[:4], s, p, d)),
            (r"weight must have shape \[C \* M, 1", (x, w.transpose(0, 1), None, s, p, d)),
            (rf"input must be a {self.dims + 2}-D tensor", (x[0], w, b, s, p, d)),
            ("bias must have shape", (x, w, b[:2], s, p, d)),
            ("input must be float32, float64, bfloat16 or float16", (x.int(), w.int(), None, s, p, d)),
            ("stride must be positive", (x, w, b, [0] * self.dims, p, d)),
            ("dilation must be positive", (x, w, b, s, p, [0] * self.dims)),
            ("padding must be non-negative", (x, w, b, s, [-1] * self.dims, d)),
            (r"stride must have", (x, w, b, [1] * (self.dims + 1), p, d)),
            ("smaller than the dilated kernel", (x[..., :1], w, b, s, [0] * self.dims, d)),
            ("must have at least one channel", (x[:, :0], w, b, s, p, d)),
        ]
        return [(f"{name}: .*{m}", self.op, a) for m, a in cases]

    def opcheck_cases(self, dtype, layout):
        x, w, b, s, p, d = self.case_args(self.cases[self.opcheck_case], dtype, layout, True)
        grad_ok = dtype in (torch.float32, torch.float64)
        args = (x.requires_grad_(grad_ok), w.requires_grad_(grad_ok), b.requires_grad_(grad_ok), s, p, d)
        with torch.no_grad():
            out = self.op(*args)
        g = torch.randn_like(out)
        plain = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args[:2])
        return [
            (self.op, args),
            (self.op, (args[0], args[1], None, s, p, d)),
            (self.backward_op, (g, *plain, s, p, d, [True, True, True])),
            (self.backward_op, (g, *plain, s, p, d, [False, True, False])),
        ]


class TestDepthwiseConv2d(DepthwiseTester):
    op = OP2
    backward_op = BWD2
    op_name = "depthwise_conv2d"

    @pytest.mark.parametrize("path", ["blocks", "wide"])
    @pytest.mark.parametrize("layout", ["nchw", "channels_last"])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_every_path(self, path, layout, dtype, threads):
        """Each pass (blocks at any width; planes or rows at any width: depthwise_block_width),
        forward and gradients, over kernels with and without a fast path (1, 2, 3, 5, 7 and 4
        columns), strides 1-3, dilation 2, multipliers 1 and 2, channel counts around the lanes."""
        width = 10**6 if path == "blocks" else 0
        kernels = [((1, 1), 0), ((3, 3), 1), ((5, 5), 2), ((7, 7), 3), ((2, 4), 1)]
        for ((kh, kw), pad), stride, dilation, M in itertools.product(kernels, (1, 2, 3), (1, 2), (1, 2)):
            if dilation == 2 and (kh, kw) in ((1, 1), (7, 7)):
                continue
            case = Case(
                N=2,
                C=17 if M == 1 else 9,
                M=M,
                H=15,
                W=13,
                kernel=(kh, kw),
                stride=(stride, stride),
                padding=(pad, pad),
                dilation=(dilation, dilation),
                bias=M == 1,
            )
            args = self.case_args(case, dtype, layout, True, seed=kh + stride)
            with _debug.thresholds(depthwise_block_width=width):
                outs, grads = self.run_with_grad(args)
            ref_outs, ref_grads = self.run_with_grad(
                tuple(a.double() if isinstance(a, torch.Tensor) else a for a in args), grad_dtype=dtype
            )
            where = f"kernel {(kh, kw)} stride {stride} dilation {dilation} M {M}"
            assert is_layout(outs[0], layout), where
            self.assert_close(outs[0], self.reference(*args), tol=TOL[dtype])
            for got, want in zip(grads, ref_grads, strict=True):
                if got is not None:
                    self.assert_close(got, want, tol=4 * TOL[dtype])

    def test_ops_output_layout_and_values_under_padding_modes(self):
        """The public function's 'same' and 'valid' (and tuples) are F.conv2d's, asymmetric
        'same' (even kernels) included."""
        x = seeded_randn((2, 6, 9, 10), torch.float32)
        for kernel, dilation in (((3, 3), 1), ((4, 2), 1), ((2, 5), (2, 1)), ((1, 4), 3)):
            w = seeded_randn((6, 1, *kernel), torch.float32, seed=5)
            for padding in ("same", "valid", (1, 2), 0):
                want = F.conv2d(x, w, None, 1, padding, dilation, 6)
                got = depthwise_conv2d(x, w, None, 1, padding, dilation)
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="not supported for strided"):
            depthwise_conv2d(x, w, None, 2, "same")
        with pytest.raises(ValueError, match="padding must be"):
            depthwise_conv2d(x, w, None, 1, "full")

    def test_special_values(self):
        """inf and NaN inputs propagate where ATen's do (no value of a pixel outside a window
        leaks into it)."""
        x = seeded_randn((1, 16, 8, 9), torch.float32)
        x[0, 3, 2, 4] = float("nan")
        x[0, 5, 0, 8] = float("inf")
        x[0, 7, 7, 0] = -float("inf")
        w = seeded_randn((16, 1, 3, 3), torch.float32, seed=2)
        for layout, width in itertools.product(("nchw", "channels_last"), (0, 10**6)):
            with _debug.thresholds(depthwise_block_width=width):
                for stride in (1, 2):
                    got = depthwise_conv2d(layout_of(x, layout, True), w, None, stride, 1)
                    want = F.conv2d(x.double(), w.double(), None, stride, 1, 1, 16)
                    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5, equal_nan=True)

    @pytest.mark.parametrize(
        "geometry",
        [dict(stride=(1 << 31, 1)), dict(padding=(1 << 30, 0), dilation=(1 << 30, 1))],
        ids=["stride", "dilation"],
    )
    def test_strides_and_dilations_beyond_the_map_run_on_aten(self, geometry):
        """A band's scratch would be gigabytes: ATen's convolution runs them, forward and gradients."""
        x = seeded_randn((2, 4, 7, 8), torch.float64).requires_grad_()
        w = seeded_randn((8, 1, 3, 3), torch.float64, seed=5).requires_grad_()
        got = depthwise_conv2d(x, w, None, **geometry)
        want = F.conv2d(x, w, None, groups=4, **geometry)
        torch.testing.assert_close(got, want)
        g = seeded_randn(got.shape, torch.float64, seed=6)
        for a, b in zip(torch.autograd.grad(got, (x, w), g), torch.autograd.grad(want, (x, w), g), strict=True):
            torch.testing.assert_close(a, b)
        path = torchvision_cpu_ext.depthwise_path(x, w, **geometry)
        assert path.startswith("ATen's convolution"), path

    def test_depthwise_path(self):
        """depthwise_path() names the pass a call takes, and the small-call rule."""
        w = torch.empty(32, 1, 3, 3)
        with _debug.thresholds(depthwise_serial_work=1 << 18):
            small = torchvision_cpu_ext.depthwise_path(torch.empty(1, 32, 4, 4), w, 1, 1)
            assert small.startswith("small call")
            big = torch.empty(1, 32, 112, 112)
            assert "NCHW planes" in torchvision_cpu_ext.depthwise_path(big, w, 1, 1)
            cl = big.contiguous(memory_format=torch.channels_last)
            assert "channels_last rows" in torchvision_cpu_ext.depthwise_path(cl, w, 1, 1)
            narrow = torch.empty(1, 32, 14, 14).contiguous(memory_format=torch.channels_last)
            assert "channels_last blocks" in torchvision_cpu_ext.depthwise_path(narrow, w, 1, 1)
            assert "runs of 6 pixels" in torchvision_cpu_ext.depthwise_path(narrow, w, 2, 1)

    @pytest.mark.parametrize("amp", [None, torch.bfloat16, torch.float16], ids=str)
    def test_autocast_as_aten(self, amp):
        """Under CPU autocast (and with mixed dtypes outside it) the op gives ATen's dtype or its
        error: convolutions run in the autocast dtype, float64 is left alone."""
        x = seeded_randn((1, 4, 6, 7), torch.float32)
        w = seeded_randn((4, 1, 3, 3), torch.float32, seed=3)
        for xd, wd in itertools.product((torch.float32, torch.bfloat16, torch.float64), repeat=2):
            ctx = torch.autocast("cpu", dtype=amp) if amp is not None else contextlib.nullcontext()
            results = []
            for fn in (
                lambda xd=xd, wd=wd: F.conv2d(x.to(xd), w.to(wd), None, 1, 1, 1, 4),
                lambda xd=xd, wd=wd: depthwise_conv2d(x.to(xd), w.to(wd), None, 1, 1),
            ):
                try:
                    with ctx:
                        results.append(fn())
                except RuntimeError as err:
                    results.append(err)
            stock, ours = results
            if isinstance(stock, RuntimeError):
                assert isinstance(ours, RuntimeError), (xd, wd, amp)
            else:
                assert not isinstance(ours, RuntimeError), (xd, wd, amp, ours)
                assert ours.dtype == stock.dtype
                self.assert_close(ours, stock, tol=TOL[ours.dtype])

    def test_torch_compile(self):
        x = seeded_randn((2, 8, 10, 12), torch.float32).requires_grad_()
        w = seeded_randn((8, 1, 3, 3), torch.float32, seed=1).requires_grad_()
        fn = torch.compile(lambda a, b: depthwise_conv2d(a, b, None, 2, 1).relu().sum(), backend="aot_eager")
        fn(x, w).backward()
        gx, gw = x.grad.clone(), w.grad.clone()
        x.grad = w.grad = None
        F.conv2d(x, w, None, 2, 1, 1, 8).relu().sum().backward()
        torch.testing.assert_close(gx, x.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gw, w.grad, rtol=1e-5, atol=1e-5)


class TestDepthwiseConv1d(DepthwiseTester):
    """The conv1d op: [N, C, L] or [N, L, C]-strided (its channels_last)."""

    op = OP1
    backward_op = BWD1
    op_name = "depthwise_conv1d"
    dims = 1
    cases = {
        "k3": Case(C=64, W=96),
        "k5_s2": Case(N=3, C=19, W=40, kernel=(1, 5), stride=(1, 2), padding=(1, 2)),
        "k7_multiplier": Case(N=1, C=3, M=2, W=31, kernel=(1, 7), padding=(1, 3), dilation=(1, 2), bias=False),
    }
    params = {"case": list(cases)}
    gradcheck_cases = {"k3": Case(N=2, C=3, W=9), "k4": Case(N=1, C=2, M=2, W=11, kernel=(1, 4), stride=(1, 2))}
    gradcheck_params = {"case": list(gradcheck_cases)}
    opcheck_case = "k5_s2"

    def test_same_padding(self):
        x = seeded_randn((2, 6, 20), torch.float32)
        for k, d in ((3, 1), (4, 1), (4, 3)):
            w = seeded_randn((6, 1, k), torch.float32, seed=k)
            for padding in ("same", "valid", 2):
                want = F.conv1d(x, w, None, 1, padding, d, 6)
                torch.testing.assert_close(depthwise_conv1d(x, w, None, 1, padding, d), want, rtol=1e-5, atol=1e-5)


def sample_inputs() -> dict[str, list[Sample]]:
    """The depthwise ops' calls for the checks that run every op of the op table alike (op_tester.Sample)."""
    return {"depthwise_conv": [*TestDepthwiseConv2d().sample_inputs(), *TestDepthwiseConv1d().sample_inputs()]}
