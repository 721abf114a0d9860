"""The package as users get it: a wheel built by setup.py (one ISA variant, the one this
process loads), installed into a fresh environment that sees this one's torch and torchvision,
imported from outside the checkout with no compiler, ninja or sources in reach.

Building the wheel compiles one variant, as long as a JIT build: scripts/test.sh runs this once
(TORCHVISION_CPU_EXT_WHEEL_TEST=1 in one configuration), not in every configuration.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest
from filelock import FileLock

from torchvision_cpu_ext import _build, _loader

ROOT = Path(__file__).resolve().parent.parent
ENV_FLAG = "TORCHVISION_CPU_EXT_WHEEL_TEST"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get(ENV_FLAG) != "1",
        reason=f"builds a wheel (minutes): set {ENV_FLAG}=1 (scripts/test.sh does once)",
    ),
]

IMPORT_AND_RUN = """
import json, torch, torchvision
import torchvision_cpu_ext as t
from torchvision_cpu_ext._info import cpu_kernel_owner
boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]])
keep = torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5)
x = torch.arange(64.0).reshape(1, 1, 8, 8)
pooled = torchvision.ops.roi_align(x, torch.tensor([[0, 0.0, 0.0, 8.0, 8.0]]), 1, aligned=True)
lib = t.loaded_library()
print(json.dumps({"how": lib.how, "isa": lib.isa, "path": lib.path, "file": t.__file__,
                  "owner": cpu_kernel_owner("roi_align"), "keep": keep.tolist(), "pooled": pooled.item()}))
