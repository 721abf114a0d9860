"""Ahead-of-time build: `pip install --no-build-isolation -e .` (torch must already be installed).

Builds every ISA variant from the same source and flag lists the JIT loader uses
(torchvision_cpu_ext/_build.py), each as a library named after the torch version and ISA, next
to the package; importing the package then loads the best variant the CPU supports. Nothing
here uses -march=native.
"""

import importlib.util
from pathlib import Path

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("_tvce_build", ROOT / "torchvision_cpu_ext" / "_build.py")
_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_build)


class PerVariantBuild(BuildExtension):
    """Each variant compiles the same sources with other flags: give each its own object dir."""

    def build_extension(self, ext):
        base = self.build_temp
        self.build_temp = str(Path(base) / ext.name)
        try:
            super().build_extension(ext)
        finally:
            self.build_temp = base


ext_modules = [
    CppExtension(
        name=f"torchvision_cpu_ext.{_build.library_name(isa, torch.__version__)}",
        sources=[str(Path(s).relative_to(ROOT)) for s in _build.sources()],
        include_dirs=[str(_build.CSRC)],
        extra_compile_args=_build.cflags(isa),
        extra_link_args=list(_build.LDFLAGS),
        py_limited_api=False,
    )
    for isa in _build.ISA_ORDER
]

setup(
    name="torchvision-cpu-ext",
    version="0.1.0",
    description="Vectorized, parallel CPU kernels for torchvision's detection ops",
    packages=find_packages(include=["torchvision_cpu_ext", "torchvision_cpu_ext.*"]),
    python_requires=">=3.11",
    install_requires=["torch", "torchvision", "ninja", "numpy"],
    extras_require={"test": ["pytest", "hypothesis", "expecttest"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": PerVariantBuild.with_options(use_ninja=True)},
)
