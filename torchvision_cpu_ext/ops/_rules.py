"""Every fake (Meta) kernel and AutocastCPU rule the package registers, in one place.

Each is registered with a decorator naming its qualified op, as torchvision's
`_meta_registrations.py` does; the op table (`torchvision_cpu_ext/_op_table.py`) declares which
ops have ours, and `_op_table.check()` holds the two in step. `register_torchvision(lib)` puts the
rules of torchvision's ops on a library that disable() drops (torchvision's own come back);
`register_own()` registers those of the package's own ops once, for the life of the process.

Fake kernels report outputs in the input's memory format, as the CPU kernels return them
(torchvision's report contiguous outputs; that is why ours replace them). Autocast rules are
torchvision's (`autocast_cast`: float32 for floating tensors other than float64) except where a
NOTE says otherwise: roi_align keeps a reduced feature map (NOTE [ roi_align under autocast ] in
csrc/cpu/roi_align_kernel.cpp) and frozen_batch_norm a reduced input's dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch._prims_common import suggest_memory_format

from .._op_table import OWN, TV

AUTOCAST_CPU_KEYS = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)
_REDUCED = (torch.bfloat16, torch.float16)

FAKES: dict[str, Callable] = {}
AUTOCASTS: dict[str, Callable] = {}
_state: dict[str, object] = {"own_lib": None}


def fake(qualname: str):
    """Registers the decorated function as `qualname`'s fake kernel."""

    def deco(fn: Callable) -> Callable:
        FAKES[qualname] = fn
        return fn

    return deco


def autocast(qualname: str):
    """Registers the decorated function as `qualname`'s AutocastCPU rule."""

    def deco(fn: Callable) -> Callable:
        AUTOCASTS[qualname] = fn
        return fn

    return deco


def register_torchvision(lib: torch.library.Library) -> None:
    """The rules of torchvision's ops, on a torchvision IMPL library that disable() destroys."""
    for table, key in ((FAKES, "Meta"), (AUTOCASTS, "AutocastCPU")):
        for qualname, fn in table.items():
            if qualname.startswith(TV):
                lib.impl(qualname[len(TV) :], fn, key)


def register_own() -> None:
    """The rules of the package's own ops: once, kept across disable()."""
    if _state["own_lib"] is not None:
        return
    own = torch.library.Library("torchvision_cpu_ext", "IMPL")
    for qualname, fn in FAKES.items():
        if qualname.startswith(OWN):
            torch.library.register_fake(qualname, fn)
    for qualname, fn in AUTOCASTS.items():
        if qualname.startswith(OWN):
            own.impl(qualname[len(OWN) :], fn, "AutocastCPU")
    _state["own_lib"] = own


# --- shared checks and helpers ----------------------------------------------------------------


def check_one_device(op: str, **tensors: torch.Tensor | None) -> None:
    """The tensors are on one device. The dispatcher sends a call with any meta tensor here,
    CPU tensors included, and an output made like a CPU input would be uninitialised memory
    (torchvision's fake kernels return that); the C++ kernels check the same on the CPU."""
    given = {name: t.device for name, t in tensors.items() if t is not None}
    torch._check(
        len(set(given.values())) <= 1,
        lambda: f"{op}: tensors must be on one device, got " + ", ".join(f"{n} on {d}" for n, d in given.items()),
    )


def check_roi_dtypes(op: str, input: torch.Tensor, rois: torch.Tensor, float_rois_ok: bool = False) -> None:
    """rois share the input's dtype (as torchvision requires); with `float_rois_ok`, float32 rois
    with a bfloat16/float16 input are taken too (roi_align's autocast path, as in C++)."""
    mixed_ok = float_rois_ok and input.dtype in _REDUCED
    ok = rois.dtype == input.dtype or (mixed_ok and rois.dtype == torch.float32)
    torch._check(
        ok,
        lambda: (
            f"{op}: rois must have the dtype of input"
            + (" or float32" if mixed_ok else "")
            + f", got input {input.dtype} and rois {rois.dtype}"
        ),
    )


