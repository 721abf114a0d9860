"""detectron2's FrozenBatchNorm2d on the fused op (as_batch_norm=True): F.batch_norm's values bit
for bit, patched at enable() or on import, given back by disable().

The op and the patching mechanism are tested without detectron2 (the op against F.batch_norm, the
import hook against a stand-in module with detectron2's forward); the tests at the bottom need
detectron2 itself and skip where it is not importable (CI has no detectron2).
"""

from __future__ import annotations

import importlib
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from test_frozen_batch_norm import fill, make_input

import torchvision_cpu_ext
from torchvision_cpu_ext.ops import frozen_batch_norm as fbn

OP = torch.ops.torchvision_cpu_ext.frozen_batch_norm
OP_NAME = "torchvision_cpu_ext::frozen_batch_norm"

# detectron2.layers.FrozenBatchNorm2d's forward, restated: its own expression in x's dtype when
# x requires grad, else F.batch_norm on the frozen statistics.
STAND_IN = textwrap.dedent(
    """
    import torch
    import torch.nn.functional as F
    from torch import nn


    class FrozenBatchNorm2d(nn.Module):
        def __init__(self, num_features, eps=1e-5):
            super().__init__()
            self.eps = eps
            self.register_buffer("weight", torch.ones(num_features))
            self.register_buffer("bias", torch.zeros(num_features))
            self.register_buffer("running_mean", torch.zeros(num_features))
            self.register_buffer("running_var", torch.ones(num_features) - eps)

        def forward(self, x):
            if x.requires_grad:
                scale = self.weight * (self.running_var + self.eps).rsqrt()
                bias = self.bias - self.running_mean * scale
                return x * scale.reshape(1, -1, 1, 1).to(x.dtype) + bias.reshape(1, -1, 1, 1).to(x.dtype)
            return F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, training=False, eps=self.eps
            )
    """
)


def run(m: torch.nn.Module, x: torch.Tensor, autocast: bool = False) -> tuple[torch.Tensor, bool]:
    """m(x) for inference, and whether the fused op ran."""
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)
    with torch.inference_mode(), amp, torch.profiler.profile() as prof:
        out = m(x)
    return out, any(e.name == OP_NAME for e in prof.events())


def original(m: torch.nn.Module, x: torch.Tensor, autocast: bool = False) -> torch.Tensor:
    """The class's own forward (what the override replaced), as run() runs it."""
    forward = fbn._state["d2_original"] or type(m).forward
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        return forward(m, x)


# -- the op's as_batch_norm rounding, against F.batch_norm (no detectron2 needed) ------------------


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(2, 35, 9, 13), (1, 64, 4, 5), (2, 3, 1, 1), (1, 17, 1, 7), (0, 8, 5, 5)])
def test_as_batch_norm_equals_f_batch_norm_bitwise(shape, dtype, layout, threads):
    buffers = torch.float64 if dtype == torch.float64 else torch.float32
    w, b, mean, var = (t.to(buffers) for t in torch.randn(4, shape[1]))
    var = var.abs() * 3
    var[0] = 0.0
    x = make_input(shape, dtype, layout)
    with torch.inference_mode():
        expected = F.batch_norm(x, mean, var, w, b, training=False, eps=1e-5)
        out = OP(x, w, b, mean, var, 1e-5, x.dtype, True)
    assert out.dtype == expected.dtype == dtype
    assert torch.equal(out, expected)
    if layout == "channels_last" and out.numel():
        assert out.is_contiguous(memory_format=torch.channels_last)


def test_as_batch_norm_rejects_float32_buffers_with_float64_input():
    w = torch.ones(3)
    with pytest.raises(RuntimeError, match="as_batch_norm takes"):
        OP(torch.ones(1, 3, 2, 2, dtype=torch.float64), w, w, w, w, 1e-5, None, True)


def test_as_batch_norm_opcheck():
    w, b, mean, var = torch.randn(4, 16)
    var = var.abs()
    for x in (
        make_input((2, 16, 5, 7), torch.float32, "nchw"),
        make_input((1, 16, 3, 3), torch.bfloat16, "channels_last"),
    ):
        torch.library.opcheck(OP, (x, w, b, mean, var, 1e-5, x.dtype, True))


