"""torchvision.ops.FrozenBatchNorm2d on our fused kernel: torchvision's values bit for bit."""

from __future__ import annotations

import pytest
import torch
from op_tester import Sample
from torch._inductor import config as inductor_config
from torchvision.ops import FrozenBatchNorm2d

import torchvision_cpu_ext
from torchvision_cpu_ext.ops import frozen_batch_norm as fbn

OP = torch.ops.torchvision_cpu_ext.frozen_batch_norm
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
LAYOUTS = ["nchw", "channels_last", "strided"]


def fill(m: torch.nn.Module, channels: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Module:
    """Seeded frozen statistics for any FrozenBatchNorm2d-like module (detectron2's too)."""
    g = torch.Generator().manual_seed(seed)
    m.weight.copy_(torch.randn(channels, generator=g))
    m.bias.copy_(torch.randn(channels, generator=g))
    m.running_mean.copy_(torch.randn(channels, generator=g))
    m.running_var.copy_(torch.rand(channels, generator=g) * 3)
    m.running_var[0] = 0.0  # eps alone
    return m.to(dtype)


def make_module(channels: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> FrozenBatchNorm2d:
    return fill(FrozenBatchNorm2d(channels), channels, dtype, seed)


def make_input(shape, dtype: torch.dtype, layout: str, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if layout == "strided":  # every other column of a wider map: no suggested format is dense
        n, c, h, w = shape
        return (torch.randn(n, c, h, 2 * w, generator=g) * 4).to(dtype)[..., ::2]
    x = (torch.randn(shape, generator=g) * 4).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def torchvision_forward(m: FrozenBatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """torchvision's own FrozenBatchNorm2d.forward (what the override replaced)."""
    original = fbn._state["original"] or FrozenBatchNorm2d.forward
    return original(m, x)


def run_module(m: FrozenBatchNorm2d, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """m(x) for inference, and whether the fused op ran (read from the profiler's events)."""
    with torch.inference_mode(), torch.profiler.profile() as prof:
        out = m(x)
    return out, any(e.name == "torchvision_cpu_ext::frozen_batch_norm" for e in prof.events())


def float64_reference(m: FrozenBatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    scale = m.weight.double() / (m.running_var.double() + m.eps).sqrt()
    shift = m.bias.double() - m.running_mean.double() * scale
    return x.double() * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)


def test_module_forward_is_ours_while_enabled():
    assert FrozenBatchNorm2d.forward is fbn.forward


@pytest.mark.needs_native
def test_disable_gives_torchvisions_forward_back():
    with torchvision_cpu_ext.disabled():
        assert FrozenBatchNorm2d.forward is not fbn.forward
    assert FrozenBatchNorm2d.forward is fbn.forward


@pytest.mark.needs_fallback
def test_fallback_keeps_the_fused_forward():
    """Without torchvision's compiled ops there is nothing to give back: disable() refuses and
    the module keeps our forward."""
    with pytest.raises(RuntimeError, match="no torchvision kernels to give back"):
        torchvision_cpu_ext.disable()
    assert FrozenBatchNorm2d.forward is fbn.forward


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 35, 9, 13), (1, 64, 4, 5), (3, 3, 1, 1), (0, 8, 5, 5), (2, 8, 0, 3)])
def test_equals_torchvision_bitwise(shape, dtype, layout, threads):
    m = make_module(shape[1])
    x = make_input(shape, dtype, layout)
    expected = torchvision_forward(m, x)
    direct = OP(x, m.weight, m.bias, m.running_mean, m.running_var, m.eps)
    out, fused = run_module(m, x)
    assert fused  # the module ran our op, not torchvision's expression
    assert out.dtype == direct.dtype == expected.dtype  # the promoted dtype: float32 for a bfloat16 input
    assert torch.equal(out, expected) and torch.equal(direct, expected)
    if layout == "channels_last" and out.numel():
        assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out.double(), float64_reference(m, x), rtol=1e-5, atol=1e-5)


def test_float64_buffers_and_input():
    m = make_module(7, torch.float64)
    x = make_input((2, 7, 5, 6), torch.float64, "nchw")
    out, fused = run_module(m, x)
    assert fused and torch.equal(out, torchvision_forward(m, x))


def test_float32_buffers_float64_input():
    m = make_module(7)
    x = make_input((2, 7, 5, 6), torch.float64, "channels_last")
    out = OP(x, m.weight, m.bias, m.running_mean, m.running_var, m.eps)
    assert out.dtype == torch.float64 and torch.equal(out, torchvision_forward(m, x))


@pytest.mark.parametrize("buffers", [torch.bfloat16, torch.float16], ids=str)
def test_reduced_precision_buffers_use_torchvisions_expression(buffers):
    m = make_module(6, buffers)
    x = make_input((1, 6, 4, 4), buffers, "nchw")
    out, fused = run_module(m, x)
    assert not fused and torch.equal(out, torchvision_forward(m, x))


def test_inputs_the_kernel_does_not_take_get_torchvisions_result():
    m = make_module(5)
    m.running_var.data = m.running_var.double()  # mixed buffer dtypes: torchvision promotes
    x = make_input((2, 5, 4, 4), torch.float32, "nchw")
    out, fused = run_module(m, x)
    assert not fused and out.dtype == torch.float64 and torch.equal(out, torchvision_forward(m, x))
    one = make_module(1)  # one-channel buffers broadcast over a 5-channel input
    out, fused = run_module(one, x)
    assert not fused and torch.equal(out, torchvision_forward(one, x))
    out, fused = run_module(make_module(5), make_input((2, 5, 4, 4), torch.float32, "nchw")[:, :1])
    assert not fused and out.shape == (2, 5, 4, 4)  # and a one-channel input over five-channel buffers


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autocast_keeps_reduced_precision(dtype, layout, threads):
    m = make_module(40)
    x = make_input((2, 40, 6, 7), dtype, layout)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)
    assert out.dtype == dtype  # torchvision's expression returns float32 here
    assert torch.equal(out, torchvision_forward(m, x).to(dtype))  # one rounding of the exact result
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert m(x.float()).dtype == torch.float32  # a float32 input is left alone


