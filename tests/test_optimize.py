"""torchvision_cpu_ext.optimize(): the depthwise swap, the batch-norm fold, dtype and layout, and
what it must leave alone (torchvision_cpu_ext/_optimize.py)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

import torchvision_cpu_ext
from torchvision_cpu_ext import DepthwiseConv1d, DepthwiseConv2d, _optimize, optimize

OPS = {1: "torchvision_cpu_ext::depthwise_conv1d", 2: "torchvision_cpu_ext::depthwise_conv2d"}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    """Equal within float rounding, relative to the expected values' scale."""
    scale = expected.detach().abs().max().item() or 1.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale)


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Batch norms with statistics and affine parameters far from the identity, so a fold is
    visible in every value."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm | FrozenBatchNorm2d) and m.running_mean is not None:
            n = m.running_mean.numel()
            with torch.no_grad():
                m.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
                m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.25)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                    m.bias.copy_(torch.rand(n, generator=g) - 0.5)
    return model


def op_names(fn) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events()}


# (dims, in_channels, multiplier, kernel_size, keyword arguments of nn.Conv1d/2d)
DEPTHWISE = {
    "seed": (1, 64, 1, 3, dict(padding=1)),
    "1d_m2_k5_circular": (1, 6, 2, 5, dict(padding=2, padding_mode="circular", bias=False)),
    "1d_valid_s2": (1, 6, 1, 3, dict(padding="valid", stride=2)),
    "1d_same_k4": (1, 6, 1, 4, dict(padding="same")),
    "2d_k3": (2, 8, 1, 3, dict(padding=1, bias=False)),
    "2d_m2_k3": (2, 8, 2, 3, dict(padding=1)),
    "2d_k5_s2": (2, 8, 1, 5, dict(padding=2, stride=2)),
    "2d_k7": (2, 8, 1, 7, dict(padding=3)),
    "2d_1x5": (2, 8, 1, (1, 5), dict(padding=(0, 2))),
    "2d_dilation2": (2, 8, 1, 3, dict(padding=2, dilation=2, bias=False)),
    "2d_reflect": (2, 8, 1, 3, dict(padding=1, padding_mode="reflect")),
    "2d_replicate_s2": (2, 8, 2, 3, dict(padding=(1, 2), padding_mode="replicate", stride=(2, 1))),
    "2d_same": (2, 8, 1, 3, dict(padding="same", dilation=(1, 2))),
    "2d_same_k4": (2, 8, 1, (4, 3), dict(padding="same", bias=False)),
    "2d_one_channel": (2, 1, 8, 3, dict(padding=1)),  # groups == in_channels == 1: multiplier 8
    "2d_reflect_no_padding": (2, 8, 1, 3, dict(padding_mode="reflect")),
}


def depthwise(name: str) -> tuple[nn.Module, torch.Tensor]:
    dims, c, mult, k, kwargs = DEPTHWISE[name]
    torch.manual_seed(0)
    conv = (nn.Conv1d if dims == 1 else nn.Conv2d)(c, c * mult, k, groups=c, **kwargs)
    x = torch.randn((2, c, 40) if dims == 1 else (2, c, 13, 11))
    return conv, x


@pytest.mark.parametrize("name", DEPTHWISE)
def test_depthwise_swap_matches_conv(name):
    conv, x = depthwise(name)
    ref = copy.deepcopy(conv)
    params = dict(conv.named_parameters())
    keys = list(conv.state_dict())
    assert optimize(conv) is conv
    dims = x.dim() - 2
    assert type(conv) is (DepthwiseConv1d if dims == 1 else DepthwiseConv2d)
    assert isinstance(conv, nn.Conv1d if dims == 1 else nn.Conv2d)
    assert all(p is params[n] for n, p in conv.named_parameters()) and len(params) == len(list(conv.parameters()))
    assert list(conv.state_dict()) == keys
    names = op_names(lambda: conv(x))
    assert OPS[dims] in names and "aten::convolution" not in names
    assert_close(conv(x), ref(x))

    # Gradients flow through the op to the input, the weight and the bias.
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    grad = torch.randn_like(ref(x))
    conv(xa).backward(grad)
    ref(xb).backward(grad)
    assert_close(xa.grad, xb.grad)
    for p, q in zip(conv.parameters(), ref.parameters(), strict=True):
        assert_close(p.grad, q.grad)


