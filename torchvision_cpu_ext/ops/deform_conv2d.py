"""deform_conv2d's Python side: the autograd of `torchvision_cpu_ext::_deform_conv2d_mixed`.

Under bfloat16/float16 autocast, our rule (ops/_rules.py) keeps the input, weight and bias in the
autocast dtype and the offset and mask in float32, through `_deform_conv2d_mixed` (NOTE
[ deform_conv2d under autocast ] in csrc/cpu/deform_conv2d_kernel.cpp). Its backward is
torchvision's `_deform_conv2d_backward`, which our kernel serves for those mixed dtypes too;
torchvision's own autograd serves torchvision::deform_conv2d.
"""

from __future__ import annotations

import torch

_state: dict[str, bool] = {"registered": False}


def _setup_context(ctx, inputs, output) -> None:
    input, weight, offset, mask, bias, *args = inputs
    ctx.save_for_backward(input, weight, offset, mask, bias)
    ctx.args = args


def _backward(ctx, grad: torch.Tensor):
    input, weight, offset, mask, bias = ctx.saved_tensors
    grads = torch.ops.torchvision._deform_conv2d_backward(grad, input, weight, offset, mask, bias, *ctx.args)
    return (*grads, *([None] * len(ctx.args)))


def register() -> None:
    if not _state["registered"]:  # our own op: registered once, kept across disable()
        torch.library.register_autograd(
            "torchvision_cpu_ext::_deform_conv2d_mixed", _backward, setup_context=_setup_context
        )
        _state["registered"] = True


def unregister() -> None:
    pass


def owners() -> dict[str, str]:
    return {}
