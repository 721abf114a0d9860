"""optimize(): one call that prepares a model for CPU inference, in the spirit of ipex.optimize.

It swaps depthwise convolutions for subclasses that call this package's op, folds frozen batch
norms into the convolutions before them, and optionally converts the layout and the weights'
dtype. See optimize()'s docstring for exactly what it changes and what it leaves alone.
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as _fwAD
import torch.nn.functional as F
from torch import Tensor, nn

# Bound once: the forward calls the overloads directly, with no attribute lookups on torch.ops.
_DW1D = torch.ops.torchvision_cpu_ext.depthwise_conv1d.default
_DW2D = torch.ops.torchvision_cpu_ext.depthwise_conv2d.default
# torch.func transforms (grad, vjp, vmap, ...): the op's C++ autograd kernel does not take them.
_functorch_active = torch._C._are_functorch_transforms_active

# The dtypes the op computes in (it casts under bfloat16/float16 autocast, as ATen's conv does).
_OP_DTYPES = frozenset((torch.float32, torch.float64, torch.bfloat16, torch.float16))

_DTYPES = (None, torch.bfloat16, torch.float16)


def _prepare(conv: nn.Conv1d | nn.Conv2d) -> None:
    """Precomputes the op's arguments from `conv`'s, so its forward normalises nothing.

    `_dw_pad` is None when the op pads (zeros, symmetric) or nothing pads, else F.pad's
    arguments: padding modes other than zeros pad as nn.Conv's _conv_forward does, and so does an
    asymmetric 'same' (even kernel), with zeros; the op then gets padding 0."""
    n = len(conv.kernel_size)
    if conv.in_channels != conv.groups:
        raise ValueError(f"{type(conv).__name__} needs groups == in_channels, got {conv.groups} != {conv.in_channels}")
    pad = tuple(conv._reversed_padding_repeated_twice)
    symmetric = all(pad[2 * i] == pad[2 * i + 1] for i in range(n))
    if (conv.padding_mode == "zeros" and symmetric) or not any(pad):
        padding = tuple(pad[2 * i] for i in reversed(range(n)))  # 'same', 'valid' and ints alike
        conv._dw_pad = None
    else:
        padding = (0,) * n
        conv._dw_pad = (pad, "constant" if conv.padding_mode == "zeros" else conv.padding_mode)
    conv._dw_stride = tuple(conv.stride)
    conv._dw_padding = padding
    conv._dw_dilation = tuple(conv.dilation)


def _op_forward(m: nn.Module, x: Tensor, dim: int, op) -> Tensor | None:
    """The swapped module's forward on our op, or None where the op does not take x (then
    nn.Conv's forward runs). Never reached under TorchScript (the forwards' is_scripting guard)."""
    # weight and bias from _parameters: nn.Module.__getattr__ would cost as much as all the
    # checks; a computed weight or bias (parametrized, weight_norm) is not in it.
    params, dtype = m._parameters, x.dtype
    if (
        x.is_cpu
        and x.dim() == dim
        and "weight" in params
        and "bias" in params
        and (dtype == params["weight"].dtype or torch.is_autocast_enabled("cpu"))
        and dtype in _OP_DTYPES
        and _fwAD._current_level < 0
        and not _functorch_active()
    ):
        pad = m._dw_pad
        if pad is not None:
            x = F.pad(x, pad[0], mode=pad[1])
        return op(x, params["weight"], params["bias"], m._dw_stride, m._dw_padding, m._dw_dilation)
    return None


class DepthwiseConv1d(nn.Conv1d):
    """An nn.Conv1d with groups == in_channels (any channel multiplier) whose forward calls
    torchvision_cpu_ext::depthwise_conv1d. The same parameters, state_dict and results (within
    float rounding); nn.Conv1d's forward for what the op does not take: non-CPU input, dtypes
    other than float32/float64/bfloat16/float16, unbatched input, an input dtype other than the
    weight's outside autocast, a weight or bias that is not a plain parameter (parametrized,
    weight_norm), forward-mode AD, torch.func transforms and TorchScript (a scripted module runs nn.Conv1d's
    forward). The op's arguments are computed when the module is built or swapped in: a stride,
    padding, dilation or padding_mode changed afterwards is not seen."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _prepare(self)

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():
            out = _op_forward(self, x, 3, _DW1D)
            if out is not None:
                return out
        return self._conv_forward(x, self.weight, self.bias)


