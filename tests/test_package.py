"""The package around the kernels: loading, the override switch, info(), the fallback mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torchvision.ops import roi_align

import torchvision_cpu_ext
from torchvision_cpu_ext import _build, _loader, _op_table, ops
from torchvision_cpu_ext._info import cpu_kernel_owner

ROOT = Path(__file__).resolve().parent.parent
# The op table says which torchvision ops are ours; the tests below check that the dispatcher agrees.
OURS = _op_table.served()
# torchvision ops this package does not implement (NotImplementedError in the fallback).
NOT_OURS = _op_table.not_implemented()


def run_python(code: str, **env: str) -> str:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=600)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_op_table():
    assert "roi_align" in OURS and "deform_conv2d" in OURS and NOT_OURS == []
    ops.check(OURS)  # what import checked: the C++ registrars and the Python rules agree with it
    with pytest.raises(RuntimeError, match="C\\+\\+ registers CPU kernels for .*, the table says .*'nms'"):
        ops.check([op for op in OURS if op != "nms"])
    with pytest.raises(RuntimeError, match="fake kernels: the table declares"):
        _op_table.check(OURS, [f for f in ops._rules.FAKES if "roi_pool" not in f], ops._rules.AUTOCASTS)
    with pytest.raises(RuntimeError, match="autocast rules: the table declares"):
        _op_table.check(OURS, ops._rules.FAKES, [*ops._rules.AUTOCASTS, "torchvision::roi_pool"])
    # Every row's Python module is registered while enabled and reports what it replaces.
    assert set(torchvision_cpu_ext.info()["python"]) <= {p for row in _op_table.OPS for p in row.patches}
    # A fake kernel for every op whose Meta kernel is ours, on the dispatcher.
    for row in _op_table.OPS:
        for qualname in row.fake:
            assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "Meta"), qualname


def test_every_kernel_file_is_a_row_and_compiled():
    files = sorted(p.name for p in (ROOT / "csrc" / "cpu").glob("*_kernel.cpp"))
    rows = sorted(f"{row.kernel}_kernel.cpp" for row in _op_table.OPS if row.kernel)
    assert files == rows
    assert sorted(_build.SOURCES) == sorted(["override.cpp", *rows])


def test_our_kernels_are_dispatched():
    assert torchvision_cpu_ext.is_enabled()
    assert sorted(torch.ops.torchvision_cpu_ext._cpu_override_ops()) == sorted(OURS)
    for op in OURS:
        assert cpu_kernel_owner(op) == "torchvision_cpu_ext"
    # torchvision's own CPU roi_align has no bfloat16 kernel: this runs only on ours.
    out = roi_align(torch.randn(1, 3, 8, 8).bfloat16(), torch.tensor([[0, 1.0, 1.0, 6.0, 6.0]]).bfloat16(), 2)
    assert out.dtype == torch.bfloat16


def test_variant_matches_aten_capability():
    lib = torchvision_cpu_ext.loaded_library()
    cap = torch.backends.cpu.get_cpu_capability()
    want = cap if cap in _build.ISA_FLAGS else "DEFAULT"
    # A prebuilt lower variant is taken before a JIT build of ATen's own (an install built with
    # TORCHVISION_CPU_EXT_VARIANTS); the JIT builds ATen's own.
    lower = _build.ISA_ORDER[_build.ISA_ORDER.index(want) :]
    assert lib.isa in lower if lib.how == "prebuilt" else lib.isa == want
    # What the library itself was compiled for, not what the loader meant to load.
    assert torch.ops.torchvision_cpu_ext._capability() == lib.isa
    assert _build.library_name(lib.isa, torch.__version__) in Path(lib.path).name


@pytest.mark.needs_native
def test_disable_gives_torchvision_kernels_back():
    x = torch.randn(1, 3, 8, 8)
    rois = torch.tensor([[0, 1.0, 1.0, 6.0, 6.0]])
    torchvision_cpu_ext.disable()
    try:
        assert not torchvision_cpu_ext.is_enabled()
        for op in OURS:
            assert cpu_kernel_owner(op) == "torchvision"
        assert set(torchvision_cpu_ext.info()["python"].values()) == {"torchvision"}
        with pytest.raises(RuntimeError, match="BFloat16"):
            roi_align(x.bfloat16(), rois.bfloat16(), 2)
        # torchvision's fake kernel is back too: it rejects fp32 rois with bf16 input.
        with pytest.raises(RuntimeError, match="same type"):
            torch.ops.torchvision.roi_align(x.bfloat16().to("meta"), rois.to("meta"), 1.0, 2, 2, 2, True)
        torchvision_cpu_ext.disable()  # idempotent
    finally:
        torchvision_cpu_ext.enable()
    torchvision_cpu_ext.enable()  # idempotent
    assert all(cpu_kernel_owner(op) == "torchvision_cpu_ext" for op in OURS)
    assert set(torchvision_cpu_ext.info()["python"].values()) == {"torchvision_cpu_ext"}
    assert roi_align(x.bfloat16(), rois.bfloat16(), 2).dtype == torch.bfloat16


@pytest.mark.needs_fallback
def test_fallback_mode_supplies_torchvision_ops():
    from torchvision_cpu_ext import _registry

    assert _registry.mode() == _registry.MODE_FALLBACK
    # torchvision's Python side believes its ops loaded, so it calls them (and registered its
    # autograd for them) instead of its slow pure-Python path.
    assert torchvision.extension._has_ops()
    x = torch.randn(1, 3, 8, 8, requires_grad=True)
    roi_align(x, torch.tensor([[0, 1.0, 1.0, 6.0, 6.0]]), 2, aligned=True).sum().backward()
    assert x.grad.abs().sum() > 0
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]])
    assert torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5).tolist() == [0, 2]
    x = torch.rand(1, 2, 5, 5, requires_grad=True)
    torchvision.ops.deform_conv2d(x, torch.rand(1, 18, 3, 3), torch.rand(2, 2, 3, 3)).sum().backward()
    assert x.grad.abs().sum() > 0
    with pytest.raises(RuntimeError, match="no torchvision kernels to give back"):
        torchvision_cpu_ext.disable()
    assert cpu_kernel_owner("deform_conv2d") == "torchvision_cpu_ext"


def torchvision_python_op_references() -> set[str]:
    """Every torch.ops.torchvision.<op> torchvision's Python side can call."""
    import re

    root = Path(torchvision.__file__).parent
    names = set()
    for path in root.rglob("*.py"):
        names.update(re.findall(r"torch\.ops\.torchvision\.(\w+)", path.read_text(encoding="utf-8")))
    return names


