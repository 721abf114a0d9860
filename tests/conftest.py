"""Shared fixtures. Importing torchvision_cpu_ext here builds (or loads) the kernels once."""

from __future__ import annotations

import pytest
import torch

import torchvision_cpu_ext
from torchvision_cpu_ext import _registry

# torchvision's own compiled kernels are a reference only where they loaded.
NATIVE = _registry.mode() == _registry.MODE_OVERRIDE


@pytest.fixture(params=[1, 2], ids=lambda n: f"threads{n}")
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.fixture
def torchvision_kernels():
    """Runs the test body on torchvision's own kernels, then gives ours back."""
    if not NATIVE:
        pytest.skip("torchvision's compiled kernels are not loaded in this configuration")
    torchvision_cpu_ext.disable()
    try:
        yield
    finally:
        torchvision_cpu_ext.enable()
