"""Ahead-of-time build: `pip install --no-build-isolation .`, `pip wheel --no-build-isolation .`
or `pip install --no-build-isolation -e .` (torch must already be installed).

Builds every ISA variant (or those named in TORCHVISION_CPU_EXT_VARIANTS, e.g. `AVX2,DEFAULT`)
from the same source and flag lists the JIT loader uses (torchvision_cpu_ext/_build.py), each
as a library named after the torch version, ISA and source digest, next to the package;
importing the package then loads the best variant the CPU runs. A built (non-editable) package
also gets the digests (_build.MANIFEST), since it has no csrc/ to hash, and a copy of the
sources for a JIT build where no variant fits. Nothing here uses -march=native.
"""

import functools
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from setuptools import Extension, find_packages, setup
from setuptools.command.build_py import build_py
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("_tvce_build", ROOT / "torchvision_cpu_ext" / "_build.py")
_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_build)

VARIANTS = _build.variants_to_build(os.environ.get(_build.VARIANTS_ENV))


class PerVariantBuild(BuildExtension):
    """Each variant compiles the same sources with other flags: give each its own object dir,
    and its own precompiled header of the library headers (_build.PCH_HEADERS), made by the
    same compile call as the sources (so with exactly their flags) before them."""

    def build_extension(self, ext: Extension) -> None:
        base, compile_ = self.build_temp, self.compiler.compile
        self.build_temp = str(Path(base) / ext.name)
        self.compiler.compile = functools.partial(self._compile_with_pch, compile_)
        try:
            super().build_extension(ext)
        finally:
            self.build_temp, self.compiler.compile = base, compile_

    @staticmethod
    def _compile_with_pch(compile_, sources, output_dir=None, *args, extra_preargs=None, extra_postargs=None, **kw):
        pch_dir = Path(output_dir or ".").resolve() / "pch"
        pch_dir.mkdir(parents=True, exist_ok=True)
        header = pch_dir / _build.PCH_NAME
        source = header.with_suffix(".cpp")  # a source name the compiler wrapper accepts; -x says header
        source.write_text(_build.pch_text())
        header.write_text(_build.pch_text())
        try:
            (gch,) = compile_(
                [str(source)],
                str(pch_dir),
                *args,
                extra_preargs=[*(extra_preargs or []), "-x", "c++-header"],
                extra_postargs=extra_postargs,
                **kw,
            )
            os.replace(gch, f"{header}.gch")
            extra_postargs = [*(extra_postargs or []), "-include", str(header), "-Winvalid-pch"]
        except Exception as e:  # parse the headers in every unit, as without it
            print(f"torchvision_cpu_ext: no precompiled header ({e}); compiling without", file=sys.stderr)
        return compile_(sources, output_dir, *args, extra_preargs=extra_preargs, extra_postargs=extra_postargs, **kw)


class BuildPyWithManifest(build_py):
    """Adds the manifest and the copy of the sources to a built package. An editable install
    runs from the checkout, which hashes and compiles its live csrc/ instead."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        pkg = Path(self.build_lib) / "torchvision_cpu_ext"
        manifest = _build.manifest(torch.__version__, VARIANTS)
        (pkg / _build.MANIFEST.name).write_text(json.dumps(manifest, indent=1) + "\n")
        dest = pkg / _build.PACKAGED_CSRC.relative_to(_build.PKG_DIR)
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        for path in _build.sources(_build.CSRC) + _build.headers(_build.CSRC):
            shutil.copy2(path, dest)


ext_modules = [
    CppExtension(
        name=f"torchvision_cpu_ext.{_build.library_name(isa, torch.__version__, _build.source_hash(isa, _build.CSRC))}",
        sources=[str(Path(s).relative_to(ROOT)) for s in _build.sources(_build.CSRC)],
        include_dirs=[str(_build.CSRC)],
        extra_compile_args=_build.cflags(isa) + _build.AOT_CFLAGS,
        extra_link_args=_build.ldflags() + _build.AOT_LDFLAGS,
        py_limited_api=False,
    )
    for isa in VARIANTS
]

setup(
    name="torchvision-cpu-ext",
    version="0.1.0",
    description="Vectorized, parallel CPU kernels for torchvision's detection ops",
    packages=find_packages(include=["torchvision_cpu_ext", "torchvision_cpu_ext.*"]),
    python_requires=">=3.11",
    install_requires=["torch", "torchvision", "ninja", "numpy"],
    # peers: the other CPU runtimes benchmarks/bench_ops.py times depthwise_conv against (the
    # TorchScript ONNX exporter needs onnx); the benchmark skips, with a note, those not installed.
    extras_require={"test": ["pytest", "hypothesis", "expecttest"], "peers": ["onnx", "onnxruntime", "openvino"]},
    ext_modules=ext_modules,
    cmdclass={"build_py": BuildPyWithManifest, "build_ext": PerVariantBuild.with_options(use_ninja=True)},
)
