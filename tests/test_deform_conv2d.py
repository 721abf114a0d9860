"""deform_conv2d: our kernels against a float64 reference, torchvision's native kernel and the
gradients of the forward (NOTE [ deform_conv2d gradients ] in csrc/cpu/deform_conv2d_kernel.cpp).

One OpTester subclass: its hooks take torchvision::deform_conv2d's positional arguments
(`op_args`), built from a case of CASES (`make_case`); the float64 reference is
tests/reference.py's. Errors are measured against the larger of 1 and the expected values'
largest magnitude (`assert_close`): a sum of C * K products rounds by its terms' size.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torchvision
from op_tester import OpTester, Sample
from reference import deform_conv2d as ref_deform_conv2d
from torchvision.ops import deform_conv2d

import torchvision_cpu_ext
from torchvision_cpu_ext import _debug

F32 = torch.float32

OP = torch.ops.torchvision.deform_conv2d
BWD = torch.ops.torchvision._deform_conv2d_backward
# A bfloat16/half input, weight and bias with float32 offset and mask: what the autocast rule
# calls (NOTE [ deform_conv2d under autocast ]).
MIXED = torch.ops.torchvision_cpu_ext._deform_conv2d_mixed

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
LAYOUTS = ["nchw", "channels_last"]
# Relative to the output's scale (see `assert_close`): float32 and float64 within rounding of a
# sum of C * K products; bfloat16/half round the input-sized samples and the output once each.
TOL = {
    torch.float64: 1e-12,
    torch.float32: 2e-6,
    torch.bfloat16: 2e-2,
    torch.float16: 3e-3,
}


@pytest.fixture(autouse=True)
def parallel_small_calls():
    """The maps here are small: left alone, the kernel would run every call on one thread
    (useful_threads); threads=2 tests are meant to take the parallel tiles and segments."""
    with _debug.thresholds(deform_serial_work=0):
        yield


@dataclasses.dataclass(frozen=True)
class Case:
    N: int = 2
    C: int = 6
    H: int = 9
    W: int = 8
    C_out: int = 4
    kernel: tuple[int, int] = (3, 3)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (1, 1)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    offset_groups: int = 1
    mask: bool = True
    bias: bool = True
    offset_scale: float = 2.0  # offsets ~ N(0, offset_scale): many samples fractional, some outside

    @property
    def out_hw(self) -> tuple[int, int]:
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel, self.stride, self.padding, self.dilation
        return (self.H + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (self.W + 2 * pw - dw * (kw - 1) - 1) // sw + 1


CASES = {
    "dcnv2": Case(),
    "dcnv1": Case(mask=False),
    "no_bias": Case(bias=False),
    "stride_pad_dilation": Case(N=1, C=8, H=11, W=13, kernel=(3, 2), stride=(2, 1), padding=(0, 2), dilation=(1, 2)),
    "groups": Case(
        N=3, C=12, H=6, W=7, C_out=6, kernel=(2, 3), stride=(1, 2), padding=(2, 1), dilation=(2, 1), groups=3
    ),
    # offset groups and conv groups that split the channels differently
    "offset_groups": Case(C=12, C_out=6, groups=2, offset_groups=3),
    "offset_groups_finer": Case(C=8, groups=2, offset_groups=4, mask=False),
    "wide": Case(N=1, C=40, H=10, W=12, C_out=24, groups=2, offset_groups=5),
    "kernel_1x1": Case(kernel=(1, 1), padding=(0, 0)),
    "zero_offsets": Case(offset_scale=0.0),
    "far_outside": Case(offset_scale=20.0),
}
# gradcheck's cases: the variants (mask, groups, offset groups, stride/padding/dilation) on a
# small map, offsets ~ N(0, 1.3) (away from integer coordinates, where the gradient jumps).
GRADCHECK = {
    "dcnv2": Case(N=2, C=4, H=3, W=4, C_out=2, offset_scale=1.3),
    "dcnv1": Case(N=1, C=4, H=4, W=4, C_out=3, mask=False, offset_scale=1.3),
    "groups": Case(
        N=1,
        C=6,
        H=5,
        W=5,
        C_out=3,
        kernel=(2, 3),
        stride=(1, 2),
        padding=(2, 1),
        dilation=(2, 1),
        groups=3,
        offset_scale=1.3,
    ),
    "offset_groups": Case(N=1, C=6, H=3, W=4, C_out=2, groups=2, offset_groups=3, offset_scale=1.3),
    "stride_pad_dilation": Case(
        N=1, C=4, H=6, W=6, kernel=(3, 2), stride=(2, 1), padding=(0, 2), dilation=(1, 2), offset_scale=1.3
    ),
}


def make_case(case: Case, dtype=torch.float32, layout="nchw", contiguous=True, seed=0):
    """(input, offset, weight, bias, mask), as torchvision.ops.deform_conv2d takes them; values
    drawn in float64 and rounded to dtype (the same for every layout and contiguity)."""
    g = torch.Generator().manual_seed(seed)
    kh, kw = case.kernel
    K = kh * kw
    OH, OW = case.out_hw

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    x = rnd(case.N, case.C, case.H, case.W)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last) if contiguous else _strided(x, channels_last=True)
    elif not contiguous:
        x = _strided(x)
    offset = rnd(case.N, 2 * case.offset_groups * K, OH, OW, scale=case.offset_scale)
    weight = rnd(case.C_out, case.C // case.groups, kh, kw)
    bias = rnd(case.C_out) if case.bias else None
    mask = torch.rand(case.N, case.offset_groups * K, OH, OW, generator=g, dtype=torch.float64).to(dtype)
    return x, offset, weight, bias, (mask if case.mask else None)


def _strided(x: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """x's values in a non-contiguous view (every other column of a wider buffer)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    wide = torch.zeros(*x.shape[:3], 2 * x.shape[3], dtype=x.dtype).contiguous(memory_format=fmt)
    view = wide[..., ::2]
    view.copy_(x)
    assert not view.is_contiguous() and not view.is_contiguous(memory_format=torch.channels_last)
    return view


