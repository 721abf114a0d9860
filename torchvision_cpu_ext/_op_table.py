"""The op table: one row per op this package serves, and everything that derives from it.

A row says which torchvision ops its kernel file serves on the CPU key (forward and
`_..._backward`), the package's own ops that file defines (`torchvision_cpu_ext::*`), whose fake
kernels and autocast rules replace torchvision's, which torchvision Python functions the package
replaces, and whether the benchmark measures it. Derived from it:

- registration (`ops.register_all`): the Meta and AutocastCPU kernels of the rows' ops, their
  Python modules (patches of torchvision functions, autograd of the package's own ops);
- the fallback configuration's "not implemented" set: torchvision's ops no row implements;
- `info()`'s per-op and per-function owners;
- the tests' op lists (tests/test_package.py) and the benchmark's op list (benchmarks/bench_ops.py,
  which also hands each row's kernels to benchmarks/report.py).

Checked at import (`check()`): the kernels the C++ library registers (its CpuOverride
registrars) are exactly the rows' `serves`, every torchvision op belongs to one row, and the
fake kernels and autocast rules registered with `ops._rules`' decorators are exactly the ones the
rows declare. Adding an op is a row here; see CONTRIBUTING.md.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

# torchvision's schemas, exactly: every op its Python side calls (and registers fake kernels
# for), and the _cuda_version() its extension module calls at import. The fallback configuration
# defines them; tests/test_package.py checks them against torchvision's own.
TORCHVISION_SCHEMAS: dict[str, str] = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "roi_align": (
        "roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
        "SymInt pooled_width, int sampling_ratio, bool aligned) -> Tensor"
    ),
    "_roi_align_backward": (
        "_roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, SymInt pooled_height, "
        "SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width, "
        "int sampling_ratio, bool aligned) -> Tensor"
    ),
    "qroi_align": (
        "qroi_align(Tensor input, Tensor rois, float input_scale, int input_zero_point, float rois_scale, "
        "int rois_zero_point, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
        "int sampling_ratio, bool aligned) -> Tensor"
    ),
    "roi_pool": (
        "roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
        "SymInt pooled_width) -> (Tensor, Tensor)"
    ),
    "_roi_pool_backward": (
        "_roi_pool_backward(Tensor grad, Tensor rois, Tensor argmax, float spatial_scale, "
        "SymInt pooled_height, SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, "
        "SymInt width) -> Tensor"
    ),
    "ps_roi_align": (
        "ps_roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
        "SymInt pooled_width, int sampling_ratio) -> (Tensor, Tensor)"
    ),
    "_ps_roi_align_backward": (
        "_ps_roi_align_backward(Tensor grad, Tensor rois, Tensor channel_mapping, float spatial_scale, "
        "SymInt pooled_height, SymInt pooled_width, int sampling_ratio, SymInt batch_size, "
        "SymInt channels, SymInt height, SymInt width) -> Tensor"
    ),
    "ps_roi_pool": (
        "ps_roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
        "SymInt pooled_width) -> (Tensor, Tensor)"
    ),
    "_ps_roi_pool_backward": (
        "_ps_roi_pool_backward(Tensor grad, Tensor rois, Tensor channel_mapping, float spatial_scale, "
        "SymInt pooled_height, SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, "
        "SymInt width) -> Tensor"
    ),
    "deform_conv2d": (
        "deform_conv2d(Tensor input, Tensor weight, Tensor offset, Tensor mask, Tensor bias, "
        "SymInt stride_h, SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, "
        "SymInt dilation_w, SymInt groups, SymInt offset_groups, bool use_mask) -> Tensor"
    ),
    "_deform_conv2d_backward": (
        "_deform_conv2d_backward(Tensor grad, Tensor input, Tensor weight, Tensor offset, Tensor mask, "
        "Tensor bias, SymInt stride_h, SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, "
        "SymInt dilation_w, SymInt groups, SymInt offset_groups, bool use_mask) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
    "box_iou_rotated": "box_iou_rotated(Tensor boxes1, Tensor boxes2) -> Tensor",
    "_cuda_version": "_cuda_version() -> int",
}

TV = "torchvision::"
OWN = "torchvision_cpu_ext::"


@dataclass(frozen=True)
class Op:
    """One op the package serves (or, with `kernel=None`, one it leaves to torchvision)."""

    name: str
    # csrc/cpu/<kernel>_kernel.cpp, or None: torchvision's kernel serves `serves`, and the
    # fallback configuration raises NotImplementedError for them.
    kernel: str | None
    # torchvision::<op> whose CPU kernel the kernel file registers (forward, then backward).
    serves: tuple[str, ...] = ()
    # torchvision_cpu_ext::<op> the kernel file defines (static registrations, never switched off).
    own: tuple[str, ...] = ()
    # Qualified ops whose fake (Meta) kernel is ours (ops/_rules.py). Ours replace torchvision's
    # where our CPU kernels differ from what torchvision's fake kernels describe (the outputs'
    # memory format); the package's own ops need one each.
    fake: tuple[str, ...] = ()
    # Qualified ops whose AutocastCPU rule is ours (ops/_rules.py); the others keep
    # torchvision's rule, or none where torchvision has none on CPU.
    autocast: tuple[str, ...] = ()
    # The module of torchvision_cpu_ext.ops holding the rest of its Python side: patches of
    # torchvision functions and autograd of its own ops (register() / unregister() / owners()).
    module: str | None = None
    # The torchvision Python functions that module replaces while enabled, as info() names them.
    patches: tuple[str, ...] = ()
    # Measured by benchmarks/bench_ops.py (which has one case builder per benchmarked row).
    bench: bool = False

    @property
    def implemented(self) -> bool:
        """Whether our kernel serves it, in both configurations."""
        return self.kernel is not None


def _roi(name: str) -> Op:
    """An RoI op: forward and backward, our fake kernels (outputs in the input's memory format),
    no autocast rule (torchvision has none on CPU), benchmarked."""
    fwd, bwd = name, f"_{name}_backward"
    return Op(name, name, (fwd, bwd), fake=(TV + fwd, TV + bwd), bench=True)


OPS: tuple[Op, ...] = (
    # roi_align under autocast keeps a reduced feature map: our rule, and our mixed-dtype op.
    Op(
        "roi_align",
        "roi_align",
        ("roi_align", "_roi_align_backward"),
        own=("_roi_align_mixed",),
        fake=(TV + "roi_align", TV + "_roi_align_backward", OWN + "_roi_align_mixed"),
        autocast=(TV + "roi_align",),
        module="roi_align",
        bench=True,
    ),
    _roi("roi_pool"),
    _roi("ps_roi_align"),
    _roi("ps_roi_pool"),
    # nms: torchvision's fake kernel and autocast rule serve it; batched_nms's per-class loop is
    # replaced by one call of our _batched_nms.
    Op(
        "nms",
        "nms",
        ("nms",),
        own=("_batched_nms",),
        fake=(OWN + "_batched_nms",),
        autocast=(OWN + "_batched_nms",),
        module="nms",
        patches=("boxes._batched_nms_vanilla",),
        bench=True,
    ),
    Op(
        "frozen_batch_norm",
        "frozen_batch_norm",
        own=("frozen_batch_norm",),
        fake=(OWN + "frozen_batch_norm",),
        autocast=(OWN + "frozen_batch_norm",),
        module="frozen_batch_norm",
        patches=("FrozenBatchNorm2d.forward", "detectron2 FrozenBatchNorm2d.forward"),
        bench=True,
    ),
    Op("box_iou_rotated", "box_iou_rotated", ("box_iou_rotated",)),
    Op("qnms", "qnms", ("qnms",)),
    Op("qroi_align", "qroi_align", ("qroi_align",)),
    # deform_conv2d: our fake kernels (outputs and gradients in their tensors' memory formats);
    # under autocast the offsets stay float32: our rule, and our mixed-dtype op.
    Op(
        "deform_conv2d",
        "deform_conv2d",
        ("deform_conv2d", "_deform_conv2d_backward"),
        own=("_deform_conv2d_mixed",),
        fake=(TV + "deform_conv2d", TV + "_deform_conv2d_backward", OWN + "_deform_conv2d_mixed"),
        autocast=(TV + "deform_conv2d",),
        module="deform_conv2d",
        bench=True,
    ),
    # depthwise convolution: the package's own ops (no torchvision op), with a C++ autograd
    # kernel; their fake kernels and autocast rules are ours; ops/depthwise_conv.py is the front end.
    Op(
        "depthwise_conv",
        "depthwise_conv",
        own=(
            "depthwise_conv1d",
            "depthwise_conv2d",
            "_depthwise_conv1d_backward",
            "_depthwise_conv2d_backward",
            "_depthwise_path",
        ),
        fake=(
            OWN + "depthwise_conv1d",
            OWN + "depthwise_conv2d",
            OWN + "_depthwise_conv1d_backward",
            OWN + "_depthwise_conv2d_backward",
        ),
        autocast=(OWN + "depthwise_conv1d", OWN + "depthwise_conv2d"),
        module="depthwise_conv",
        bench=True,
    ),
)


def by_name(name: str) -> Op:
    for op in OPS:
        if op.name == name:
            return op
    raise KeyError(f"no op {name!r} in the op table")


def served() -> list[str]:
    """torchvision ops whose CPU kernel is ours (in both configurations)."""
    return [s for op in OPS if op.implemented for s in op.serves]


def not_implemented() -> list[str]:
    """torchvision ops left to torchvision (NotImplementedError in the fallback configuration)."""
    return [s for op in OPS if not op.implemented for s in op.serves]


def benchmarked() -> list[str]:
    return [op.name for op in OPS if op.bench]


def kernels_run(op: Op) -> list[str]:
    """What a benchmark row of `op` runs: its torchvision ops and the Python functions replaced."""
    return [*op.serves, *op.patches]


def check(cpp_ops: Iterable[str], fakes: Iterable[str], autocasts: Iterable[str]) -> None:
    """The table agrees with the C++ registrars and the Python rules; raises naming the mismatch."""
    problems = []
    if sorted(cpp_ops) != sorted(served()):
        problems.append(f"C++ registers CPU kernels for {sorted(cpp_ops)}, the table says {sorted(served())}")
    rows = [s for op in OPS for s in op.serves]
    if sorted([*rows, "_cuda_version"]) != sorted(TORCHVISION_SCHEMAS):
        problems.append(f"torchvision ops in no row (or in two): {sorted(set(TORCHVISION_SCHEMAS) ^ set(rows))}")
    for what, declared, registered in (
        ("fake kernels", [f for op in OPS for f in op.fake], fakes),
        ("autocast rules", [a for op in OPS for a in op.autocast], autocasts),
    ):
        if sorted(declared) != sorted(registered):
            problems.append(f"{what}: the table declares {sorted(declared)}, ops/_rules.py has {sorted(registered)}")
    if problems:
        raise RuntimeError("torchvision_cpu_ext's op table disagrees with its registrations: " + "; ".join(problems))