def test_depthwise_channels_last_and_dtypes():
    conv, x = depthwise("2d_m2_k3")
    ref = copy.deepcopy(conv)
    optimize(conv)
    xc = x.contiguous(memory_format=torch.channels_last)
    out = conv(xc)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close(out, ref(x))
    conv.double()
    ref.double()
    assert OPS[2] in op_names(lambda: conv(x.double()))
    assert_close(conv(x.double()), ref(x.double()), rtol=1e-12)
    # bfloat16 autocast: the op casts as ATen's convolution does.
    conv.float()
    ref.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        names = op_names(lambda: conv(x))
        out, expected = conv(x), ref(x)
    assert OPS[2] in names and out.dtype == expected.dtype == torch.bfloat16
    assert_close(out.float(), expected.float(), rtol=2e-2)


def test_depthwise_falls_back_to_conv_forward():
    conv, x = depthwise("2d_reflect")
    ref = copy.deepcopy(conv)
    optimize(conv)
    # Unbatched input: nn.Conv2d's forward, the same values bit for bit.
    assert OPS[2] not in op_names(lambda: conv(x[0]))
    assert torch.equal(conv(x[0]), ref(x[0]))
    # An input dtype other than the weight's outside autocast: nn.Conv2d's error.
    with pytest.raises(RuntimeError) as expected_error:
        ref(x.double())
    with pytest.raises(RuntimeError) as error:
        conv(x.double())
    assert str(error.value) == str(expected_error.value)
    # Forward-mode AD, which the op does not implement.
    tangent = torch.randn_like(x)
    with fwAD.dual_level():
        out = fwAD.unpack_dual(conv(fwAD.make_dual(x, tangent)))
        expected = fwAD.unpack_dual(ref(fwAD.make_dual(x, tangent)))
    assert torch.equal(out.primal, expected.primal) and torch.equal(out.tangent, expected.tangent)

    # torch.func transforms, which the op's C++ autograd kernel does not take.
    params = {k: v.detach() for k, v in ref.named_parameters()}

    def grad(m):
        return torch.func.grad(lambda p: torch.func.functional_call(m, p, (x,)).square().sum())(params)["weight"]

    assert OPS[2] not in op_names(lambda: grad(conv))
    assert torch.equal(grad(conv), grad(ref))

    # A computed weight (a parametrization) runs nn.Conv2d's forward with it.
    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    torch.nn.utils.parametrize.register_parametrization(conv, "weight", Double())
    torch.nn.utils.parametrize.register_parametrization(ref, "weight", Double())
    assert isinstance(conv, DepthwiseConv2d) and OPS[2] not in op_names(lambda: conv(x))
    assert torch.equal(conv(x), ref(x))


def test_double_backward_refuses():
    """A gradient of the gradient is not implemented: a clear error, never zeros."""
    conv, x = depthwise("2d_k3")
    optimize(conv)
    x.requires_grad_()
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(conv(x).square().sum(), x, create_graph=True)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_scripted_module_runs_conv_forward():
    conv, x = depthwise("2d_same_k4")
    ref = copy.deepcopy(conv)
    scripted = torch.jit.script(optimize(conv))
    assert "_conv_forward" in scripted.code and "depthwise" not in scripted.code
    assert torch.equal(scripted(x), ref(x))


