"""torchvision.ops.FrozenBatchNorm2d on one fused pass (csrc/cpu/frozen_batch_norm_kernel.cpp).

Every batch-norm layer of torchvision's detection backbones is a FrozenBatchNorm2d, whose
forward runs `x * scale + bias` as two passes over the activation (and, for a bfloat16 input,
returns float32). While the override is on, its forward is replaced by one that calls
`torchvision_cpu_ext::frozen_batch_norm` for CPU inference: the same values (bit for bit in
float32/float64, see NOTE [ frozen_batch_norm ]) in one pass. When autograd records (fine-tuning
with an input that requires grad) or the buffers are not float32/float64, torchvision's own
expression runs, unchanged.

Under torch.autocast("cpu", dtype=bfloat16/float16), the AutocastCPU rule keeps a reduced
precision input's dtype for the output, so a backbone stays in bfloat16 between convolutions
instead of switching to float32 after every batch norm.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import AUTOCAST_CPU_KEYS, empty_like_layout

_state: dict[str, object] = {"original": None, "lib": None}


def forward(self, x: Tensor) -> Tensor:
    """FrozenBatchNorm2d.forward while the override is on (same signature and results).
    Written in TorchScript's subset, as torchvision's models are scriptable."""
    fused = (
        x.device.type == "cpu"
        and x.dim() == 4
        and (
            x.dtype == torch.float32
            or x.dtype == torch.float64
            or x.dtype == torch.bfloat16
            or x.dtype == torch.float16
        )
        and (self.weight.dtype == torch.float32 or (self.weight.dtype == torch.float64 and x.dtype == torch.float64))
        and not (torch.is_grad_enabled() and x.requires_grad)
    )
    if fused:
        return torch.ops.torchvision_cpu_ext.frozen_batch_norm(
            x, self.weight, self.bias, self.running_mean, self.running_var, self.eps
        )
    # torchvision's expression (ops/misc.py), for autograd and unusual dtypes.
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
