"""The checks every op repeats, written once (after torchvision's test/test_ops.py RoIOpTester).

An op's test file holds one subclass of OpTester (or of RoIOpTester for the RoI ops). The
subclass names the op, the grids it is tested on, and implements a few hooks; it inherits

  test_forward_matches_reference   dtypes x layouts x contiguity x the op's params x threads,
                                   against the float64 reference (tests/reference.py)
  test_matches_torchvision         forward and backward against torchvision's own kernels
                                   (`torchvision_cpu_ext.disabled()`; needs_native)
  test_gradcheck                   float64 gradcheck on a small input, per layout
  test_reduced_precision_backward  bf16/fp16 gradients against the float64 backward of the
                                   same (rounded) values
  test_backward_is_deterministic_across_threads
  test_empty_input                 zero-sized inputs: the output's shape, a zero gradient
  test_bad_input_raises_clear_errors   errors that name the argument
  test_opcheck                     torch.library.opcheck of the forward and backward ops

and adds its op-specific tests (paths, bands, special values) as methods of its own.

Class attributes (the grids):
  op                the torch.ops overload packet under test; every check calls it with the
                    positional args that make_inputs returns
  dtypes, layouts   of test_forward_matches_reference (and layouts of the others)
  params            {name: values} of the op's own arguments swept by the reference test;
                    default_params() (the first of each) is used where a test needs one
  parity_dtypes, parity_params (None: params), gradcheck_params, reduced_dtypes,
  opcheck_dtypes    the other tests' grids
  grad_args         positions in the op's args of the tensors that take a gradient

Hooks:
  make_inputs(dtype, layout, contiguous, **params) -> the op's args. The same values for every
                    layout and contiguity: the reference is computed once per (dtype, params).
  reference(*args)  -> the float64 expected output (a tensor or a tuple like the op's)
  gradcheck_inputs(layout, **params), deterministic_inputs(layout) -> the op's args
  empty_cases(layout) -> [(args, expected output shape)]
  bad_cases()       -> [(message regex, callable, args)]
  opcheck_cases(dtype, layout) -> [(op, args)]
Optional: output(result) (the differentiable output), check_forward, tol(dtype),
parity_tol(dtype), reduced_backward_tol(dtype), assert_close(actual, expected, **tol) (how a
tolerance is applied), parity_backward_inputs(args), parity_grad_args(args) (the gradients
parity compares), stock_run_with_grad(args) (what parity compares with).
Optional attributes: thread_invariant (False: gradients are deterministic per thread count, not
across counts), gradcheck_threads (the thread count gradcheck runs at; None: as set).

Sample inputs: sample_inputs() -> [Sample] gives a few calls of the op (its dtypes' float32 and
bfloat16 in each layout, and deterministic_inputs) for checks that run every op of the op table
the same way (tests/test_concurrency.py). Each per-op test file exposes them through a
module-level sample_inputs() -> {op table row: [Sample]}; a file whose op has no OpTester
subclass (nms, the fused batch norm, ...) builds its Samples from its own input makers.

A new op's tests (as tests/test_deform_conv2d.py; depthwise conv next): one test file with one
subclass of OpTester that sets `op`, the grids and `grad_args` (deform_conv2d: input, weight,
offset, mask, bias) and implements the hooks above; its paths and special values are methods of
its own.
Autocast rules are checked in test_autocast.py, not here.

Random inputs: tests/fuzz.py draws them per op table row (one drawer each, tests/test_fuzz.py
checks that every kernel has one) and compares with torchvision's kernels and float64.

Bad input across every op, tabulated (README "Bad input: what the package guarantees"), is
tests/test_bad_input.py: one case per entry, each expecting Raises, Stock or Differs (below) and
run by check_bad_input; test_bad_input_raises_clear_errors keeps each op's own argument checks.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
import torch
from roi_cases import DTYPES, LAYOUTS, POOLED, TOL, expected_format, make_input, make_rois

import torchvision_cpu_ext
from torchvision_cpu_ext import _registry


@contextmanager
def num_threads(n: int) -> Iterator[None]:
    """torch.set_num_threads(n) for the block, the caller's count restored after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def torchvision_kernels_loaded() -> bool:
    """Whether torchvision's own compiled kernels loaded (the override configuration): only then
    are they a reference to compare with."""
    return _registry.mode() == _registry.MODE_OVERRIDE


