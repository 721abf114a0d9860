"""The output pool (NOTE [ output pool ] in csrc/cpu/memory.h): large outputs reuse blocks freed
by earlier outputs of the same size, values stay right, the cap holds, empty_cache frees.

The pool takes outputs of 4 MiB and more; these tests lower that minimum to MIN_BYTES (or 0)
through the debug thresholds (NOTE [ debug thresholds ]), so that small tensors stand for the
large ones."""

from __future__ import annotations

import torch
from test_package import run_python
from torchvision.ops import FrozenBatchNorm2d, roi_align

import torchvision_cpu_ext
from torchvision_cpu_ext import _debug

OP = torch.ops.torchvision_cpu_ext.frozen_batch_norm
MIN_BYTES = 16 << 10  # the pool's minimum in these tests (4 MiB by default)
LARGE = (1, 8, 32, 40)  # 40 KiB in float32: above MIN_BYTES


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
    unpooled = OP(*bn_args(torch.randn(LARGE)))
    del unpooled
    assert stats()[0] == 0  # below the default minimum: not pooled
    with _debug.thresholds(output_pool_min_bytes=MIN_BYTES):
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
        other = OP(*bn_args(torch.randn(*LARGE[:3], LARGE[3] + 1)))
        assert other.data_ptr() != ptr
        small = OP(*bn_args(torch.randn(1, 8, 16, 16)))  # 8 KiB: below MIN_BYTES
        del small
        assert stats()[0] == 0
        del second, other
        assert stats()[0] > 0
        assert torchvision_cpu_ext.empty_cache() > 0 and stats()[0] == 0


def test_pooled_tensors_behave_like_any_other():
    torchvision_cpu_ext.empty_cache()
    with _debug.thresholds(output_pool_min_bytes=MIN_BYTES):
        y = OP(*bn_args(torch.randn(LARGE)))
        expected = y.clone()
        y.resize_(2, *LARGE[1:])  # grows through the pool's allocator
        assert torch.equal(y[:1], expected)
        y.untyped_storage().resize_(100)  # a block below the pool's minimum is freed, not kept
        del y
        large = torch.Size(LARGE).numel() * 4
        assert stats()[0] == large + 2 * large  # the blocks the two resizes gave back
        torchvision_cpu_ext.empty_cache()
        # roi_align's output and the backward's grad_input come from the pool too.
        x = torch.randn(1, 16, 16, 20, requires_grad=True)  # grad_input: 20 KiB
        rois = torch.tensor([[0, 0.0, 0.0, 15.0, 15.0]] * 60)
        out = roi_align(x, rois, 7, 1.0, 2, True)
        out_bytes = out.untyped_storage().nbytes()
        assert out_bytes >= MIN_BYTES
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
        "from torchvision_cpu_ext import _debug\n"
        "op = torch.ops.torchvision_cpu_ext.frozen_batch_norm\n"
        "w = torch.ones(8)\n"
        "with _debug.thresholds(output_pool_min_bytes=0):\n"
        "    ys = [op(torch.randn(1, 8, 128, 100 + i), w, w, w, w, 1e-5) for i in range(4)]\n"
        "    for i in range(4): ys[i] = None\n"  # freed oldest first: widths 100, 101, 102, 103
        "    print(*torch.ops.torchvision_cpu_ext._output_pool_stats())",
        TORCHVISION_CPU_EXT_POOL_MB="1",
    )
    cached, cap = map(int, out.split())
    assert cap == 1 << 20
    block = 8 * 128 * 4  # bytes per unit of width
    # Each block is ~0.4 MiB: 1 MiB keeps two, and the two freed last push out the older ones.
    assert cached == block * (102 + 103) <= cap


def test_cap_from_the_environment():
    out = run_python(
        "import torch, torchvision_cpu_ext\n"
        "from torchvision_cpu_ext import _debug\n"
        "op = torch.ops.torchvision_cpu_ext.frozen_batch_norm\n"
        "x = torch.randn(1, 8, 32, 40); w = torch.ones(8)\n"
        "with _debug.thresholds(output_pool_min_bytes=0):\n"  # pooled, were the pool not off
        "    for _ in range(3): y = op(x, w, w, w, w, 1e-5); del y\n"
        "    print(*torch.ops.torchvision_cpu_ext._output_pool_stats())",
        TORCHVISION_CPU_EXT_POOL_MB="0",
    )
    assert out.split() == ["0", "0"]
    bad = run_python(
        "import torch, torchvision_cpu_ext; print(*torch.ops.torchvision_cpu_ext._output_pool_stats())",
        TORCHVISION_CPU_EXT_POOL_MB="-1",
    )
    assert bad.split()[1] == str(256 << 20)  # rejected (with a warning): the default