# -- the patching mechanism, on a stand-in module (no detectron2 needed) ----------------------------


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    """A module `tvce_stand_in_bn` with detectron2's FrozenBatchNorm2d, watched as detectron2's
    batch_norm module is, imported by the test (not yet imported when it starts)."""
    name = "tvce_stand_in_bn"
    (tmp_path / f"{name}.py").write_text(STAND_IN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    # The detectron2 part of enable() / disable() directly: in the fallback configuration
    # disable() refuses, and each test needs a fresh patch of its own stand-in module.
    fbn._unregister_d2()
    monkeypatch.setattr(fbn, "D2_MODULE", name)
    fbn._register_d2()  # the hook now watches the stand-in
    yield name
    fbn._unregister_d2()
    monkeypatch.undo()
    sys.modules.pop(name, None)
    fbn._register_d2()


def test_import_hook_patches_on_import_and_disable_restores(stand_in, native):
    mod = importlib.import_module(stand_in)
    cls = mod.FrozenBatchNorm2d
    assert fbn.is_d2_forward(cls.forward)
    m = fill(cls(40), 40)
    for layout in ("nchw", "channels_last"):
        x = make_input((2, 40, 6, 7), torch.float32, layout)
        out, fused = run(m, x)
        assert fused and torch.equal(out, original(m, x))
    if native:
        with torchvision_cpu_ext.disabled():
            assert not fbn.is_d2_forward(cls.forward) and fbn._state["d2_hook"] not in sys.meta_path
            out, fused = run(m, x)
            assert not fused
        assert fbn.is_d2_forward(cls.forward)  # already imported: patched by enable() itself


@pytest.mark.needs_native  # disable() refuses without torchvision's compiled ops
def test_enable_patches_an_already_imported_module(stand_in):
    with torchvision_cpu_ext.disabled():
        mod = importlib.import_module(stand_in)
        assert not fbn.is_d2_forward(mod.FrozenBatchNorm2d.forward)
    assert fbn.is_d2_forward(mod.FrozenBatchNorm2d.forward)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("autocast", [False, True], ids=["plain", "autocast"])
def test_stand_in_equals_its_forward_bitwise(stand_in, dtype, layout, autocast):
    m = fill(
        importlib.import_module(stand_in).FrozenBatchNorm2d(35),
        35,
        torch.float64 if dtype == torch.float64 else torch.float32,
    )
    x = make_input((2, 35, 9, 13), dtype, layout)
    out, fused = run(m, x, autocast)
    expected = original(m, x, autocast)
    assert fused and out.dtype == expected.dtype == dtype and torch.equal(out, expected)


def test_stand_in_inputs_the_op_does_not_take_run_the_original(stand_in):
    m = fill(importlib.import_module(stand_in).FrozenBatchNorm2d(6), 6)
    strided = make_input((2, 6, 5, 5), torch.float32, "strided")
    out, fused = run(m, strided)
    assert not fused and torch.equal(out, original(m, strided))
    # An input that requires grad: detectron2's own expression (and its gradient).
    x = make_input((2, 6, 5, 5), torch.float32, "nchw").requires_grad_()
    with torch.profiler.profile() as prof:
        out = m(x)
    assert out.grad_fn is not None and not any(e.name == OP_NAME for e in prof.events())
    assert torch.equal(out, fbn._state["d2_original"](m, x))
    # Grad mode on, with an input that does not require grad: F.batch_norm, as before.
    x = make_input((2, 6, 5, 5), torch.float32, "nchw")
    with torch.profiler.profile() as prof:
        out = m(x)
    assert not any(e.name == OP_NAME for e in prof.events()) and torch.equal(out, fbn._state["d2_original"](m, x))


def test_stand_in_scripted_module_keeps_its_forward(stand_in):
    m = fill(importlib.import_module(stand_in).FrozenBatchNorm2d(6), 6)
    x = make_input((1, 6, 4, 4), torch.float32, "nchw")
    scripted = torch.jit.script(m)  # compiles the class's own forward (its source, its globals)
    assert "batch_norm" in scripted.code and "torchvision_cpu_ext" not in scripted.code
    with torch.inference_mode():
        assert torch.equal(scripted(x), original(m, x))


# -- detectron2 itself (skipped where it is not importable) --------------------------------------


@pytest.fixture
def d2_layers():
    return pytest.importorskip("detectron2.layers")


def test_detectron2_class_is_patched_and_restored(d2_layers, native):
    cls = d2_layers.FrozenBatchNorm2d
    assert fbn.is_d2_forward(cls.forward)
    assert torchvision_cpu_ext.info()["python"]["detectron2 FrozenBatchNorm2d.forward"] == "torchvision_cpu_ext"
    if native:
        with torchvision_cpu_ext.disabled():
            assert cls.forward.__module__ == "detectron2.layers.batch_norm" and not fbn.is_d2_forward(cls.forward)
            assert torchvision_cpu_ext.info()["python"]["detectron2 FrozenBatchNorm2d.forward"] == "detectron2"
        assert fbn.is_d2_forward(cls.forward)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("autocast", [False, True], ids=["plain", "autocast"])
def test_detectron2_equals_its_forward_bitwise(d2_layers, dtype, layout, autocast, threads):
    buffers = torch.float64 if dtype == torch.float64 else torch.float32
    for shape in [(2, 35, 9, 13), (1, 64, 4, 5), (2, 256, 1, 1)]:
        m = fill(d2_layers.FrozenBatchNorm2d(shape[1]), shape[1], buffers)
        x = make_input(shape, dtype, layout)
        out, fused = run(m, x, autocast)
        expected = original(m, x, autocast)
        assert fused and out.dtype == expected.dtype == dtype and torch.equal(out, expected)


def test_detectron2_requires_grad_runs_its_expression(d2_layers):
    m = fill(d2_layers.FrozenBatchNorm2d(5), 5, torch.float64)
    x = make_input((2, 5, 4, 4), torch.float64, "nchw").requires_grad_()
    out = m(x)
    (g,) = torch.autograd.grad(out.sum(), x)
    (g_ref,) = torch.autograd.grad(fbn._state["d2_original"](m, x).sum(), x)
    assert torch.equal(g, g_ref)