def seeded_randn(shape: Sequence[int], dtype: torch.dtype, seed: int = 4) -> torch.Tensor:
    """The same values in every dtype (drawn in float64, then rounded)."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def as_float64(a: Any) -> Any:
    return a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a


def _tensors(result: Any) -> tuple[torch.Tensor, ...]:
    return tuple(result) if isinstance(result, (tuple, list)) else (result,)


@dataclass(frozen=True)
class Sample:
    """One valid call of an op: fn(*args); with grad_args, also the gradients of those args for a
    seeded gradient of output(result). fn is what a user calls (a torch.ops packet, a
    torchvision function, a module)."""

    name: str
    fn: Callable[..., Any]
    args: tuple
    grad_args: tuple[int, ...] = ()
    output: Callable[[Any], torch.Tensor] = lambda result: _tensors(result)[0]


# ---- bad input: what a call must do (tests/test_bad_input.py holds the table) -------------------


@dataclass(frozen=True)
class Raises:
    """An error whose message matches `match` (it names the op and the argument)."""

    match: str


@dataclass(frozen=True)
class Stock:
    """Stock's result: equal to torchvision's own kernels where they load, and `check` holds in
    every configuration. `xfail`: a known bug of ours (the case is marked xfail(strict=True))."""

    check: Callable[[Any], bool]
    xfail: str | None = None


@dataclass(frozen=True)
class Differs:
    """A documented difference: ours meets `check`; torchvision does `stock` (crash, hang or
    garbage), so it is not run."""

    check: Callable[[Any], bool]
    stock: str


BAD_INPUT_ERRORS = (RuntimeError, ValueError, NotImplementedError)


def _assert_same(ours: Any, theirs: Any) -> None:
    if isinstance(ours, (tuple, list)) and ours and isinstance(ours[0], torch.Tensor):
        assert len(ours) == len(theirs)
        for a, b in zip(ours, theirs, strict=True):
            _assert_same(a, b)
    elif isinstance(ours, torch.Tensor):
        assert (ours.shape, ours.dtype, ours.device) == (theirs.shape, theirs.dtype, theirs.device)
        if ours.device.type != "meta":
            torch.testing.assert_close(ours, theirs, equal_nan=True)
    else:
        assert ours == theirs


def check_bad_input(call: Callable[[], Any], expect: Raises | Stock | Differs, native: bool, stock_call=None) -> None:
    """One entry of the bad-input table. Stock is torchvision's kernels (the package disabled),
    where they load, or `stock_call` (the package's own ops: ATen's equivalent) everywhere."""
    if isinstance(expect, Raises):
        with pytest.raises(BAD_INPUT_ERRORS, match=expect.match):
            call()
        return
    result = call()
    assert expect.check(result), result
    if isinstance(expect, Stock) and (stock_call is not None or native):
        if stock_call is None:
            with torchvision_cpu_ext.disabled():
                stock = call()
        else:
            stock = stock_call()
        _assert_same(result, stock)


# Reference outputs by (tester class, dtype, params): the float64 references are slow Python.
_REFERENCES: dict[tuple, Any] = {}


class OpTester:
    op: ClassVar[Any]
    dtypes: ClassVar[Sequence[torch.dtype]] = DTYPES
    layouts: ClassVar[Sequence[str]] = LAYOUTS
    params: ClassVar[dict[str, list]] = {}
    param_ids: ClassVar[dict[str, dict[Any, str]]] = {}
    parity_dtypes: ClassVar[Sequence[torch.dtype]] = (torch.float32, torch.float64)
    parity_params: ClassVar[dict[str, list] | None] = None
    parity_exact = False  # forward outputs equal torchvision's bit for bit
    gradcheck_params: ClassVar[dict[str, list]] = {}
    reduced_dtypes: ClassVar[Sequence[torch.dtype]] = (torch.bfloat16, torch.float16)
    opcheck_dtypes: ClassVar[Sequence[torch.dtype]] = (torch.float32, torch.bfloat16)
    grad_args: ClassVar[tuple[int, ...]] = (0,)
    exact = False  # the forward equals the reference bit for bit
    thread_invariant = True  # gradients equal bit for bit at every thread count (else per count)
    gradcheck_threads: ClassVar[int | None] = None  # None: the session's thread count
    equal_nan = False  # NaN outputs are expected (and must be where the reference has them)

    # ---- hooks ----------------------------------------------------------------------------

    def make_inputs(self, dtype: torch.dtype, layout: str, contiguous: bool, **params: Any) -> tuple:
        raise NotImplementedError

    def reference(self, *args: Any) -> Any:
        raise NotImplementedError

    def gradcheck_inputs(self, layout: str, **params: Any) -> tuple:
        raise NotImplementedError

    def deterministic_inputs(self, layout: str) -> tuple:
        raise NotImplementedError

    def empty_cases(self, layout: str) -> list[tuple[tuple, tuple[int, ...]]]:
        raise NotImplementedError

    def bad_cases(self) -> list[tuple[str, Callable, tuple]]:
        raise NotImplementedError

    def opcheck_cases(self, dtype: torch.dtype, layout: str) -> list[tuple[Any, tuple]]:
        raise NotImplementedError

    def output(self, result: Any) -> torch.Tensor:
        """The op's differentiable output (the first of a tuple)."""
        return _tensors(result)[0]

    def tol(self, dtype: torch.dtype) -> dict:
        return TOL[dtype]

    def parity_tol(self, dtype: torch.dtype) -> dict:
        return TOL[dtype]

    def reduced_backward_tol(self, dtype: torch.dtype) -> dict:
        return TOL[dtype]

    def assert_close(self, actual: torch.Tensor, expected: torch.Tensor, **tol: Any) -> None:
        """Every comparison within a tolerance of the shared checks: tol is a tol() dict (and
        equal_nan). An op whose errors scale with its outputs' magnitude overrides this."""
        torch.testing.assert_close(actual, expected, **tol)

    def stock_run_with_grad(self, args: tuple) -> tuple[tuple, tuple]:
        """run_with_grad on the implementation the op replaces: torchvision's own kernels. An op
        of the package's own (depthwise conv) overrides this with its stock equivalent, and
        test_matches_torchvision without the needs_native mark."""
        with torchvision_cpu_ext.disabled():
            return self.run_with_grad(args)

    def parity_backward_inputs(self, args: tuple) -> tuple:
        """The args the parity test differentiates (where torchvision's backward is right)."""
        return args

    def parity_grad_args(self, args: tuple) -> tuple[int, ...]:
        """Of grad_args, those whose gradients parity compares on args (all but where torchvision's
        backward is known not to be its forward's gradient)."""
        return self.grad_args

    def check_forward(self, result: Any, expected: Any, args: tuple, dtype: torch.dtype, layout: str) -> None:
        out = self.output(result)
        assert out.dtype == dtype
        assert self.in_layout(out, layout)
        exp = self.output(expected)
        if self.exact:
            # Rounded to dtype first: bf16 cannot hold -FLT_MAX, say (it rounds to -inf).
            assert torch.equal(out.double(), exp.to(dtype).double())
        else:
            self.assert_close(out.double(), exp, equal_nan=self.equal_nan, **self.tol(dtype))

    def in_layout(self, t: torch.Tensor, layout: str) -> bool:
        """Whether an output or gradient is dense in `layout` (the layout the op returns)."""
        return t.is_contiguous(memory_format=expected_format(layout))

    def default_params(self) -> dict[str, Any]:
        return {name: values[0] for name, values in self.params.items()}

    def sample_inputs(self) -> list[Sample]:
        """A few calls with backward: float32 and bfloat16 (of the op's dtypes) per layout at the
        default params, and deterministic_inputs (many overlapping RoIs or a wide map) per layout."""
        dtypes = [d for d in (torch.float32, torch.bfloat16) if d in self.dtypes]
        calls = [
            (f"{str(d).removeprefix('torch.')}-{layout}", self.make_inputs(d, layout, True, **self.default_params()))
            for d in dtypes
            for layout in self.layouts
        ]
        calls += [(f"deterministic-{layout}", self.deterministic_inputs(layout)) for layout in self.layouts]
        prefix = getattr(self.op, "__name__", type(self).__name__)
        return [Sample(f"{prefix}-{name}", self.op, args, self.grad_args, self.output) for name, args in calls]

    # ---- the grids ------------------------------------------------------------------------

    @pytest.fixture
    def op_kwargs(self) -> dict[str, Any]:
        """One combination of `params` (parametrized); {} where a test's grid has none."""
        return {}

    def _grid(self, test: str) -> dict[str, Any] | None:
        parity = self.params if self.parity_params is None else self.parity_params
        return {
            "test_forward_matches_reference": dict(
                dtype=self.dtypes, layout=self.layouts, contiguous=(True, False), params=self.params
            ),
            "test_matches_torchvision": dict(dtype=self.parity_dtypes, layout=self.layouts, params=parity),
            "test_gradcheck": dict(layout=self.layouts, params=self.gradcheck_params),
            "test_reduced_precision_backward": dict(dtype=self.reduced_dtypes, layout=self.layouts),
            "test_backward_is_deterministic_across_threads": dict(layout=self.layouts),
            "test_empty_input": dict(layout=self.layouts),
            "test_opcheck": dict(dtype=self.opcheck_dtypes, layout=self.layouts),
        }.get(test)

    def _params_id(self, combo: dict[str, Any]) -> str:
        return "-".join(self.param_ids.get(k, {}).get(v, f"{k}={v}") for k, v in combo.items())

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        grid = self._grid(metafunc.function.__name__)
        for name, values in (grid or {}).items():
            if name == "params":
                if values:
                    combos = [dict(zip(values, c, strict=True)) for c in itertools.product(*values.values())]
                    metafunc.parametrize("op_kwargs", combos, ids=[self._params_id(c) for c in combos])
            elif name == "contiguous":
                metafunc.parametrize("contiguous", values, ids=["contig", "strided"])
            else:
                metafunc.parametrize(name, values, ids=str)

    # ---- helpers --------------------------------------------------------------------------

    def _reference(self, dtype: torch.dtype, params: dict[str, Any]) -> Any:
        return self._reference_of(
            (dtype, tuple(params.items())),
            lambda: self.reference(*self.make_inputs(dtype, self.layouts[0], True, **params)),
        )

    def _reference_of(self, key: tuple, compute: Callable[[], Any]) -> Any:
        """compute(), once per process for this tester and key."""
        key = (type(self), *key)
        if key not in _REFERENCES:
            _REFERENCES[key] = compute()
        return _REFERENCES[key]

    def run_with_grad(self, args: tuple, grad_dtype: torch.dtype | None = None) -> tuple[tuple, tuple]:
        """The op's outputs and the gradients of grad_args for a seeded output gradient (drawn
        in float64, rounded to grad_dtype, then given in the output's dtype)."""
        args = list(args)
        for i in self.grad_args:
            if args[i] is not None:  # an optional tensor left out (no bias): its gradient is None
                args[i] = args[i].detach().requires_grad_()
        result = self.op(*args)
        out = self.output(result)
        out.backward(seeded_randn(out.shape, grad_dtype or out.dtype).to(out.dtype))
        grads = tuple(None if args[i] is None else args[i].grad for i in self.grad_args)
        return tuple(t.detach() for t in _tensors(result)), grads

    # ---- the checks -----------------------------------------------------------------------

    def test_forward_matches_reference(self, dtype, layout, contiguous, op_kwargs, threads):
        args = self.make_inputs(dtype, layout, contiguous, **op_kwargs)
        self.check_forward(self.op(*args), self._reference(dtype, op_kwargs), args, dtype, layout)

    @pytest.mark.needs_native
    def test_matches_torchvision(self, dtype, layout, op_kwargs, threads):
        args = self.make_inputs(dtype, layout, True, **op_kwargs)
        backward_args = self.parity_backward_inputs(args)
        tv_outs, tv_grads = self.stock_run_with_grad(args)
        if backward_args is not args:
            _, tv_grads = self.stock_run_with_grad(backward_args)
        outs, grads = self.run_with_grad(args)
        if backward_args is not args:
            _, grads = self.run_with_grad(backward_args)
        for ours, theirs in zip(outs, tv_outs, strict=True):
            if self.parity_exact or not ours.is_floating_point():
                assert torch.equal(ours, theirs)
            else:
                self.assert_close(ours, theirs, equal_nan=self.equal_nan, **self.parity_tol(dtype))
        compared = self.parity_grad_args(backward_args)
        for i, ours, theirs in zip(self.grad_args, grads, tv_grads, strict=True):
            if i in compared and theirs is not None:
                self.assert_close(ours, theirs, **self.parity_tol(dtype))
        assert self.in_layout(grads[0], layout)

    def test_gradcheck(self, layout, op_kwargs):
        args = list(self.gradcheck_inputs(layout, **op_kwargs))

        def f(*leaves):
            for i, leaf in zip(self.grad_args, leaves, strict=True):
                args[i] = leaf
            return self.output(self.op(*args))

        leaves = [args[i].detach().requires_grad_() for i in self.grad_args]
        with num_threads(self.gradcheck_threads or torch.get_num_threads()):
            assert torch.autograd.gradcheck(f, leaves, fast_mode=False)

    def test_reduced_precision_backward(self, dtype, layout, threads):
        args = self.make_inputs(dtype, layout, True, **self.default_params())
        _, grads = self.run_with_grad(args)
        _, expected = self.run_with_grad(tuple(as_float64(a) for a in args), grad_dtype=dtype)
        for grad, exp in zip(grads, expected, strict=True):
            assert grad.dtype == dtype
            self.assert_close(grad.double(), exp, **self.reduced_backward_tol(dtype))
        assert self.in_layout(grads[0], layout)

    def test_backward_is_deterministic_across_threads(self, layout):
        args = self.deterministic_inputs(layout)
        grads = []
        before = torch.get_num_threads()
        try:
            for n in (1, 2, 1, 2):
                torch.set_num_threads(n)
                grads.append(self.run_with_grad(args)[1])
        finally:
            torch.set_num_threads(before)
        # Every run against the first, or (not thread_invariant) against the first at its count.
        pairs = [(0, i) for i in (1, 2, 3)] if self.thread_invariant else [(0, 2), (1, 3)]
        for i, j in pairs:
            assert all(torch.equal(a, b) for a, b in zip(grads[i], grads[j], strict=True))

    def test_empty_input(self, layout):
        for args, shape in self.empty_cases(layout):
            outs, grads = self.run_with_grad(args)
            assert all(t.shape == shape for t in outs), (shape, [t.shape for t in outs])
            for i, grad in zip(self.grad_args, grads, strict=True):
                assert torch.equal(grad, torch.zeros_like(args[i]))

    def test_bad_input_raises_clear_errors(self):
        for match, fn, args in self.bad_cases():
            with pytest.raises(RuntimeError, match=match):
                fn(*args)

    @pytest.mark.variant_independent
    def test_opcheck(self, dtype, layout):
        for op, args in self.opcheck_cases(dtype, layout):
            torch.library.opcheck(op, args)


