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

detectron2's own `detectron2.layers.FrozenBatchNorm2d` gets the same while the override is on:
its inference forward is `F.batch_norm(..., training=False)`, whose ATen kernel rounds its own
way, so the op runs with `as_batch_norm=True` and gives F.batch_norm's values bit for bit (see
NOTE [ frozen_batch_norm ]), in the input's dtype as F.batch_norm does (under autocast too: it
has no autocast rule, so a bfloat16 backbone stays in bfloat16 there, as it does without the
package). With grad mode on, an input that requires grad (detectron2 then runs its own
expression), TorchScript, or inputs F.batch_norm would run differently (strides other than dense
NCHW / channels_last, other dtypes), detectron2's own forward runs. detectron2 is never imported
here: enable() patches the class if `detectron2.layers.batch_norm` is already imported, else an
import hook patches it when it is; disable() restores detectron2's forward and removes the hook.
"""

import functools
import importlib.abc
import sys
import types

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

_state: dict[str, object] = {
    "original": None,
    "d2_class": None,
    "d2_original": None,
    "d2_forward": None,
    "d2_hook": None,
}

D2_MODULE = "detectron2.layers.batch_norm"


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


def d2_use_fused(x: Tensor, weight: Tensor, bias: Tensor, running_mean: Tensor, running_var: Tensor) -> bool:
    """Whether the fused op with as_batch_norm=True gives exactly what detectron2's forward gives:
    use_fused's conditions, an input that does not require grad (detectron2 switches to its own
    expression then), dense in NCHW or channels_last, and the dtypes F.batch_norm takes as one
    kernel (buffers of the input's dtype, or float32 buffers with a bfloat16/float16 input)."""
    if x.requires_grad or not use_fused(x, weight, bias, running_mean, running_var):
        return False
    if not (weight.dtype == x.dtype or x.dtype in (torch.bfloat16, torch.float16)):
        return False
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        return False
    return all(b.is_contiguous() for b in (weight, bias, running_mean, running_var))


def make_d2_forward(original):
    """detectron2.layers.FrozenBatchNorm2d.forward while the override is on: detectron2's results
    bit for bit (F.batch_norm's), in one pass for the inference inputs d2_use_fused takes, else
    `original` (detectron2's forward) itself.

    TorchScript compiles a method from its source, and a scripted detectron2 model must not
    depend on this package: the function made here reads only its closure, carries detectron2's
    globals and wraps `original` (`__wrapped__`, which inspect.getsourcelines follows), so
    torch.jit.script compiles detectron2's own forward, resolving its names as detectron2 does."""
    op = torch.ops.torchvision_cpu_ext.frozen_batch_norm
    use_fused_ = d2_use_fused
    is_scripting = torch.jit.is_scripting

    def forward(self, x):
        if not is_scripting() and use_fused_(x, self.weight, self.bias, self.running_mean, self.running_var):
            return op(x, self.weight, self.bias, self.running_mean, self.running_var, float(self.eps), x.dtype, True)
        return original(self, x)

    fn = types.FunctionType(forward.__code__, original.__globals__, "forward", None, forward.__closure__)
    return functools.update_wrapper(fn, original)


def is_d2_forward(fn) -> bool:
    """Whether `fn` is the forward patch_d2 put on detectron2's class."""
    return fn is not None and fn is _state["d2_forward"]


def patch_d2(module) -> None:
    """Puts make_d2_forward's forward on `module`'s (detectron2.layers.batch_norm's)
    FrozenBatchNorm2d."""
    cls = module.FrozenBatchNorm2d
    if _state["d2_original"] is None and not is_d2_forward(cls.forward):
        _state["d2_class"], _state["d2_original"] = cls, cls.forward
        _state["d2_forward"] = cls.forward = make_d2_forward(cls.forward)


class _PatchingLoader(importlib.abc.Loader):
    """The module's own loader, then patch_d2 on the executed module; anything else (get_source,
    resources) goes to the original loader."""

    def __init__(self, loader) -> None:
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        if _state["d2_hook"] is not None:  # still enabled
            patch_d2(module)

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _D2ImportHook(importlib.abc.MetaPathFinder):
    """Patches detectron2's FrozenBatchNorm2d when detectron2.layers.batch_norm is imported:
    asks the finders after it for the module's spec and wraps its loader."""

    def find_spec(self, name, path, target=None):
        if name != D2_MODULE:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _PatchingLoader(spec.loader)
                return spec
        return None


def _register_d2() -> None:
    if D2_MODULE in sys.modules:
        patch_d2(sys.modules[D2_MODULE])
    if _state["d2_hook"] is None:
        _state["d2_hook"] = _D2ImportHook()
        sys.meta_path.insert(0, _state["d2_hook"])


def _unregister_d2() -> None:
    hook = _state["d2_hook"]
    if hook is not None:
        sys.meta_path.remove(hook)
        _state["d2_hook"] = None
    if _state["d2_original"] is not None:
        _state["d2_class"].forward = _state["d2_original"]
        _state["d2_class"] = _state["d2_original"] = _state["d2_forward"] = None


def register() -> None:
    from torchvision.ops import misc

    if _state["original"] is None:
        _state["original"] = misc.FrozenBatchNorm2d.forward
        misc.FrozenBatchNorm2d.forward = forward
    _register_d2()


def unregister() -> None:
    from torchvision.ops import misc

    if _state["original"] is not None:
        misc.FrozenBatchNorm2d.forward = _state["original"]
        _state["original"] = None
    _unregister_d2()


def owners() -> dict[str, str]:
    """Who provides each forward this module replaces (info()); detectron2's once it is imported."""
    from torchvision.ops import misc

    def owner(ours: bool, theirs: str) -> str:
        return "torchvision_cpu_ext" if ours else theirs

    paths = {"FrozenBatchNorm2d.forward": owner(misc.FrozenBatchNorm2d.forward is forward, "torchvision")}
    d2 = sys.modules.get(D2_MODULE)
    if d2 is not None:
        paths["detectron2 FrozenBatchNorm2d.forward"] = owner(is_d2_forward(d2.FrozenBatchNorm2d.forward), "detectron2")
    return paths