def test_compiles_in_one_graph():
    model = optimize(nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, groups=8), nn.BatchNorm2d(16)).eval())
    x = torch.randn(2, 8, 10, 10)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert_close(compiled(x), model(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert_close(compiled(x).float(), model(x).float(), rtol=1e-2)


def test_depthwise_module_built_directly():
    conv = DepthwiseConv1d(4, 8, 3, padding=1, groups=4)
    x = torch.randn(1, 4, 10)
    assert_close(conv(x), nn.functional.conv1d(x, conv.weight, conv.bias, padding=1, groups=4))
    assert_close(copy.deepcopy(conv)(x), conv(x))
    with pytest.raises(ValueError, match="groups == in_channels"):
        DepthwiseConv2d(4, 8, 3, groups=2)


def test_left_alone_by_the_swap():
    class MyConv(nn.Conv2d):
        pass

    model = nn.Sequential(
        nn.Conv2d(4, 8, 3, groups=2),  # grouped, not depthwise
        MyConv(8, 8, 3, groups=8),  # a subclass: its forward may be its own
        nn.ConvTranspose2d(8, 8, 3, groups=8),
    )
    types = [type(m) for m in model]
    optimize(model)
    assert [type(m) for m in model] == types


def conv_bn(dims: int, bn: nn.Module, *, conv_bias: bool = False, depthwise: bool = False) -> nn.Sequential:
    c = bn.running_mean.numel()
    cin = c if depthwise else c // 2
    conv = (nn.Conv1d if dims == 1 else nn.Conv2d)(cin, c, 3, padding=1, groups=cin if depthwise else 1, bias=conv_bias)
    return randomize_norms(nn.Sequential(conv, bn, nn.ReLU()))


FOLDS = {
    "bn2d": lambda: conv_bn(2, nn.BatchNorm2d(8)),
    "bn2d_conv_bias": lambda: conv_bn(2, nn.BatchNorm2d(8), conv_bias=True),
    "bn2d_not_affine": lambda: conv_bn(2, nn.BatchNorm2d(8, affine=False)),
    "bn2d_depthwise": lambda: conv_bn(2, nn.BatchNorm2d(8), depthwise=True),
    "frozen_bn": lambda: conv_bn(2, FrozenBatchNorm2d(8)),
    "bn1d": lambda: conv_bn(1, nn.BatchNorm1d(8), conv_bias=True),
    "bn1d_depthwise": lambda: conv_bn(1, nn.BatchNorm1d(8), depthwise=True),
}


@pytest.mark.parametrize("name", FOLDS)
def test_fold_in_eval(name):
    model = FOLDS[name]().eval()
    ref = copy.deepcopy(model)
    conv = model[0]
    weight, had_bias = conv.weight, conv.bias is not None
    x = torch.randn((2, model[0].in_channels) + ((24,) if isinstance(conv, nn.Conv1d) else (9, 10)))
    optimize(model)
    assert isinstance(model[1], nn.Identity) and model[0] is conv and conv.weight is weight
    assert conv.bias is not None and conv.bias.dtype == weight.dtype
    keys = [k for k in ref.state_dict() if not k.startswith("1.")] + ([] if had_bias else ["0.bias"])
    assert sorted(model.state_dict()) == sorted(keys)
    assert_close(model(x), ref(x))


def test_fold_needs_eval_mode_frozen_norms_and_adjacency():
    shared = nn.Conv2d(4, 8, 3, padding=1)
    tracked = nn.BatchNorm2d(8, track_running_stats=False)

    class Seq(nn.Sequential):
        def forward(self, x):
            return x + super().forward(x)

    cases = [
        conv_bn(2, nn.BatchNorm2d(8)).train(),  # training: nothing folds
        nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.BatchNorm2d(8)).eval(),  # not adjacent
        nn.Sequential(nn.Conv2d(4, 8, 3), tracked).eval(),  # batch statistics in eval too
        nn.Sequential(nn.Conv2d(4, 8, 3), nn.BatchNorm1d(8)).eval(),  # another dimension
        nn.Sequential(nn.Sequential(shared, nn.BatchNorm2d(8)), shared).eval(),  # conv used twice
        Seq(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)).eval(),  # a forward of its own
    ]
    for model in cases:
        randomize_norms(model)
        before = [type(m) for m in model.modules()]
        state = copy.deepcopy(model.state_dict())
        optimize(model)
        assert [type(m) for m in model.modules()] == before
        assert model.state_dict().keys() == state.keys()
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())

    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.BatchNorm2d(8)).eval()
    model[1].register_forward_hook(lambda *args: None)
    optimize(model)
    assert isinstance(model[1], nn.BatchNorm2d)


