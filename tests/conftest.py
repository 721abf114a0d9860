"""Shared fixtures. Importing torchvision_cpu_ext here builds (or loads) the kernels once."""

from __future__ import annotations

import pytest
from op_tester import num_threads, torchvision_kernels_loaded

import torchvision_cpu_ext
from torchvision_cpu_ext import _build

# torchvision's own compiled kernels are a reference only where they loaded: tests say so with
# the needs_native / needs_fallback markers or the `native` fixture.
NATIVE = torchvision_kernels_loaded()


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "needs_native: needs torchvision's own compiled kernels (skipped where they did not load)"
    )
    config.addinivalue_line(
        "markers", "needs_fallback: only without torchvision's compiled kernels (the fallback configuration)"
    )
    config.addinivalue_line(
        "markers",
        "measures_memory: asserts on process memory (RSS, allocator peaks); not on the sanitizer build "
        "(scripts/sanitize.sh), whose allocator adds redzones and a quarantine to every block",
    )


def pytest_collection_modifyitems(config, items):
    skip_native = pytest.mark.skip(reason="torchvision's compiled kernels are not loaded")
    skip_fallback = pytest.mark.skip(reason="only without torchvision's compiled kernels")
    skip_memory = pytest.mark.skip(reason="process memory under AddressSanitizer is its allocator's")
    for item in items:
        if _build.sanitize() and item.get_closest_marker("measures_memory"):
            item.add_marker(skip_memory)
        if not NATIVE and item.get_closest_marker("needs_native"):
            item.add_marker(skip_native)
        if NATIVE and item.get_closest_marker("needs_fallback"):
            item.add_marker(skip_fallback)


@pytest.fixture(scope="session")
def native() -> bool:
    """Whether torchvision's own compiled kernels loaded, for a test that also compares with
    them where it can (session-scoped, so hypothesis tests may use it too)."""
    return NATIVE


@pytest.fixture(params=[1, 2], ids=lambda n: f"threads{n}")
def threads(request):
    with num_threads(request.param):
        yield request.param


@pytest.fixture
def torchvision_kernels():
    """Runs the test body on torchvision's own kernels, then gives ours back."""
    if not NATIVE:
        pytest.skip("torchvision's compiled kernels are not loaded in this configuration")
    with torchvision_cpu_ext.disabled():
        yield
