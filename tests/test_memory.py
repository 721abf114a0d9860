"""The output pool (NOTE [ output pool ] in csrc/cpu/memory.h): large outputs reuse blocks freed
by earlier outputs of the same size, values stay right, the cap holds, empty_cache frees."""

from __future__ import annotations

import torch
from test_package import run_python
from torchvision.ops import FrozenBatchNorm2d, roi_align

import torchvision_cpu_ext

OP = torch.ops.torchvision_cpu_ext.frozen_batch_norm
LARGE = (1, 64, 128, 160)  # 5 MiB in float32: above the pool's 4 MiB minimum


def stats() -> tuple[int, int]:
    cached, cap = torch.ops.torchvision_cpu_ext._output_pool_stats()
    return cached, cap


def bn_args(x: torch.Tensor):
    m = FrozenBatchNorm2d(x.size(1))
    m.running_var.fill_(4.0)
    m.bias.fill_(1.0)
    return x, m.weight, m.bias, m.running_mean, m.running_var, 0.0  # eps 0: scale exactly 0.5


def test_large_outputs_reuse_freed_blocks_and_stay_correct():
    torchvision_cpu_ext.empty_cache()
    assert stats() == (0, 256 << 20)
    x = torch.randn(LARGE)
    first = OP(*bn_args(x))
    ptr, nbytes = first.data_ptr(), first.untyped_storage().nbytes()
    first.fill_(123.0)  # stale values left in the block
    del first
    assert stats()[0] == nbytes
    second = OP(*bn_args(x))
    assert second.data_ptr() == ptr and stats()[0] == 0
    assert torch.equal(second, x * 0.5 + 1.0)  # (x - 0) / sqrt(4) + 1, exact in binary
    # A different size does not take it; small outputs never enter the pool.
    other = OP(*bn_args(torch.randn(1, 64, 128, 161)))
    assert other.data_ptr() != ptr
    small = OP(*bn_args(torch.randn(1, 8, 16, 16)))
    del small
    assert stats()[0] == 0
    del second, other
    assert stats()[0] > 0
    assert torchvision_cpu_ext.empty_cache() > 0 and stats()[0] == 0


def test_pooled_tensors_behave_like_any_other():
    torchvision_cpu_ext.empty_cache()
    y = OP(*bn_args(torch.randn(LARGE)))
    expected = y.clone()
    y.resize_(2, *LARGE[1:])  # grows through the pool's allocator
    assert torch.equal(y[:1], expected)
    y.untyped_storage().resize_(100)  # a block below the pool's minimum is freed, not kept
    del y
    five_mib = 64 * 128 * 160 * 4
    assert stats()[0] == five_mib + 2 * five_mib  # the blocks the two resizes gave back
    torchvision_cpu_ext.empty_cache()
    # roi_align's output and the backward's grad_input come from the pool too.
    x = torch.randn(1, 256, 64, 64, requires_grad=True)  # grad_input: 4 MiB
    rois = torch.tensor([[0, 0.0, 0.0, 30.0, 30.0]] * 600)
    out = roi_align(x, rois, 7, 1.0, 2, True)
    out_bytes = out.untyped_storage().nbytes()
    assert out_bytes >= 4 << 20
    out.sum().backward()
    del out
    assert stats()[0] == out_bytes
    grad_bytes = x.grad.untyped_storage().nbytes()
    x.grad = None
    assert stats()[0] == out_bytes + grad_bytes
    torchvision_cpu_ext.empty_cache()


def test_cap_evicts_the_oldest_blocks():
    out = run_python(
        "import torch, torchvision_cpu_ext\n"
        "op = torch.ops.torchvision_cpu_ext.frozen_batch_norm\n"
        "w = torch.ones(64)\n"
        "ys = [op(torch.randn(1, 64, 128, 160 + i), w, w, w, w, 1e-5) for i in range(4)]\n"
        "for i in range(4): ys[i] = None\n"  # freed oldest first: widths 160, 161, 162, 163
        "print(*torch.ops.torchvision_cpu_ext._output_pool_stats())",
        TORCHVISION_CPU_EXT_POOL_MB="12",
    )
    cached, cap = map(int, out.split())
    assert cap == 12 << 20
    block = 64 * 128 * 4  # bytes per unit of width
    # Each block is ~5.2 MiB: 12 MiB keeps two, and the two freed last push out the older ones.
    assert cached == block * (162 + 163) <= cap


def test_cap_from_the_environment():
    out = run_python(
        "import torch, torchvision_cpu_ext\n"
        "op = torch.ops.torchvision_cpu_ext.frozen_batch_norm\n"
        "x = torch.randn(1, 64, 128, 160); w = torch.ones(64)\n"
        "for _ in range(3): y = op(x, w, w, w, w, 1e-5); del y\n"
        "print(*torch.ops.torchvision_cpu_ext._output_pool_stats())",
        TORCHVISION_CPU_EXT_POOL_MB="0",
    )
    assert out.split() == ["0", "0"]
    bad = run_python(
        "import torch, torchvision_cpu_ext; print(*torch.ops.torchvision_cpu_ext._output_pool_stats())",
        TORCHVISION_CPU_EXT_POOL_MB="-1",
    )
    assert bad.split()[1] == str(256 << 20)  # rejected (with a warning): the default