def check_roi_inputs(op: str, input: torch.Tensor, rois: torch.Tensor, float_rois_ok: bool = False) -> None:
    check_one_device(op, input=input, rois=rois)
    torch._check(input.dim() == 4, lambda: f"{op}: input must be a 4-D tensor [N, C, H, W], got {input.dim()}-D")
    torch._check(
        rois.dim() == 2 and rois.size(1) == 5,
        lambda: f"{op}: rois must have shape [K, 5] (batch index, x1, y1, x2, y2), got {list(rois.shape)}",
    )
    check_roi_dtypes(op, input, rois, float_rois_ok)


def ps_channels_out(op: str, channels: int, pooled_height: int, pooled_width: int) -> int:
    torch._check(
        pooled_height > 0 and pooled_width > 0 and channels % (pooled_height * pooled_width) == 0,
        lambda: (
            f"{op}: input channels ({channels}) must be a multiple of pooled_height * pooled_width "
            f"({pooled_height} * {pooled_width})"
        ),
    )
    return channels // (pooled_height * pooled_width)


def empty_like_layout(like: torch.Tensor, shape, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A new tensor in `like`'s memory format, as the C++ kernels return their outputs."""
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device, memory_format=suggest_memory_format(like))


def pooled_with_indices(
    op: str, input: torch.Tensor, rois: torch.Tensor, channels: int, pooled_height: int, pooled_width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fake outputs of roi_pool and the position-sensitive ops: values and their int32 indices."""
    check_roi_inputs(op, input, rois)
    shape = (rois.size(0), channels, pooled_height, pooled_width)
    return empty_like_layout(input, shape), empty_like_layout(input, shape, torch.int32)


def grad_input_like(
    op: str,
    grad: torch.Tensor,
    rois: torch.Tensor,
    batch_size: int,
    channels: int,
    height: int,
    width: int,
    float_rois_ok: bool = False,
) -> torch.Tensor:
    """Fake output of every `_..._backward` op: grad_input in grad's memory format."""
    check_one_device(op, grad=grad, rois=rois)
    check_roi_dtypes(op, grad, rois, float_rois_ok)
    return empty_like_layout(grad, (batch_size, channels, height, width))


def autocast_cast(t: torch.Tensor) -> torch.Tensor:
    """What torchvision's CPU autocast rules do to each tensor argument (at::autocast::cached_cast
    to float32): a floating tensor other than float64 becomes float32, anything else is kept."""
    return t.float() if t.is_floating_point() and t.dtype != torch.float64 else t


# --- roi_align ---------------------------------------------------------------------------------


def _roi_align_forward_fake(op: str, float_rois_ok: bool):
    def meta(input, rois, spatial_scale: float, pooled_height: int, pooled_width: int, sampling_ratio: int, aligned):
        check_roi_inputs(op, input, rois, float_rois_ok)
        return empty_like_layout(input, (rois.size(0), input.size(1), pooled_height, pooled_width))

    meta.__name__ = f"meta_{op.lstrip('_')}"
    return meta


# torchvision::roi_align takes rois of the input's dtype; the autocast path's mixed op float32 too.
fake(TV + "roi_align")(_roi_align_forward_fake("roi_align", float_rois_ok=False))
fake(OWN + "_roi_align_mixed")(_roi_align_forward_fake("_roi_align_mixed", float_rois_ok=True))


@fake(TV + "_roi_align_backward")
def meta_roi_align_backward(
    grad, rois, spatial_scale, pooled_height, pooled_width, batch_size, channels, height, width, sampling_ratio, aligned
):
    return grad_input_like("_roi_align_backward", grad, rois, batch_size, channels, height, width, float_rois_ok=True)


@autocast(TV + "roi_align")
def autocast_roi_align(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned):
    """A reduced feature map stays reduced (through _roi_align_mixed, float32 rois); float32 and
    float64 take torchvision's rule, which casts nothing else here and returns the input's dtype."""
    args = (spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned)
    with torch._C._ExcludeDispatchKeyGuard(AUTOCAST_CPU_KEYS):
        rois = autocast_cast(rois)
        if input.dtype in _REDUCED:
            return torch.ops.torchvision_cpu_ext._roi_align_mixed(input, rois, *args)
        return torch.ops.torchvision.roi_align(autocast_cast(input), rois, *args).to(input.dtype)


# --- roi_pool, ps_roi_align, ps_roi_pool: values and int32 indices; no autocast rule on CPU -------


@fake(TV + "roi_pool")
def meta_roi_pool(input, rois, spatial_scale, pooled_height, pooled_width):
    return pooled_with_indices("roi_pool", input, rois, input.size(1), pooled_height, pooled_width)


@fake(TV + "_roi_pool_backward")
def meta_roi_pool_backward(
    grad, rois, argmax, spatial_scale, pooled_height, pooled_width, batch_size, channels, height, width
):
    return grad_input_like("_roi_pool_backward", grad, rois, batch_size, channels, height, width)


@fake(TV + "ps_roi_align")
def meta_ps_roi_align(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio):
    c_out = ps_channels_out("ps_roi_align", input.size(1), pooled_height, pooled_width)
    return pooled_with_indices("ps_roi_align", input, rois, c_out, pooled_height, pooled_width)


@fake(TV + "_ps_roi_align_backward")
def meta_ps_roi_align_backward(
    grad,
    rois,
    channel_mapping,
    spatial_scale,
    pooled_height,
    pooled_width,
    sampling_ratio,
    batch_size,
    channels,
    height,
    width,
):
    return grad_input_like("_ps_roi_align_backward", grad, rois, batch_size, channels, height, width)


@fake(TV + "ps_roi_pool")
def meta_ps_roi_pool(input, rois, spatial_scale, pooled_height, pooled_width):
    c_out = ps_channels_out("ps_roi_pool", input.size(1), pooled_height, pooled_width)
    return pooled_with_indices("ps_roi_pool", input, rois, c_out, pooled_height, pooled_width)


@fake(TV + "_ps_roi_pool_backward")
def meta_ps_roi_pool_backward(
    grad, rois, channel_mapping, spatial_scale, pooled_height, pooled_width, batch_size, channels, height, width
):
    return grad_input_like("_ps_roi_pool_backward", grad, rois, batch_size, channels, height, width)


# --- nms: torchvision's own fake kernel and rule serve torchvision::nms ---------------------------


@fake(OWN + "_batched_nms")
def fake_batched_nms(boxes, scores, idxs, iou_threshold):
    check_one_device("batched_nms", boxes=boxes, scores=scores, idxs=idxs)
    kept = torch.library.get_ctx().new_dynamic_size()
    return scores.new_empty(kept, dtype=torch.long)


@autocast(OWN + "_batched_nms")
def autocast_batched_nms(boxes, scores, idxs, iou_threshold):
    """torchvision's nms rule, so mixed dtypes (float32 boxes, bfloat16 scores) run as its
    per-class loop runs them."""
    with torch._C._ExcludeDispatchKeyGuard(AUTOCAST_CPU_KEYS):
        boxes, scores = autocast_cast(boxes), autocast_cast(scores)
        return torch.ops.torchvision_cpu_ext._batched_nms(boxes, scores, idxs, iou_threshold)


# --- frozen_batch_norm ---------------------------------------------------------------------------


@fake(OWN + "frozen_batch_norm")
def fake_frozen_batch_norm(input, weight, bias, running_mean, running_var, eps, dtype=None, as_batch_norm=False):
    check_one_device(
        "frozen_batch_norm", input=input, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var
    )
    torch._check(
        input.dim() == 4, lambda: f"frozen_batch_norm: input must be a 4-D tensor [N, C, H, W], got {input.dim()}-D"
    )
    out_dtype = dtype if dtype is not None else torch.promote_types(input.dtype, weight.dtype)
    return empty_like_layout(input, input.shape, out_dtype)


@autocast(OWN + "frozen_batch_norm")
def autocast_frozen_batch_norm(input, weight, bias, running_mean, running_var, eps, dtype=None, as_batch_norm=False):
    """A reduced input keeps its dtype (see ops/frozen_batch_norm.py), unless `dtype` is given."""
    with torch._C._ExcludeDispatchKeyGuard(AUTOCAST_CPU_KEYS):
        keep = input.dtype in _REDUCED and dtype is None
        return torch.ops.torchvision_cpu_ext.frozen_batch_norm(
            input, weight, bias, running_mean, running_var, eps, input.dtype if keep else dtype, as_batch_norm
        )


# --- deform_conv2d -------------------------------------------------------------------------------


def _deform_conv2d_fake(op: str, mixed_ok: bool):
    def meta(
        input,
        weight,
        offset,
        mask,
        bias,
        stride_h,
        stride_w,
        pad_h,
        pad_w,
        dil_h,
        dil_w,
        groups,
        offset_groups,
        use_mask,
    ):
        """The output in the input's memory format (the spatial size is the offset's, as torchvision's)."""
        check_one_device(op, input=input, weight=weight, offset=offset, mask=mask, bias=bias)
        torch._check(input.dim() == 4, lambda: f"{op}: input must be a 4-D tensor [N, C, H, W], got {input.dim()}-D")
        torch._check(weight.dim() == 4, lambda: f"{op}: weight must be a 4-D tensor, got {weight.dim()}-D")
        torch._check(offset.dim() == 4, lambda: f"{op}: offset must be a 4-D tensor, got {offset.dim()}-D")
        for name, t in (("weight", weight), ("bias", bias), ("offset", offset), ("mask", mask)):
            if name in ("offset", "mask") and mixed_ok and input.dtype in _REDUCED and t.dtype == torch.float32:
                continue
            if name == "mask" and not use_mask:
                continue
            message = f"{op}: {name} must have the dtype of input, got input {input.dtype} and {name} {t.dtype}"
            torch._check(t.dtype == input.dtype, lambda message=message: message)
        out_h, out_w = offset.shape[-2:]
        return empty_like_layout(input, (input.shape[0], weight.shape[0], out_h, out_w))

    meta.__name__ = f"meta_{op.lstrip('_')}"
    return meta


# torchvision::deform_conv2d takes offsets and mask of the input's dtype; the autocast path's
# mixed op float32 too (NOTE [ deform_conv2d under autocast ]).
fake(TV + "deform_conv2d")(_deform_conv2d_fake("deform_conv2d", mixed_ok=False))
fake(OWN + "_deform_conv2d_mixed")(_deform_conv2d_fake("_deform_conv2d_mixed", mixed_ok=True))


@fake(TV + "_deform_conv2d_backward")
def meta_deform_conv2d_backward(
    grad,
    input,
    weight,
    offset,
    mask,
    bias,
    stride_h,
    stride_w,
    pad_h,
    pad_w,
    dilation_h,
    dilation_w,
    groups,
    offset_groups,
    use_mask,
):
    """Each gradient in its tensor's dtype and memory format; grad_bias contiguous."""
    check_one_device(
        "_deform_conv2d_backward", grad=grad, input=input, weight=weight, offset=offset, mask=mask, bias=bias
    )
    return (
        empty_like_layout(input, input.shape),
        empty_like_layout(weight, weight.shape),
        empty_like_layout(offset, offset.shape),
        empty_like_layout(mask, mask.shape),
        bias.new_empty(bias.shape),
    )


@autocast(TV + "deform_conv2d")
def autocast_deform_conv2d(
    input,
    weight,
    offset,
    mask,
    bias,
    stride_h,
    stride_w,
    pad_h,
    pad_w,
    dilation_h,
    dilation_w,
    groups,
    offset_groups,
    use_mask,
):
    """Input, weight and bias in the autocast dtype, offset and mask in float32, through
    _deform_conv2d_mixed (NOTE [ deform_conv2d under autocast ]); a float64 input is left alone,
    as autocast leaves float64."""
    args = (stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, groups, offset_groups, use_mask)
    with torch._C._ExcludeDispatchKeyGuard(AUTOCAST_CPU_KEYS):
        if input.dtype == torch.float64:
            return torch.ops.torchvision.deform_conv2d(input, weight, offset, mask, bias, *args)
        low = torch.get_autocast_dtype("cpu")

        def lower(t: torch.Tensor) -> torch.Tensor:
            return t.to(low) if t.is_floating_point() and t.dtype != torch.float64 else t

        return torch.ops.torchvision_cpu_ext._deform_conv2d_mixed(
            lower(input), lower(weight), autocast_cast(offset), autocast_cast(mask), lower(bias), *args
        )


# --- depthwise_conv1d / depthwise_conv2d -----------------------------------------------------------


def _depthwise_out_size(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def depthwise_layout(input: torch.Tensor) -> torch.memory_format | None:
    """The layout the kernel runs in (csrc/cpu/depthwise_conv_kernel.cpp, channels_last()): for
    conv1d, None (contiguous) or channels_last meaning channels innermost ([N, L, C]-strided)."""
    if input.dim() == 3:
        cl = input.size(1) > 1 and input.size(2) > 1 and input.stride(1) < input.stride(2)
        return torch.channels_last if cl else None
    return suggest_memory_format(input)


def _depthwise_empty(input: torch.Tensor, shape: list[int]) -> torch.Tensor:
    """A new tensor in the layout the kernel returns: input's ([N, L, C]-strided for conv1d)."""
    if input.dim() == 3:
        if depthwise_layout(input) == torch.channels_last:
            return input.new_empty((shape[0], shape[2], shape[1])).transpose(1, 2)
        return input.new_empty(shape)
    return empty_like_layout(input, shape)


def _depthwise_fake(op: str, dims: int):
    def meta(input, weight, bias, stride, padding, dilation):
        check_one_device(op, input=input, weight=weight, bias=bias)
        torch._check(input.dim() == dims + 2, lambda: f"{op}: input must be a {dims + 2}-D tensor, got {input.dim()}-D")
        torch._check(
            weight.dim() == dims + 2 and weight.size(1) == 1,
            lambda: f"{op}: weight must have shape [C * M, 1, kernel...], got {list(weight.shape)}",
        )
        for name, t in (("weight", weight), ("bias", bias)):
            if t is not None:
                message = f"{op}: {name} must have the dtype of input, got input {input.dtype} and {name} {t.dtype}"
                torch._check(t.dtype == input.dtype, lambda message=message: message)
        spatial = [
            _depthwise_out_size(input.size(2 + i), weight.size(2 + i), stride[i], padding[i], dilation[i])
            for i in range(dims)
        ]
        return _depthwise_empty(input, [input.size(0), weight.size(0), *spatial])

    meta.__name__ = f"meta_{op}"
    return meta


def _depthwise_backward_fake(op: str):
    def meta(grad, input, weight, stride, padding, dilation, output_mask):
        """grad_input in input's layout, grad_weight and grad_bias contiguous; None where masked."""
        check_one_device(op, grad=grad, input=input, weight=weight)
        return (
            _depthwise_empty(input, list(input.shape)) if output_mask[0] else None,
            weight.new_empty(weight.shape) if output_mask[1] else None,
            weight.new_empty(weight.size(0)) if output_mask[2] else None,
        )

    meta.__name__ = f"meta_{op.lstrip('_')}"
    return meta


def _depthwise_autocast(op: str):
    def rule(input, weight, bias, stride, padding, dilation):
        """As ATen's rule for convolutions: input, weight and bias in the autocast dtype (float64
        tensors are left alone), so a bfloat16/float16 network stays in it."""
        with torch._C._ExcludeDispatchKeyGuard(AUTOCAST_CPU_KEYS):
            low = torch.get_autocast_dtype("cpu")

            def lower(t: torch.Tensor | None) -> torch.Tensor | None:
                if t is None or not t.is_floating_point() or t.dtype == torch.float64:
                    return t
                return t.to(low)

            return getattr(torch.ops.torchvision_cpu_ext, op)(
                lower(input), lower(weight), lower(bias), stride, padding, dilation
            )

    rule.__name__ = f"autocast_{op}"
    return rule


for _dims in (1, 2):
    _op = f"depthwise_conv{_dims}d"
    fake(OWN + _op)(_depthwise_fake(_op, _dims))
    fake(OWN + f"_{_op}_backward")(_depthwise_backward_fake(f"_{_op}_backward"))
    autocast(OWN + _op)(_depthwise_autocast(_op))