class RoIOpTester(OpTester):
    """The RoI ops: a feature map and boxes from roi_cases (boxes partly and fully outside,
    degenerate, inverted). A subclass gives op_args and backward_args (the op's and its backward
    op's argument order) and its reference, gradcheck inputs and bad cases."""

    backward_op: ClassVar[Any]
    channels = 5  # of make_inputs' map (roi_cases.C)
    out_channels = 5
    deterministic_params: ClassVar[dict[str, Any] | None] = None  # None: default_params()

    def op_args(self, x: torch.Tensor, rois: torch.Tensor, **params: Any) -> tuple:
        raise NotImplementedError

    def backward_args(self, args: tuple, result: Any, grad: torch.Tensor) -> tuple:
        raise NotImplementedError

    def make_inputs(self, dtype, layout, contiguous, **params):
        x = make_input(dtype, layout, contiguous, channels=self.channels)
        return self.op_args(x, make_rois(dtype=dtype), **params)

    def deterministic_inputs(self, layout):
        # Many overlapping boxes: every pixel receives gradient from several ROIs.
        x = make_input(torch.float32, layout, True, channels=self.channels)
        rois = torch.cat([make_rois(K=60, seed=s) for s in range(4)])
        params = self.default_params() if self.deterministic_params is None else self.deterministic_params
        return self.op_args(x, rois, **params)

    def empty_cases(self, layout):
        x = make_input(torch.float32, layout, True, channels=self.channels)
        return [(self.op_args(x, torch.zeros(0, 5), **self.default_params()), (0, self.out_channels, *POOLED))]

    def opcheck_cases(self, dtype, layout):
        x = make_input(dtype, layout, True, channels=self.channels)
        x.requires_grad_(dtype in (torch.float32, torch.float64))
        args = self.op_args(x, make_rois(K=4, dtype=dtype), **self.default_params())
        with torch.no_grad():
            result = self.op(*args)
        grad = torch.randn_like(self.output(result))  # in the output's memory format
        return [(self.op, args), (self.backward_op, self.backward_args(args, result, grad))]
