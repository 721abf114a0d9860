"""Depthwise convolution: `depthwise_conv1d` / `depthwise_conv2d`, with F.conv1d/2d's conventions.

The kernels are the package's own ops `torchvision_cpu_ext::depthwise_conv1d/2d` (NOTE
[ depthwise_conv design ] in csrc/cpu/depthwise_conv_kernel.cpp), with a C++ autograd kernel, fake
kernels and AutocastCPU rules (ops/_rules.py). The functions here take what F.conv1d/2d take with
`groups` equal to the input channels: weight `[C * M, 1, k...]` (M >= 1 the channel multiplier),
stride, padding (ints, tuples, "same", "valid") and dilation; they only turn the arguments into the
ops' explicit ones. `torchvision_cpu_ext.optimize()` puts them behind nn.Conv1d / nn.Conv2d.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

_state: dict[str, bool] = {}

IntOrSeq = int | Sequence[int]


def _tuple(v: IntOrSeq, dims: int, name: str) -> list[int]:
    if isinstance(v, int):
        return [v] * dims
    out = list(v)
    if len(out) == 1:
        out = out * dims
    if len(out) != dims or not all(isinstance(i, int) for i in out):
        raise ValueError(f"depthwise_conv{dims}d: {name} must be an int or {dims} ints, got {v!r}")
    return out


def _padding(
    input: Tensor, weight: Tensor, padding: IntOrSeq | str, stride: list[int], dilation: list[int], dims: int
) -> tuple[Tensor, list[int]]:
    """The input (padded on the right/bottom where 'same' is asymmetric, as ATen does) and the
    symmetric padding the op takes."""
    if not isinstance(padding, str):
        return input, _tuple(padding, dims, "padding")
    if padding == "valid":
        return input, [0] * dims
    if padding != "same":
        raise ValueError(f"depthwise_conv{dims}d: padding must be an int, ints, 'same' or 'valid', got {padding!r}")
    if any(s != 1 for s in stride):
        raise ValueError(f"depthwise_conv{dims}d: padding='same' is not supported for strided convolutions")
    total = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:], strict=True)]
    left = [t // 2 for t in total]
    extra = [t - 2 * lo for t, lo in zip(total, left, strict=True)]
    if any(extra):
        pad: list[int] = []
        for e in reversed(extra):  # F.pad lists the last dimension first
            pad += [0, e]
        input = F.pad(input, pad)
    return input, left


def _call(dims: int, input: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, dilation) -> Tensor:
    """The op of `dims` spatial dimensions on F.conv's arguments, made explicit."""
    stride_, dilation_ = _tuple(stride, dims, "stride"), _tuple(dilation, dims, "dilation")
    input, padding_ = _padding(input, weight, padding, stride_, dilation_, dims)
    op = getattr(torch.ops.torchvision_cpu_ext, f"depthwise_conv{dims}d")
    return op(input, weight, bias, stride_, padding_, dilation_)


def depthwise_conv1d(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: IntOrSeq = 1,
    padding: IntOrSeq | str = 0,
    dilation: IntOrSeq = 1,
) -> Tensor:
    """F.conv1d(input, weight, bias, stride, padding, dilation, groups=input.size(1)) on our kernel.
    input [N, C, L] (contiguous, or [N, L, C]-strided: the output keeps the layout); weight
    [C * M, 1, k]."""
    return _call(1, input, weight, bias, stride, padding, dilation)


def depthwise_conv2d(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: IntOrSeq = 1,
    padding: IntOrSeq | str = 0,
    dilation: IntOrSeq = 1,
) -> Tensor:
    """F.conv2d(input, weight, bias, stride, padding, dilation, groups=input.size(1)) on our kernel.
    input [N, C, H, W] (contiguous or channels_last: the output keeps the layout); weight
    [C * M, 1, kh, kw]."""
    return _call(2, input, weight, bias, stride, padding, dilation)


def register() -> None:
    """Nothing to register: the ops' autograd is C++, their rules are in ops/_rules.py."""


def unregister() -> None:
    pass


def owners() -> dict[str, str]:
    return {}