def test_grad_mode_and_forward_ad_use_torchvisions_expression():
    m = make_module(5, torch.float64)
    x = make_input((2, 5, 4, 4), torch.float64, "nchw")
    # A buffer that requires grad (the input does not): its gradient is torchvision's.
    m.weight.requires_grad_()
    m(x).sum().backward()
    g_ours = m.weight.grad.clone()
    m.weight.grad = None
    torchvision_forward(m, x).sum().backward()
    assert torch.equal(g_ours, m.weight.grad)
    m.weight.requires_grad_(False)
    # Forward AD, and torch.func transforms built on it.
    t = torch.randn_like(x)
    with torch.autograd.forward_ad.dual_level():
        tangent = torch.autograd.forward_ad.unpack_dual(m(torch.autograd.forward_ad.make_dual(x, t))).tangent
    assert tangent is not None and torch.allclose(tangent, torchvision_forward(m, t) - torchvision_forward(m, 0 * t))
    jac = torch.func.jacfwd(lambda a: m(a).sum())(x)
    assert torch.allclose(jac, torchvision_forward(m, torch.ones_like(x)) - torchvision_forward(m, torch.zeros_like(x)))


def test_autograd_uses_torchvisions_expression():
    m = make_module(5)
    x = make_input((2, 5, 4, 4), torch.float64, "nchw").requires_grad_()
    out = m(x)
    assert out.grad_fn is not None
    (g,) = torch.autograd.grad(out.sum(), x)
    (g_ref,) = torch.autograd.grad(torchvision_forward(m, x).sum(), x)
    assert torch.equal(g, g_ref)
    assert torch.autograd.gradcheck(lambda t: m(t), (x,))


@pytest.mark.variant_independent
def test_opcheck():
    m = make_module(16)
    for x in (
        make_input((2, 16, 5, 7), torch.float32, "nchw"),
        make_input((1, 16, 3, 3), torch.bfloat16, "channels_last"),
    ):
        torch.library.opcheck(OP, (x, m.weight, m.bias, m.running_mean, m.running_var, m.eps))
        torch.library.opcheck(OP, (x, m.weight, m.bias, m.running_mean, m.running_var, m.eps, x.dtype))


@pytest.mark.variant_independent
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_torch_compile(layout):
    m = make_module(24)
    x = make_input((2, 24, 9, 11), torch.float32, layout)
    # cpp.simdlen=1: see test_roi_align.py (Inductor's vectorized codegen crashes on this CPU).
    with inductor_config.patch({"cpp.simdlen": 1}), torch.inference_mode():
        torch._dynamo.reset()
        out = torch.compile(m, fullgraph=True)(x)
    assert torch.equal(out, torchvision_forward(m, x))


def test_bad_inputs():
    m = make_module(4)
    args = (m.weight, m.bias, m.running_mean, m.running_var, m.eps)
    with pytest.raises(RuntimeError, match="input must be a 4-D tensor"):
        OP(torch.randn(4, 5, 5), *args)
    with pytest.raises(RuntimeError, match=r"running_var must have shape \[C\] = \[3\]"):
        OP(torch.randn(1, 3, 5, 5), m.weight[:3], m.bias[:3], m.running_mean[:3], m.running_var, m.eps)
    with pytest.raises(RuntimeError, match="bias must have weight's dtype"):
        OP(torch.randn(1, 4, 2, 2), m.weight, m.bias.double(), m.running_mean, m.running_var, m.eps)
    with pytest.raises(RuntimeError, match="input must be float32, float64, bfloat16 or float16"):
        OP(torch.ones(1, 4, 2, 2, dtype=torch.int32), *args)
    with pytest.raises(RuntimeError, match="weight and buffers must be float32"):
        d = [t.double() for t in args[:4]]
        OP(torch.randn(1, 4, 2, 2), *d, m.eps)
    with pytest.raises(RuntimeError, match="dtype must be the input's"):
        OP(torch.randn(1, 4, 2, 2), *args, torch.float16)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="must match"):
        m(torch.randn(1, 5, 2, 2))  # channels that do not broadcast: torchvision's own error


def test_torchscript():
    # torchvision's detection models can be scripted; the replaced forward must script too.
    m = make_module(6)
    x = make_input((2, 6, 5, 4), torch.float32, "channels_last")
    m.eps = 1  # an int eps scripts with torchvision's forward, so it must with ours
    scripted = torch.jit.script(m)
    # A scripted module keeps torchvision's expression: it runs without this package.
    assert "torchvision_cpu_ext" not in scripted.code
    with torch.inference_mode():
        assert torch.equal(scripted(x), torchvision_forward(m, x))


def sample_inputs() -> dict[str, list[Sample]]:
    """FrozenBatchNorm2d's calls (the fused op runs under no_grad or inference_mode), for the
    checks that run every op of the op table alike (op_tester.Sample)."""
    return {
        "frozen_batch_norm": [
            Sample(f"FrozenBatchNorm2d-{str(dtype).removeprefix('torch.')}-{layout}", make_module(24, dtype), (x,))
            for dtype in (torch.float32, torch.bfloat16)
            for layout in LAYOUTS
            for x in [make_input((2, 24, 9, 11), dtype, layout)]
        ]
    }