def small_mobilenet(name: str) -> nn.Module:
    torch.manual_seed(0)
    return randomize_norms(getattr(torchvision.models, name)(weights=None)).eval()


def count(model: nn.Module, kinds) -> int:
    return sum(isinstance(m, kinds) for m in model.modules())


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "mobilenet_v2"])
def test_mobilenet(name):
    model = small_mobilenet(name)
    ref = copy.deepcopy(model)
    depthwise_convs = sum(type(m) is nn.Conv2d and m.groups == m.in_channels > 1 for m in model.modules())
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        expected = ref(x)
        optimize(model)
        assert count(model, (DepthwiseConv2d,)) == depthwise_convs > 0
        assert count(model, (nn.BatchNorm2d,)) == 0
        assert OPS[2] in op_names(lambda: model(x))
        assert_close(model(x), expected, rtol=1e-4)


def test_mobilenet_channels_last_and_bfloat16():
    model = small_mobilenet("mobilenet_v3_small")
    ref = copy.deepcopy(model)
    x = torch.randn(1, 3, 64, 64)
    optimize(model, channels_last=True)
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in model.parameters() if p.dim() == 4)
    with torch.inference_mode():
        expected = ref(x)
        features = model.features(x.contiguous(memory_format=torch.channels_last))
        assert features.is_contiguous(memory_format=torch.channels_last)
        assert_close(model(x), expected, rtol=1e-4)

    optimize(model, dtype=torch.bfloat16)
    for m in model.modules():
        if type(m) in (nn.Conv2d, DepthwiseConv2d, nn.Linear):
            assert m.weight.dtype == m.bias.dtype == torch.bfloat16
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16
    assert_close(out.float(), expected, rtol=0.1)


def test_dtype_gives_autocast_results():
    """With nothing to fold or swap, dtype= changes no value the model computes under autocast:
    autocast rounds float32 weights to the same bfloat16 values on every call."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5), nn.LayerNorm(5))
    ref = copy.deepcopy(model)
    x = torch.randn(2, 3, 8, 8)
    weights = [model[0].weight, model[3].weight]
    optimize(model, dtype=torch.bfloat16)
    assert model[0].weight is weights[0] and model[3].weight is weights[1]
    assert model[0].weight.dtype == model[3].bias.dtype == torch.bfloat16
    assert model[4].weight.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(model(x), ref(x))


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="dtype"):
        optimize(nn.Conv2d(2, 2, 1), dtype=torch.float64)
    with pytest.raises(ValueError, match="channels_last"):
        optimize(nn.Conv2d(2, 2, 1), channels_last="yes")
    with pytest.raises(TypeError):
        optimize(torch.zeros(1))


def assert_untouched(model: nn.Module, x: torch.Tensor) -> None:
    ref = copy.deepcopy(model)
    params = list(model.parameters())
    state = copy.deepcopy(model.state_dict())
    types = [type(m) for m in model.modules()]
    assert optimize(model) is model
    assert [type(m) for m in model.modules()] == types
    assert all(p is q for p, q in zip(model.parameters(), params, strict=True))
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(model(x), ref(x))


def test_untouched_models_are_bit_identical():
    torch.manual_seed(0)
    assert_untouched(torchvision.models.resnet18(weights=None).train(), torch.randn(2, 3, 32, 32))
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, groups=4))
    assert_untouched(randomize_norms(model).eval(), torch.randn(1, 3, 12, 12))


def test_exported_from_the_package():
    assert torchvision_cpu_ext.optimize is optimize and "optimize" in torchvision_cpu_ext.__all__
    assert _optimize._DW1D is torch.ops.torchvision_cpu_ext.depthwise_conv1d.default
    assert _optimize._DW2D is torch.ops.torchvision_cpu_ext.depthwise_conv2d.default