def test_every_op_torchvision_calls_has_a_schema(native):
    refs = torchvision_python_op_references()
    assert "box_iou_rotated" in refs and "qroi_align" in refs
    assert refs <= set(_op_table.TORCHVISION_SCHEMAS), refs - set(_op_table.TORCHVISION_SCHEMAS)
    assert set(_op_table.TORCHVISION_SCHEMAS) == {*OURS, *NOT_OURS, "_cuda_version"}
    if not native:
        assert [cpu_kernel_owner(op) for op in NOT_OURS] == ["not implemented"] * len(NOT_OURS)


@pytest.mark.needs_native  # torchvision's compiled ops define the schemas compared with
def test_fallback_schemas_equal_torchvisions():
    """The schemas the fallback defines are, op for op, those torchvision's compiled ops register
    (so a torchvision upgrade that changes one fails here)."""
    for op, schema in _op_table.TORCHVISION_SCHEMAS.items():
        assert str(getattr(torch.ops.torchvision, op).default._schema) == f"torchvision::{schema}"
    registered = {n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("torchvision::")}
    assert registered == set(_op_table.TORCHVISION_SCHEMAS)


def test_env_var_imports_without_override(native):
    out = run_python(
        "import torchvision_cpu_ext as t; from torchvision_cpu_ext._info import cpu_kernel_owner as o;"
        "print(t.is_enabled(), o('roi_align'))",
        TORCHVISION_CPU_EXT_OVERRIDE="0",
    )
    # Without torchvision's compiled ops, ours are the only kernels there are.
    assert out.split() == (["False", "torchvision"] if native else ["True", "torchvision_cpu_ext"])


def quiet_run(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TORCHVISION_CPU_EXT_VERBOSE"}
    if env.get("ATEN_CPU_CAPABILITY") == "":
        del env["ATEN_CPU_CAPABILITY"]  # empty: torch warns on import; unset means the same
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**env, "PYTHONPATH": str(ROOT)}, timeout=600
    )
    assert res.returncode == 0, res.stderr
    return res


def test_import_prints_nothing():
    # conftest's import built or found this variant's library: importing again loads it without
    # torch.utils.cpp_extension (which logs "No CUDA runtime is found" on import where a CUDA
    # toolkit is installed but no GPU is visible), and prints nothing.
    res = quiet_run(
        "import sys, torchvision_cpu_ext as t\n"
        "assert t.loaded_library().how in ('prebuilt', 'jit-cache')\n"
        "assert 'torch.utils.cpp_extension' not in sys.modules"
    )
    assert (res.stdout, res.stderr) == ("", "")


def test_cpp_extension_imported_without_its_cuda_warning():
    # Where a build runs the loader imports cpp_extension: without that warning, and only that
    # import is filtered (a later record of the same logger passes).
    res = quiet_run(
        "import logging, torchvision_cpu_ext\n"
        "torchvision_cpu_ext._loader._cpp_extension()\n"
        "logging.getLogger('torch.utils.cpp_extension').warning('No CUDA runtime is found: later')"
    )
    assert res.stdout == ""
    assert "No CUDA runtime is found" not in res.stderr.replace("No CUDA runtime is found: later", "")
    assert "No CUDA runtime is found: later" in res.stderr


