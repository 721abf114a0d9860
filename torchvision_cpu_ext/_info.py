"""What runs where: `torchvision_cpu_ext.info()`, or `python -m torchvision_cpu_ext.info`."""

from __future__ import annotations

import platform
from typing import Any

import torch

# The file string override.cpp gives every kernel it registers (see csrc/cpu/override.h).
OUR_MARKER = "torchvision_cpu_ext/csrc/cpu/override.cpp"


def cpu_kernel_owner(op: str) -> str:
    """Who provides the CPU kernel of torchvision::<op>, read from the dispatcher itself."""
    try:
        dump = torch._C._dispatch_dump(f"torchvision::{op}")
    except RuntimeError:
        return "missing"
    for line in dump.splitlines():
        if line.startswith("CPU:"):
            if OUR_MARKER in line:
                return "torchvision_cpu_ext"
            if "torchvision_cpu_ext" in line:
                return "not implemented"
            return "torchvision"
    return "missing"


def python_paths() -> dict[str, str]:
    """torchvision's Python functions the override replaces, and who currently provides each."""
    from . import ops

    return ops.owners()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def info() -> dict[str, Any]:
    """Versions, the ISA variant loaded, threads, mode and, per op, whose CPU kernel is active."""
    import torchvision

    from . import _op_table, _registry, loaded_library

    lib = loaded_library()
    return {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cpu": _cpu_model(),
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "isa_variant": lib.isa,
        "library": lib.path,
        "library_source": lib.how,
        "threads": torch.get_num_threads(),
        "mode": _registry.mode(),
        "enabled": _registry.is_enabled(),
        "ops": {op: cpu_kernel_owner(op) for row in _op_table.OPS for op in row.serves},
        "python": python_paths(),
        "output_pool_bytes": dict(
            zip(("cached", "cap"), torch.ops.torchvision_cpu_ext._output_pool_stats(), strict=True)
        ),
    }


def depthwise_path(
    input: torch.Tensor,
    weight: torch.Tensor,
    stride: int | tuple[int, ...] = 1,
    padding: int | tuple[int, ...] = 0,
    dilation: int | tuple[int, ...] = 1,
) -> str:
    """Which path `torchvision_cpu_ext.ops.depthwise_conv1d/2d` takes for these tensors (their
    shapes, dtype and layout) at the current thread count: small call or parallel, NCHW planes,
    channels_last rows or channel blocks, vector lanes, the ISA variant. Meta tensors will do."""
    dims = input.dim() - 2
    if dims not in (1, 2):
        raise ValueError(f"depthwise_path: input must be 3-D or 4-D, got {input.dim()}-D")

    def ints(v: int | tuple[int, ...], name: str) -> list[int]:
        out = [v] * dims if isinstance(v, int) else list(v)
        if len(out) != dims:
            raise ValueError(f"depthwise_path: {name} must have {dims} element(s), got {v!r}")
        return out

    from .ops._rules import depthwise_layout

    cl = depthwise_layout(input) == torch.channels_last
    return torch.ops.torchvision_cpu_ext._depthwise_path(
        list(input.shape),
        list(weight.shape),
        ints(stride, "stride"),
        ints(padding, "padding"),
        ints(dilation, "dilation"),
        input.dtype,
        cl,
    )


def format_info(d: dict[str, Any]) -> str:
    mode = {
        "override": "overriding torchvision's CPU kernels",
        "fallback": "supplying ops torchvision could not load",
    }[d["mode"]]
    lines = [
        f"torch {d['torch']}, torchvision {d['torchvision']}",
        f"cpu: {d['cpu']} (ATen capability {d['aten_cpu_capability']})",
        f"kernels: {d['isa_variant']} variant, {d['library_source']}: {d['library']}",
        f"threads: {d['threads']}",
        f"mode: {mode}; override {'enabled' if d['enabled'] else 'disabled'}",
        "CPU kernel per op:",
    ]
    lines += [f"  {op:24s} {owner}" for op, owner in d["ops"].items()]
    lines.append("torchvision.ops Python functions:")
    lines += [f"  {fn:30s} {owner}" for fn, owner in d["python"].items()]
    return "\n".join(lines)