def run(case: Case, x, offset, weight, bias, mask):
    return deform_conv2d(x, offset, weight, bias, case.stride, case.padding, case.dilation, mask)


def expected(case: Case, x, offset, weight, bias, mask):
    return ref_deform_conv2d(x, offset, weight, bias, case.stride, case.padding, case.dilation, mask)


def close(actual: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    """Equal within TOL[dtype] of the larger of 1 and the expected values' largest magnitude."""
    scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    torch.testing.assert_close(actual.double(), want.double(), rtol=0, atol=TOL[dtype] * scale)


def op_args(case: Case, x, offset, weight, bias, mask):
    """The arguments of torchvision::deform_conv2d, as torchvision.ops.deform_conv2d builds them."""
    use_mask = mask is not None
    mask = mask if use_mask else torch.zeros(x.shape[0], 1, dtype=x.dtype)
    bias = bias if bias is not None else torch.zeros(weight.shape[0], dtype=x.dtype)
    K = weight.shape[2] * weight.shape[3]
    groups = x.shape[1] // weight.shape[1]
    return (
        x,
        weight,
        offset,
        mask,
        bias,
        *case.stride,
        *case.padding,
        *case.dilation,
        groups,
        offset.shape[1] // (2 * K),
        use_mask,
    )


def expected_format(layout: str) -> torch.memory_format:
    return torch.channels_last if layout == "channels_last" else torch.contiguous_format


def _grads(case: Case, fn, x, offset, weight, bias, mask, grad):
    """The gradients of (x, offset, weight, bias, mask) (those given) of fn's output against grad;
    the reference (`expected`) in float64."""
    leaves = [
        None if t is None else (t.detach().double() if fn is expected else t.detach()).requires_grad_()
        for t in (x, offset, weight, bias, mask)
    ]
    out = fn(case, *leaves)
    out.backward(grad.to(out.dtype))
    return [t.grad for t in leaves if t is not None]


def _seeded_grad(case: Case, seed: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(case.N, case.C_out, *case.out_hw, generator=g, dtype=torch.float64)


def _on_minus_one(args: tuple) -> bool:
    """Whether a sample of torchvision::deform_conv2d's args lies exactly on y == -1 or x == -1
    (where torchvision's offset gradient is not its forward's, NOTE [ deform_conv2d gradients ])."""
    x, weight, offset, _, _, sh, sw, ph, pw, dh, dw, _, og, _ = args
    kh, kw = weight.shape[2:]
    OH, OW = offset.shape[2:]
    off = offset.double().reshape(offset.shape[0], og, kh, kw, 2, OH, OW)
    y = (torch.arange(OH) * sh - ph).view(1, 1, 1, 1, OH, 1) + (torch.arange(kh) * dh).view(1, 1, kh, 1, 1, 1)
    xx = (torch.arange(OW) * sw - pw).view(1, 1, 1, 1, 1, OW) + (torch.arange(kw) * dw).view(1, 1, 1, kw, 1, 1)
    return bool(((off[:, :, :, :, 0] + y == -1) | (off[:, :, :, :, 1] + xx == -1)).any())


# --- the bad inputs: (changes to the dcnv2 case's op_args by argument name, message) ----------

ARG_NAMES = [
    "input",
    "weight",
    "offset",
    "mask",
    "bias",
    "stride_h",
    "stride_w",
    "pad_h",
    "pad_w",
    "dilation_h",
    "dilation_w",
    "groups",
    "offset_groups",
    "use_mask",
]

BAD = {
    "input_3d": (dict(input=lambda t: t[0]), "input must be a 4-D"),
    "weight_3d": (dict(weight=lambda t: t[0]), "weight must be a 4-D"),
    "offset_3d": (dict(offset=lambda t: t[0]), "offset must be a 4-D"),
    "mask_3d": (dict(mask=lambda t: t[0]), "mask must be a 4-D"),
    "weight_dtype": (dict(weight=lambda t: t.double()), "weight must have the dtype of input"),
    "offset_dtype": (dict(offset=lambda t: t.double()), "offset must have the dtype of input"),
    "mask_dtype": (dict(mask=lambda t: t.double()), "mask must have the dtype of input"),
    "bias_dtype": (dict(bias=lambda t: t.double()), "bias must have the dtype of input"),
    "stride": (dict(stride_h=0), "stride must be positive"),
    "padding": (dict(pad_w=-1), "padding must be non-negative"),
    "dilation": (dict(dilation_w=0), "dilation must be positive"),
    "groups_zero": (dict(groups=0), "groups must be positive"),
    "groups_channels": (dict(groups=2), r"weight.size\(1\) \* groups"),
    "offset_groups_zero": (dict(offset_groups=0), "offset_groups must be positive"),
    "offset_groups_channels": (dict(offset_groups=4), "multiple of offset_groups"),
    "offset_channels": (dict(offset=lambda t: t[:, :-2]), r"offset.size\(1\)"),
    "mask_channels": (dict(mask=lambda t: t[:, :-1]), r"mask.size\(1\)"),
    "offset_batch": (dict(offset=lambda t: t[:1]), r"offset.size\(0\)"),
    "mask_batch": (dict(mask=lambda t: t[:1]), r"mask.size\(0\)"),
    "offset_spatial": (dict(offset=lambda t: t[..., :-1]), "offset's spatial size"),
    "mask_spatial": (dict(mask=lambda t: t[..., :-1]), "mask's spatial size"),
    "bias_size": (dict(bias=lambda t: t[:-1]), "bias must have one element per output channel"),
    "empty_output": (dict(input=lambda t: t[:, :, :1, :1], pad_h=0, pad_w=0), "spatial size|output would be empty"),
}


def _bad(**changes):
    """op_args of the dcnv2 case with some arguments replaced (by name, ARG_NAMES)."""
    case = CASES["dcnv2"]
    args = list(op_args(case, *make_case(case)))
    for k, v in changes.items():
        i = ARG_NAMES.index(k)
        args[i] = v(args[i]) if callable(v) else v
    return tuple(args)


class _Log(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append((str(func), [a.dtype for a in args if isinstance(a, torch.Tensor)]))
        return func(*args, **(kwargs or {}))


class TestDeformConv2d(OpTester):
    op = OP
    params = {"case": list(CASES)}
    param_ids = {"case": {name: name for name in CASES}}
    gradcheck_params = {"case": list(GRADCHECK)}
    # Float64 as torchvision's kernels' check; bfloat16: the mixed op (what autocast calls).
    opcheck_dtypes = (torch.float64, torch.bfloat16)
    grad_args = (0, 1, 2, 3, 4)  # input, weight, offset, mask, bias
    # Gradients are the same on every run at a thread count; across counts, the weight's
    # partials (one per thread) and an image's tile segments are summed differently (NOTE
    # [ deform_conv2d design ]).
    thread_invariant = False
    # Thousands of calls on a small map: at two threads each is a parallel region, whose thread
    # wake-ups (ms on two shared vCPUs) would be most of gradcheck's time.
    gradcheck_threads = 1

    # ---- hooks ----------------------------------------------------------------------------

    def make_inputs(self, dtype, layout, contiguous, case):
        c = CASES[case]
        return op_args(c, *make_case(c, dtype, layout, contiguous))

    def reference(self, x, weight, offset, mask, bias, sh, sw, ph, pw, dh, dw, groups, offset_groups, use_mask):
        return ref_deform_conv2d(x, offset, weight, bias, (sh, sw), (ph, pw), (dh, dw), mask if use_mask else None)

    def check_forward(self, result, expected, args, dtype, layout):
        x, weight, offset = args[:3]
        assert result.shape == (x.shape[0], weight.shape[0], *offset.shape[2:])
        super().check_forward(result, expected, args, dtype, layout)

    def tol(self, dtype):
        return dict(rtol=0, atol=TOL[dtype])

    def parity_tol(self, dtype):
        return self.tol(dtype)

    def reduced_backward_tol(self, dtype):
        # Gradients are sums of more terms than an output (half: as bfloat16's).
        return self.tol(torch.bfloat16)

    def assert_close(self, actual, expected, rtol, atol, equal_nan=False):
        scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * scale, equal_nan=equal_nan)

    def parity_grad_args(self, args):
        # Samples on y == -1 / x == -1 (zero offsets with padding 1): the offset gradient is the
        # documented deviation (test_offset_gradient_on_minus_one_differs_from_torchvision).
        return tuple(i for i in self.grad_args if i != 2) if _on_minus_one(args) else self.grad_args

    def gradcheck_inputs(self, layout, case):
        c = GRADCHECK[case]
        return op_args(c, *make_case(c, torch.float64, layout))

    def deterministic_inputs(self, layout):
        c = CASES["wide"]
        return op_args(c, *make_case(c, torch.float32, layout))

    def empty_cases(self, layout):
        cases = [
            dataclasses.replace(CASES["dcnv2"], N=0),
            dataclasses.replace(CASES["dcnv1"], N=0),
            dataclasses.replace(CASES["groups"], C_out=0),  # no output channels
        ]
        return [(op_args(c, *make_case(c, layout=layout)), (c.N, c.C_out, *c.out_hw)) for c in cases]

    def bad_cases(self):
        cases = []
        grad = torch.zeros(2, 4, *CASES["dcnv2"].out_hw)
        for changes, message in BAD.values():
            args = _bad(**changes)
            cases += [(message, OP, args), (message, BWD, (grad.to(args[0].dtype), *args))]
        args = _bad()
        return [
            *cases,
            ("grad must have the output's shape", BWD, (torch.zeros(2, 4, 3, 3), *args)),
            ("grad must have the dtype of input", BWD, (grad.double(), *args)),
            # As torchvision: mixed dtypes only under autocast (the mixed op takes float32).
            (
                "offset must have the dtype of input",
                OP,
                _bad(
                    input=torch.Tensor.bfloat16,
                    weight=torch.Tensor.bfloat16,
                    bias=torch.Tensor.bfloat16,
                    mask=torch.Tensor.bfloat16,
                ),
            ),
            (
                "offset must have the dtype of input or float32",
                MIXED,
                _bad(
                    input=torch.Tensor.bfloat16,
                    weight=torch.Tensor.bfloat16,
                    bias=torch.Tensor.bfloat16,
                    mask=torch.Tensor.bfloat16,
                    offset=torch.Tensor.double,
                ),
            ),
        ]

    def opcheck_cases(self, dtype, layout):
        cases = []
        for name in ("dcnv2",) if dtype == torch.bfloat16 else ("dcnv2", "dcnv1", "groups"):
            c = CASES[name]
            x, offset, weight, bias, mask = make_case(c, dtype, layout)
            if dtype == torch.bfloat16:
                # The mixed op (bfloat16 input, weight and bias, float32 offset and mask) and
                # the backward its autograd calls with them.
                offset, mask = offset.float(), mask.float()
            args = op_args(c, x, offset, weight, bias, mask)
            grad = _seeded_grad(c).to(dtype).contiguous(memory_format=expected_format(layout))
            cases += [(MIXED if dtype == torch.bfloat16 else OP, args), (BWD, (grad, *args))]
        return cases

    # ---- deform_conv2d's own: backward against the reference's gradients ------------------

    @pytest.mark.parametrize("layout", LAYOUTS)
    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("name", list(CASES))
    def test_backward_matches_reference_gradients(self, name, dtype, layout, threads):
        """Every gradient against autograd of the float64 reference (the forward's gradient)."""
        case = CASES[name]
        args = make_case(case, dtype, layout)
        grad = _seeded_grad(case)
        ours = _grads(case, run, *args, grad)
        want = self._reference_of(("grads", name, dtype), lambda: _grads(case, expected, *args, grad))
        x_grad = ours[0]
        assert x_grad.dtype == dtype and x_grad.is_contiguous(memory_format=expected_format(layout))
        tol = dtype if dtype != torch.float16 else torch.bfloat16  # half gradients: sums of more terms
        for a, b in zip(ours, want, strict=True):
            close(a, b, tol)

    def test_backward_on_integer_and_border_coordinates(self):
        """Samples exactly on pixels, on y/x == -1, on H - 1 / W - 1 and on H / W: the gradients
        are the forward's (NOTE [ deform_conv2d gradients ])."""
        case = Case(N=1, C=3, H=5, W=6, C_out=2, padding=(1, 1))
        x, _, weight, bias, mask = make_case(case, torch.float64)
        OH, OW = case.out_hw
        values = torch.tensor([-1.0, 0.0, 1.0, 4.0, 5.0, 6.0, -2.0, 0.5], dtype=torch.float64)
        offset = values[torch.randint(len(values), (1, 18, OH, OW), generator=torch.Generator().manual_seed(3))]
        grad = _seeded_grad(case)
        for a, b in zip(
            _grads(case, run, x, offset, weight, bias, mask, grad),
            _grads(case, expected, x, offset, weight, bias, mask, grad),
            strict=True,
        ):
            close(a, b, torch.float64)

    @pytest.mark.needs_native
    def test_offset_gradient_on_minus_one_differs_from_torchvision(self):
        """A sample exactly on y == -1 reads 0 and has no offset gradient; torchvision's backward
        gives it the derivative from inside the image. Zero offsets with padding 1 put every
        border tap there."""
        case = Case(N=1, C=2, H=4, W=4, C_out=1, offset_scale=0.0, mask=False, bias=False)
        args = op_args(case, *make_case(case, torch.float64))
        assert _on_minus_one(args)
        grad = torch.ones(1, 1, *case.out_hw, dtype=torch.float64)
        ours = BWD(grad, *args)[2].view(9, 2, 4, 4)
        with torchvision_cpu_ext.disabled():
            theirs = BWD(grad, *args)[2].view(9, 2, 4, 4)
        # tap (0, 1) of output row 0 samples y == -1: ours 0, torchvision's not
        assert ours[1, 0, 0].abs().max() == 0 and theirs[1, 0, 0].abs().max() > 0
        # away from the border they agree
        torch.testing.assert_close(ours[:, :, 1:3, 1:3], theirs[:, :, 1:3, 1:3])

    @pytest.mark.parametrize("layout", LAYOUTS)
    def test_nan_coordinates_read_zero(self, layout, threads):
        """A NaN offset puts its sample outside the image (csrc: build_plan): it reads 0 and has
        no gradient; every other sample is as the reference's with that tap masked out."""
        case = CASES["offset_groups"]
        x, offset, weight, bias, mask = make_case(case, torch.float64, layout)
        OH, OW = case.out_hw
        g = torch.Generator().manual_seed(7)
        # NaN y (or x) of some (offset group, tap, pixel) samples; the other coordinate stays.
        nan_at = torch.rand(case.N, case.offset_groups * 9, OH, OW, generator=g) < 0.2
        coord = torch.randint(2, nan_at.shape, generator=g)
        nan_offset = offset.clone().view(case.N, -1, 2, OH, OW)
        nan_offset[..., 0, :, :][nan_at & (coord == 0)] = float("nan")
        nan_offset[..., 1, :, :][nan_at & (coord == 1)] = float("nan")
        nan_offset = nan_offset.view_as(offset)
        grad = _seeded_grad(case)
        ours = _grads(case, run, x, nan_offset, weight, bias, mask, grad)
        out = run(case, x, nan_offset, weight, bias, mask)
        # The reference: those samples masked out (their offsets finite: the reference's
        # arithmetic on a NaN coordinate would give NaN times 0).
        masked = mask.masked_fill(nan_at, 0.0)
        finite = torch.where(nan_offset.isnan(), 0.0, nan_offset)
        close(out, expected(case, x, finite, weight, bias, masked), torch.float64)
        gx, goff, gw, gb, gm = ours
        rx, roff, rw, rb, rm = _grads(case, expected, x, finite, weight, bias, masked, grad)
        for a, b in ((gx, rx), (gw, rw), (gb, rb)):
            close(a, b, torch.float64)
        nan_pair = nan_at.view(case.N, -1, 1, OH, OW).expand(-1, -1, 2, -1, -1).reshape_as(offset)
        assert goff.isfinite().all() and gm.isfinite().all()
        assert (goff[nan_pair] == 0).all() and (gm[nan_at] == 0).all()
        close(goff[~nan_pair], roff[~nan_pair], torch.float64)
        close(gm[~nan_at], rm[~nan_at], torch.float64)

    @pytest.mark.parametrize("tile", [1, 3, 7])
    @pytest.mark.parametrize("layout", LAYOUTS)
    @pytest.mark.parametrize("name", ["dcnv2", "groups", "offset_groups"])
    def test_small_tiles(self, name, layout, tile, threads):
        """Tiles of a few pixels (crossing output rows, a last partial tile, many per thread; the
        backward's segments of an image's tiles) give the same results."""
        case = CASES[name]
        args = make_case(case, torch.float64, layout)
        grad = _seeded_grad(case)
        with _debug.thresholds(deform_tile_pixels=tile):
            close(run(case, *args), expected(case, *args), torch.float64)
            ours = _grads(case, run, *args, grad)
        for a, b in zip(ours, _grads(case, expected, *args, grad), strict=True):
            close(a, b, torch.float64)

    @pytest.mark.parametrize("brgemm", [0, 1], ids=["aten_matmul", "brgemm"])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
    @pytest.mark.parametrize("layout", LAYOUTS)
    @pytest.mark.parametrize("name", ["dcnv2", "groups", "gemm_blocks"])
    def test_gemm_paths(self, name, layout, dtype, brgemm, threads):
        """Both tile GEMMs (float-opmath ones through oneDNN's brgemm, or ATen's matmul), in tiles
        of 5 pixels, forward and every gradient against the float64 reference. gemm_blocks has
        more than one of tile_gemm_f32's blocks of output channels (64) and columns (576)."""
        case = CASES.get(name) or Case(N=1, C=72, H=5, W=6, C_out=70, offset_groups=2)
        args = make_case(case, dtype, layout)
        grad = _seeded_grad(case)
        with _debug.thresholds(deform_tile_pixels=5, deform_brgemm=brgemm):
            out = run(case, *args)
            ours = _grads(case, run, *args, grad)
        close(out, expected(case, *args), dtype)
        for a, b in zip(ours, _grads(case, expected, *args, grad), strict=True):
            close(a, b, dtype)

    def test_small_calls_run_on_one_thread_with_the_same_result(self):
        """Below deform_serial_work a call takes one tile per image on the calling thread."""
        case = CASES["offset_groups"]
        args = make_case(case, torch.float64, "channels_last")
        grad = _seeded_grad(case)
        before = torch.get_num_threads()
        torch.set_num_threads(2)
        try:
            with _debug.thresholds(deform_serial_work=1 << 40):
                serial, serial_grads = run(case, *args), _grads(case, run, *args, grad)
            parallel, parallel_grads = run(case, *args), _grads(case, run, *args, grad)
        finally:
            torch.set_num_threads(before)
        close(serial, parallel, torch.float64)
        for a, b in zip(serial_grads, parallel_grads, strict=True):
            close(a, b, torch.float64)

    def test_forward_in_batches_equals_per_image(self, threads):
        case = Case(N=5, C=16, H=12, W=10, C_out=8, offset_groups=2)
        x, offset, weight, bias, mask = make_case(case, layout="channels_last")
        whole = run(case, x, offset, weight, bias, mask)
        for n in range(case.N):
            one = run(case, x[n : n + 1], offset[n : n + 1], weight, bias, mask[n : n + 1])
            torch.testing.assert_close(whole[n : n + 1], one, rtol=1e-6, atol=1e-5)

    def test_gradients_keep_each_tensors_memory_format(self):
        case = CASES["dcnv2"]
        x, offset, weight, bias, mask = make_case(case, layout="channels_last")
        offset = offset.contiguous(memory_format=torch.channels_last)
        args = op_args(case, x, offset, weight, bias, mask)
        grad = _seeded_grad(case).float().contiguous(memory_format=torch.channels_last)
        gx, gw, goff, gm, gb = BWD(grad, *args)
        assert gx.is_contiguous(memory_format=torch.channels_last) and not gx.is_contiguous()
        assert goff.is_contiguous(memory_format=torch.channels_last) and not goff.is_contiguous()
        assert gw.is_contiguous() and gm.is_contiguous() and gb.shape == bias.shape

    def test_module_runs_on_our_kernel(self):
        torch.manual_seed(0)
        m = torchvision.ops.DeformConv2d(4, 6, 3, padding=1, groups=2)
        x = torch.randn(2, 4, 7, 7, requires_grad=True)
        offset = torch.randn(2, 18, 7, 7, requires_grad=True)
        out = m(x, offset)
        out.sum().backward()
        assert out.shape == (2, 6, 7, 7) and m.weight.grad is not None and offset.grad is not None
        torch.testing.assert_close(
            out.double(), ref_deform_conv2d(x, offset, m.weight, m.bias, (1, 1), (1, 1), (1, 1)), rtol=0, atol=1e-5
        )

    def test_zero_channels(self):
        """No input channels (torchvision's Python front end divides by them; the op takes them):
        the output is the bias, the gradients of the samples zero."""
        case = Case(C=0, C_out=3)
        x, offset, weight, bias, mask = make_case(case)
        args = (x, weight, offset, mask, bias, 1, 1, 1, 1, 1, 1, 1, 1, True)
        out = OP(*args)
        torch.testing.assert_close(out, bias.view(1, 3, 1, 1).expand_as(out).contiguous())
        gx, gw, goff, gm, gb = BWD(torch.ones_like(out), *args)
        assert gx.shape == x.shape and gw.shape == weight.shape
        assert goff.abs().sum() == 0 and gm.abs().sum() == 0
        torch.testing.assert_close(gb, torch.full_like(bias, out[:, 0].numel()))

    # ---- autocast (NOTE [ deform_conv2d under autocast ]): input, weight and bias in the ----
    # autocast dtype, offset and mask float32, output in the autocast dtype.

    @pytest.mark.parametrize("low", [torch.bfloat16, torch.float16], ids=str)
    @pytest.mark.parametrize("layout", LAYOUTS)
    def test_autocast_offsets_stay_float32(self, layout, low):
        case = CASES["offset_groups"]
        x, offset, weight, bias, mask = make_case(case, torch.float32, layout)
        with torch.autocast("cpu", dtype=low), _Log() as log:
            out = run(case, x, offset, weight, bias, mask)
        assert out.dtype == low and out.is_contiguous(memory_format=expected_format(layout))
        calls = [s for s in log.seen if "deform_conv2d" in s[0]]
        assert calls == [("torchvision_cpu_ext._deform_conv2d_mixed.default", [low, low, F32, F32, low])]
        want = expected(case, x.to(low), offset, weight.to(low), bias.to(low), mask)
        close(out, want, low if low == torch.bfloat16 else torch.bfloat16)

    def test_autocast_leaves_float64_alone(self):
        case = CASES["dcnv1"]
        args = make_case(case, torch.float64)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = run(case, *args)
        assert out.dtype == torch.float64
        assert torch.equal(out, run(case, *args))

    def test_autocast_backward(self):
        """Gradients through the mixed op: float32 leaves get float32 gradients, within bf16 of
        the reference's."""
        case = CASES["dcnv2"]
        x, offset, weight, bias, mask = make_case(case, torch.float32, "channels_last")
        grad = _seeded_grad(case)
        leaves = [t.detach().requires_grad_() for t in (x, offset, weight, bias, mask)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = run(case, *leaves)
        out.backward(grad.bfloat16())
        assert all(t.grad.dtype == torch.float32 for t in leaves)
        rounded = [x.bfloat16(), offset, weight.bfloat16(), bias.bfloat16(), mask]
        want = _grads(case, expected, *rounded, grad.bfloat16().double())
        for a, b in zip([t.grad for t in leaves], want, strict=True):
            close(a, b, torch.bfloat16)

    @pytest.mark.variant_independent
    def test_autocast_under_torch_compile(self):
        case = CASES["dcnv2"]
        x, offset, weight, bias, mask = make_case(case, torch.float32, "channels_last")

        def f(x, offset, weight, bias, mask):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return run(case, x, offset, weight, bias, mask) * 2

        torch._dynamo.reset()
        out = torch.compile(f, backend="aot_eager", fullgraph=True)(x, offset, weight, bias, mask)
        assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(out, f(x, offset, weight, bias, mask))

    @pytest.mark.variant_independent
    @pytest.mark.parametrize("layout", LAYOUTS)
    def test_torch_compile_inductor(self, layout):
        case = CASES["groups"]
        x, offset, weight, bias, mask = (t.requires_grad_() for t in make_case(case, torch.float32, layout))

        def f(x, offset, weight, bias, mask):
            return (run(case, x, offset, weight, bias, mask) + 1).relu()

        torch._dynamo.reset()
        compiled = torch.compile(f, fullgraph=True)
        # Scalar codegen, as in test_roi_align.py's test_torch_compile_inductor (inductor's own
        # vectorized C++ is not what is tested here).
        with torch._inductor.config.patch({"cpp.simdlen": 1}):
            out = compiled(x, offset, weight, bias, mask)
            torch.testing.assert_close(out, f(x, offset, weight, bias, mask))
            out.sum().backward()
        grads = [t.grad.clone() for t in (x, offset, weight, bias, mask)]
        for t in (x, offset, weight, bias, mask):
            t.grad = None
        f(x, offset, weight, bias, mask).sum().backward()
        for a, t in zip(grads, (x, offset, weight, bias, mask), strict=True):
            torch.testing.assert_close(a, t.grad)


def sample_inputs() -> dict[str, list[Sample]]:
    """deform_conv2d's calls for the checks that run every op of the op table alike (op_tester.Sample)."""
    return {"deform_conv2d": TestDeformConv2d().sample_inputs()}
