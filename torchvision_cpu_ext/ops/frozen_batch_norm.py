"""torchvision.ops.FrozenBatchNorm2d on one fused pass (csrc/cpu/frozen_batch_norm_kernel.cpp).

Every batch-norm layer of torchvision's detection backbones is a FrozenBatchNorm2d, whose
forward runs `x * scale + bias` as two passes over the activation (and, for a bfloat16 input,
returns float32). While the override is on, its forward is replaced by one that calls
`torchvision_cpu_ext::frozen_batch_norm` for CPU inference: the same values (bit for bit in
float32/float64, see NOTE [ frozen_batch_norm ]) in one pass, for inference (under torch.no_grad()
or torch.inference_mode(), as detection inference runs). With grad mode on (fine-tuning, or
torch.func transforms), forward AD, TorchScript, or inputs and buffers the kernel does not take,
torchvision's own expression runs, unchanged.

Under torch.autocast("cpu", dtype=bfloat16/float16), the AutocastCPU rule keeps a reduced
precision input's dtype for the output, so a backbone stays in bfloat16 between convolutions
instead of switching to float32 after every batch norm (a deliberate difference from
torchvision, whose expression returns float32 there: the residual additions after it then run in
bfloat16 too). With grad mode on, torchvision's expression and its float32 output are kept.
"""

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from ._common import AUTOCAST_CPU_KEYS, empty_like_layout

_state: dict[str, object] = {"original": None, "lib": None}


_FUSED_INPUT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@torch.jit.unused  # TorchScript compiles forward without it (scripted modules use the expression)
def use_fused(x: Tensor, weight: Tensor, bias: Tensor, running_mean: Tensor, running_var: Tensor) -> bool:
    """Whether the fused op gives exactly what torchvision's expression gives: CPU inference
    (no autograd recording and no forward-mode AD, which the op does not implement), a strided
    4-D input, and four 1-D CPU buffers of one dtype (float32, or float64 with a float64 input)
    with the input's channel count (torchvision's broadcasting covers other shapes; it runs then)."""
    if torch.is_grad_enabled() or fwAD._current_level >= 0:
        return False
    if x.device.type != "cpu" or x.layout != torch.strided or x.dim() != 4 or x.dtype not in _FUSED_INPUT_DTYPES:
        return False
    wd = weight.dtype
    if not (wd == torch.float32 or (wd == torch.float64 and x.dtype == torch.float64)):
        return False
    return all(
        b.dtype == wd and b.device.type == "cpu" and b.dim() == 1 and b.size(0) == x.size(1)
        for b in (weight, bias, running_mean, running_var)
    )


def forward(self, x: Tensor) -> Tensor:
    """FrozenBatchNorm2d.forward while the override is on: torchvision's results (bit for bit
    outside autocast), in one pass under torch.no_grad() / torch.inference_mode(). Scripted
    modules keep torchvision's expression, so they do not depend on this package."""
    if not torch.jit.is_scripting() and use_fused(x, self.weight, self.bias, self.running_mean, self.running_var):
        return torch.ops.torchvision_cpu_ext.frozen_batch_norm(
            x, self.weight, self.bias, self.running_mean, self.running_var, float(self.eps)
        )
    # torchvision's expression (ops/misc.py): autograd, forward AD, TorchScript, other inputs.
    w = self.weight.reshape(1, -1, 1, 1)
    b = self.bias.reshape(1, -1, 1, 1)
    rv = self.running_var.reshape(1, -1, 1, 1)
    rm = self.running_mean.reshape(1, -1, 1, 1)
    scale = w * (rv + self.eps).rsqrt()
    bias = b - rm * scale
    return x * scale + bias


def _fake(input, weight, bias, running_mean, running_var, eps, dtype=None):
    torch._check(
        input.dim() == 4, lambda: f"frozen_batch_norm: input must be a 4-D tensor [N, C, H, W], got {input.dim()}-D"
    )
    out_dtype = dtype if dtype is not None else torch.promote_types(input.dtype, weight.dtype)
    return empty_like_layout(input, input.shape, out_dtype)


def _autocast(input, weight, bias, running_mean, running_var, eps, dtype=None):
    with torch._C._ExcludeDispatchKeyGuard(AUTOCAST_CPU_KEYS):
        keep = input.dtype in (torch.bfloat16, torch.float16) and dtype is None
        return torch.ops.torchvision_cpu_ext.frozen_batch_norm(
            input, weight, bias, running_mean, running_var, eps, input.dtype if keep else dtype
        )


def register(lib: torch.library.Library) -> None:
    if _state["lib"] is None:  # our own op: its fake kernel and autocast rule are registered once
        torch.library.register_fake("torchvision_cpu_ext::frozen_batch_norm", _fake)
        own = torch.library.Library("torchvision_cpu_ext", "IMPL")
        own.impl("frozen_batch_norm", _autocast, "AutocastCPU")
        _state["lib"] = own
    from torchvision.ops import misc

    if _state["original"] is None:
        _state["original"] = misc.FrozenBatchNorm2d.forward
        misc.FrozenBatchNorm2d.forward = forward


def unregister() -> None:
    from torchvision.ops import misc

    if _state["original"] is not None:
        misc.FrozenBatchNorm2d.forward = _state["original"]
        _state["original"] = None