"""


@dataclass(frozen=True)
class Installed:
    wheel: Path
    python: Path
    site: Path  # the fresh environment's site-packages, where the wheel went
    env: dict[str, str]  # no compiler, no ninja, no checkout, an empty JIT cache
    variant: str


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, **kw)
    assert res.returncode == 0, f"{cmd}\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
    return res


@pytest.fixture
def installed(_installed_once: Installed) -> Iterator[Installed]:
    """The install, for one test at a time: tests move its sources away and back."""
    with FileLock(str(_installed_once.wheel.parent.parent / "use.lock")):
        yield _installed_once


@pytest.fixture(scope="module")
def _installed_once(tmp_path_factory) -> Installed:
    """Built once per pytest run: under pytest-xdist the first worker to get here builds it,
    under a lock, in a directory of the run that the other workers then read."""
    run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if run_id is None:
        return _build_and_install(tmp_path_factory.mktemp("wheel"))
    tmp = tmp_path_factory.getbasetemp().parent / f"wheel-{run_id}"
    tmp.mkdir(exist_ok=True)
    done = tmp / "installed.json"
    with FileLock(str(tmp / "build.lock")):
        if not done.exists():
            inst = _build_and_install(tmp)
            fields = {**asdict(inst), "wheel": str(inst.wheel), "python": str(inst.python), "site": str(inst.site)}
            done.write_text(json.dumps(fields))
    fields = json.loads(done.read_text())
    return Installed(
        Path(fields["wheel"]), Path(fields["python"]), Path(fields["site"]), fields["env"], fields["variant"]
    )


def _build_and_install(tmp: Path) -> Installed:
    # A copy of what a clone has, so that the build starts clean and leaves the checkout alone.
    src = tmp / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(_build.CSRC, src / "csrc" / "cpu")
    shutil.copytree(
        ROOT / "torchvision_cpu_ext",
        src / "torchvision_cpu_ext",
        ignore=shutil.ignore_patterns("__pycache__", "*.so", _build.MANIFEST.name, "csrc"),
    )
    variant = _loader.cpu_variant()
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--no-cache-dir"]
        + ["-w", str(tmp / "dist"), str(src)],
        env={**os.environ, _build.VARIANTS_ENV: variant},
        cwd=src,
    )
    (wheel,) = (tmp / "dist").glob("*.whl")

    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    # The fresh environment sees this one's torch, torchvision (and pip) after its own packages.
    (site / "native_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", str(wheel)])

    env = {
        "PATH": str(venv / "bin"),
        "HOME": str(tmp),
        "CXX": "/nonexistent/c++",
        "CC": "/nonexistent/cc",
        "TORCHVISION_CPU_EXT_CACHE": str(tmp / "jit-cache"),
    }
    if os.environ.get("ATEN_CPU_CAPABILITY"):  # empty: torch warns on import; unset means the same
        env["ATEN_CPU_CAPABILITY"] = os.environ["ATEN_CPU_CAPABILITY"]
    for tool in ("c++", "g++", "gcc", "ninja"):
        assert shutil.which(tool, path=env["PATH"]) is None, tool
    return Installed(wheel, python, site, env, variant)


def _import(inst: Installed, **env: str) -> subprocess.CompletedProcess:
    """Imports the package in the fresh environment, from a directory outside the checkout."""
    return subprocess.run(
        [str(inst.python), "-c", IMPORT_AND_RUN],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=inst.env["HOME"],
        env={**inst.env, **env},
    )


@contextmanager
def _without_sources(inst: Installed) -> Iterator[None]:
    packaged = inst.site / "torchvision_cpu_ext" / "csrc"
    hidden = packaged.with_name("csrc-hidden")
    packaged.rename(hidden)
    try:
        yield
    finally:
        hidden.rename(packaged)


def test_wheel_holds_lean_libraries_manifest_and_sources(installed):
    names = zipfile.ZipFile(installed.wheel).namelist()
    libs = [n for n in names if n.endswith(".so")]
    assert len(libs) == 1 and f"tvce_{installed.variant.lower()}_" in libs[0], libs
    assert "torchvision_cpu_ext/_prebuilt.json" in names
    assert {f"torchvision_cpu_ext/csrc/cpu/{s}" for s in _build.SOURCES} <= set(names)
    assert not any(n.startswith(("csrc/", "tests/", "benchmarks/")) for n in names)
    manifest = json.loads((installed.site / "torchvision_cpu_ext" / "_prebuilt.json").read_text())
    assert manifest["variants"] == [installed.variant]
    assert manifest["digests"] == {isa: _build.source_hash(isa, _build.CSRC) for isa in _build.ISA_ORDER}
    # Stripped: with Python's -g a variant weighed ~20 MB, without debug info and symbols < 1 MB.
    lib = installed.site / libs[0]
    assert lib.stat().st_size < 4 * 2**20, lib.stat().st_size


def test_wheel_loads_prebuilt_without_compiler_or_sources(installed):
    with _without_sources(installed):
        res = _import(installed)
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""  # a quiet import
    out = json.loads(res.stdout)
    assert out["how"] == "prebuilt" and out["isa"] == installed.variant
    assert Path(out["path"]).parent == installed.site / "torchvision_cpu_ext"
    assert Path(out["file"]).parent == installed.site / "torchvision_cpu_ext"
    assert out["owner"] == "torchvision_cpu_ext"
    assert out["keep"] == [0, 2]
    assert out["pooled"] == pytest.approx(31.5)


@pytest.mark.skipif(_loader.cpu_variant() == "DEFAULT", reason="the wheel holds DEFAULT: every CPU runs it")
def test_wheel_needs_a_compiler_only_where_no_variant_fits(installed):
    # ATen's DEFAULT is below the one variant the wheel holds: the loader must build, and says why.
    res = _import(installed, ATEN_CPU_CAPABILITY="default")
    assert res.returncode != 0
    assert "The prebuilt kernels of this install are for torch" in res.stderr
    assert f"variants {installed.variant}; none fits" in res.stderr
    assert "needs ninja" in res.stderr
    with _without_sources(installed):
        res = _import(installed, ATEN_CPU_CAPABILITY="default")
    assert res.returncode != 0
    assert "has no kernel sources to build from" in res.stderr