class DepthwiseConv2d(nn.Conv2d):
    """DepthwiseConv1d's twin for nn.Conv2d (4-D input), calling torchvision_cpu_ext::depthwise_conv2d."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _prepare(self)

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():
            out = _op_forward(self, x, 4, _DW2D)
            if out is not None:
                return out
        return self._conv_forward(x, self.weight, self.bias)


_SWAPS: dict[type, type] = {nn.Conv1d: DepthwiseConv1d, nn.Conv2d: DepthwiseConv2d}
_CONVS = (nn.Conv1d, nn.Conv2d, DepthwiseConv1d, DepthwiseConv2d)


def _frozen_stats(bn: nn.Module, conv: nn.Module) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, float] | None:
    """(running_mean, running_var, weight, bias, eps) of a batch norm that can be folded into
    `conv` (a frozen one of conv's dimension and output channels), else None."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    two_d = type(conv) in (nn.Conv2d, DepthwiseConv2d)
    if type(bn) is FrozenBatchNorm2d and two_d:
        stats = (bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    elif type(bn) is (nn.BatchNorm2d if two_d else nn.BatchNorm1d):
        if bn.training or not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
            return None
        stats = (bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    else:
        return None
    return stats if stats[0].numel() == conv.out_channels else None


def _hooked(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def _store(p: Tensor, value: Tensor) -> None:
    """Writes `value` into parameter `p` in place (the same object, the same storage)."""
    with torch.no_grad():
        p.copy_(value)


def _fold(conv: nn.Conv1d | nn.Conv2d, stats: tuple[Tensor, Tensor, Tensor | None, Tensor | None, float]) -> None:
    """conv's weight and bias become those of conv followed by the batch norm, computed in
    float64 and rounded once to the parameters' dtype."""
    mean, var, gamma, beta, eps = (t.detach().double() if isinstance(t, Tensor) else t for t in stats)
    scale = torch.rsqrt(var + eps)
    if gamma is not None:
        scale = scale * gamma
    w = conv.weight
    bias = -mean * scale if conv.bias is None else (conv.bias.detach().double() - mean) * scale
    if beta is not None:
        bias = bias + beta
    _store(w, w.detach().double() * scale.reshape((-1,) + (1,) * (w.dim() - 1)))
    if conv.bias is None:
        conv.bias = nn.Parameter(torch.empty(w.size(0), dtype=w.dtype, device=w.device), requires_grad=w.requires_grad)
    _store(conv.bias, bias)


def _fold_batch_norms(model: nn.Module) -> None:
    """Folds each frozen batch norm that follows a convolution in an nn.Sequential (see
    optimize())."""
    uses: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        uses[id(m)] = uses.get(id(m), 0) + 1
    for seq in list(model.modules()):
        # nn.Sequential and its subclasses that keep its forward (Conv2dNormActivation).
        if not isinstance(seq, nn.Sequential) or type(seq).forward is not nn.Sequential.forward:
            continue
        names = list(seq._modules)
        for a, b in zip(names, names[1:], strict=False):
            conv, bn = seq._modules[a], seq._modules[b]
            # A conv used elsewhere too would get the batch norm there as well; hooks would see
            # other values (the conv's) or none (the batch norm's).
            if type(conv) not in _CONVS or uses[id(conv)] != 1 or _hooked(conv) or _hooked(bn):
                continue
            stats = _frozen_stats(bn, conv)
            if stats is not None:
                _fold(conv, stats)
                setattr(seq, b, nn.Identity())


def _swap_depthwise(model: nn.Module) -> None:
    """Makes every nn.Conv1d / nn.Conv2d (exactly those types) with groups == in_channels a
    DepthwiseConv1d / DepthwiseConv2d, in place."""
    for m in model.modules():
        cls = _SWAPS.get(type(m))
        if cls is not None and m.groups == m.in_channels:
            m.__class__ = cls
            _prepare(m)


def _convert_dtype(model: nn.Module, dtype: torch.dtype) -> None:
    for m in model.modules():
        if type(m) not in _CONVS and type(m) is not nn.Linear:
            continue
        for p in (m.weight, m.bias):
            if p is not None and p.dtype == torch.float32:
                p.data = p.data.to(dtype)  # as Module.to() does: the same Parameter object


def optimize(model: nn.Module, *, dtype: torch.dtype | None = None, channels_last: bool | None = None) -> nn.Module:
    """Prepares `model` for CPU inference in place (as ipex.optimize(..., inplace=True)) and
    returns it. It changes exactly this:

    - **Depthwise convolutions.** Every module whose type is exactly nn.Conv1d or nn.Conv2d and
      whose groups equal its input channels (any channel multiplier) becomes a DepthwiseConv1d /
      DepthwiseConv2d (subclasses, by reassigning `__class__`), whose forward calls
      torchvision_cpu_ext::depthwise_conv1d/2d: the same Parameter objects, the same state_dict
      keys, `isinstance(m, nn.Conv2d)` still true, the results of nn.Conv within float rounding.
      Padding modes other than zeros pad as nn.Conv does. Inputs the op does not take run
      nn.Conv's forward (see DepthwiseConv1d), and so does a TorchScript-compiled model.
      Subclasses of nn.Conv1d/Conv2d (which may have a forward of their own) are left alone.
    - **Batch norms folded** (only if `not model.training`): a batch norm that directly follows
      a convolution (the next child of the same nn.Sequential, as in torchvision's
      Conv2dNormActivation) is folded into it when it is frozen: torchvision's
      FrozenBatchNorm2d, or nn.BatchNorm1d/2d in eval mode tracking running statistics (exact
      types, after an nn.Conv1d/2d of exact type, or a swapped one, with as many channels). The
      convolution's weight is rescaled in place (the same Parameter) and its bias set, both
      computed in float64 and rounded to the parameter's dtype; a convolution without a bias
      gets one (a new `bias` Parameter and state_dict key). The batch norm is replaced by
      nn.Identity(), so its state_dict keys go away. The model's results stay the same within
      float rounding. Not folded: a convolution used in more than one place, or either module
      with hooks.
    - **dtype** (None, torch.bfloat16 or torch.float16): the float32 weights and biases of every
      nn.Conv1d, nn.Conv2d (swapped or not, exact types) and nn.Linear are converted to `dtype`
      (the same Parameter objects), for running the model under
      `torch.autocast("cpu", dtype=dtype)`, which computes those layers in `dtype` anyway: the
      per-call casts of their weights go away and the results are those of autocast with float32
      weights. Nothing else is converted (batch norms that were not folded, other layers,
      buffers: a detector's box arithmetic stays float32). Without autocast, give those layers
      inputs of `dtype`.
    - **channels_last=True**: `model.to(memory_format=torch.channels_last)` (4-D parameters and
      buffers); feed it channels_last input for channels_last activations throughout. None or
      False leaves the layout alone.

    Nothing else changes: other modules, buffers, hooks, the training flag. A model with nothing
    to swap or fold (and dtype and channels_last left at None) is returned untouched, its results
    the same bit for bit. A swapped module's op arguments are computed when it is swapped: a
    stride, padding, dilation or padding_mode changed afterwards is not seen.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"optimize() takes an nn.Module, got {type(model).__name__}")
    if dtype not in _DTYPES:
        raise ValueError(f"optimize(): dtype must be None, torch.bfloat16 or torch.float16, got {dtype!r}")
    if channels_last not in (None, True, False):
        raise ValueError(f"optimize(): channels_last must be None, True or False, got {channels_last!r}")
    if not model.training:
        _fold_batch_norms(model)
    _swap_depthwise(model)
    if dtype is not None:
        _convert_dtype(model, dtype)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model