def test_info_command():
    out = run_python("import runpy; runpy.run_module('torchvision_cpu_ext.info', run_name='__main__')")
    assert f"torch {torch.__version__}" in out
    assert "roi_align" in out and "torchvision_cpu_ext" in out
    d = torchvision_cpu_ext.info()
    assert d["ops"]["roi_align"] == "torchvision_cpu_ext"
    assert d["threads"] == torch.get_num_threads()
    assert d["isa_variant"] == torchvision_cpu_ext.loaded_library().isa


def test_detection_model_runs_on_our_kernels(native):
    from torchvision.models.detection import fasterrcnn_resnet50_fpn

    torch.manual_seed(0)
    model = fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=5, min_size=128, max_size=160
    ).eval()
    images = [torch.rand(3, 120, 150)]
    calls = []

    class Count(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "roi_align" in str(func):
                calls.append(args[0].dtype)
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Count():
        ours = model(images)
    assert calls, "the model did not call torchvision::roi_align"
    if not native:
        return  # no torchvision kernels to compare with in this configuration
    with torchvision_cpu_ext.disabled(), torch.no_grad():
        theirs = model(images)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a["boxes"], b["boxes"], rtol=1e-4, atol=1e-3)
        assert torch.equal(a["labels"], b["labels"])


def test_missing_toolchain_gives_actionable_errors(monkeypatch):
    from torch.utils import cpp_extension

    def no_ninja():
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(cpp_extension, "verify_ninja_availability", no_ninja)
    with pytest.raises(RuntimeError, match="pip install ninja"):
        _loader._check_toolchain()
    monkeypatch.setattr(cpp_extension, "verify_ninja_availability", lambda: None)
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    with pytest.raises(RuntimeError, match="C\\+\\+17 compiler .* `no-such-compiler-xyz` was not found"):
        _loader._check_toolchain()


def test_library_name_tracks_sources_flags_and_versions(monkeypatch):
    base = _build.library_name("AVX512", "2.14.1+cu130")
    assert base.startswith("tvce_avx512_torch2_14_1_cu130_")
    assert _build.library_name("AVX2", "2.14.1+cu130") != base
    assert _build.library_name("AVX512", "2.13.0+cpu") != base
    monkeypatch.setattr(_build, "COMMON_FLAGS", _build.COMMON_FLAGS + ["-DSOMETHING_ELSE"])
    assert _build.library_name("AVX512", "2.14.1+cu130") != base


def test_installed_package_names_libraries_from_its_manifest(monkeypatch, tmp_path):
    live = {isa: _build.library_name(isa, "2.14.1+cu130") for isa in _build.ISA_ORDER}
    manifest = tmp_path / "_prebuilt.json"
    manifest.write_text(json.dumps(_build.manifest("2.14.1+cu130", ["AVX2"])))
    # What a wheel looks like: no checkout sources next to the package, a manifest in it.
    monkeypatch.setattr(_build, "CSRC", tmp_path / "no-csrc")
    monkeypatch.setattr(_build, "PACKAGED_CSRC", tmp_path / "no-csrc-either")
    monkeypatch.setattr(_build, "MANIFEST", manifest)
    assert _build.source_dir() is None
    assert {isa: _build.library_name(isa, "2.14.1+cu130") for isa in _build.ISA_ORDER} == live


def test_variants_to_build():
    assert _build.variants_to_build(None) == _build.ISA_ORDER
    assert _build.variants_to_build("") == _build.ISA_ORDER
    assert _build.variants_to_build("default, avx512") == ["AVX512", "DEFAULT"]
    with pytest.raises(ValueError, match="unknown variant.*SSE4"):
        _build.variants_to_build("AVX2,SSE4")


def test_sanitizer_build_is_a_library_of_its_own_that_needs_its_runtime(monkeypatch):
    # scripts/sanitize.sh runs the suite on it; here, what it changes and its error without the runtime.
    monkeypatch.delenv(_build.SANITIZE_ENV, raising=False)
    plain = _build.library_name("AVX512", "2.14.1+cu130")
    assert not any("sanitize" in f for f in _build.cflags("AVX512") + _build.ldflags())
    monkeypatch.setenv(_build.SANITIZE_ENV, "1")
    assert _build.library_name("AVX512", "2.14.1+cu130") != plain
    assert "-fsanitize=address,undefined" in _build.cflags("AVX512")
    assert "-fsanitize=address,undefined" in _build.ldflags()
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    env.update(PYTHONPATH=str(ROOT), **{_build.SANITIZE_ENV: "1"})
    res = subprocess.run(
        [sys.executable, "-c", "import torchvision_cpu_ext"], capture_output=True, text=True, env=env, timeout=600
    )
    assert res.returncode != 0
    assert "LD_PRELOAD" in res.stderr and "scripts/sanitize.sh" in res.stderr
