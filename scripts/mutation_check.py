"""Shows that the tests catch deliberate bugs: each mutation is applied to a copy of the
checkout, built, and the named tests must fail; the checkout itself is never touched.

    .venv/bin/python scripts/mutation_check.py [--only NAME] [--keep]

Each copy builds into its own kernel cache (a mutated source has its own digest anyway), so the
checkout's cached libraries are not disturbed. Exit status 0 when every mutation is caught.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTATIONS = [
    Mutation(
        "roi_align bilinear weight on the wrong tap",
        "csrc/cpu/roi_geometry.h",
        "      add(lo, h);\n      add(hi, l);\n",
        "      add(lo, l);\n      add(hi, h);\n",
        ("tests/test_roi_align.py",),
    ),
    Mutation(
        "nms suppresses at IoU >= threshold instead of >",
        "csrc/cpu/nms_kernel.cpp",
        "_mm512_set1_ps(thr), _CMP_GT_OQ);",
        "_mm512_set1_ps(thr), _CMP_GE_OQ);",
        ("tests/test_nms.py",),
    ),
    Mutation(
        "ps forward reads the next bin's channel of its group",
        "csrc/cpu/ps_drivers.h",
        "input + m * C * HW + (c0 * P + bin_index) * HW;",
        "input + m * C * HW + (c0 * P + (bin_index + 1) % P) * HW;",
        ("tests/test_ps_roi_align.py", "tests/test_ps_roi_pool.py"),
    ),
]


def run(m: Mutation, keep: bool) -> bool:
    work = Path(tempfile.mkdtemp(prefix="tvce-mutation-"))
    try:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(work)], check=True)
        shutil.copytree(ROOT / "csrc", work / "csrc", dirs_exist_ok=True)  # uncommitted kernel edits too
        path = work / m.file
        text = path.read_text()
        if text.count(m.old) != 1:
            print(f"[{m.name}] the code to mutate is not found exactly once in {m.file}: update this script")
            return False
        path.write_text(text.replace(m.old, m.new))
        env = {**os.environ, "PYTHONPATH": str(work), "TORCHVISION_CPU_EXT_CACHE": str(work / ".kernel-cache")}
        t0 = time.time()
        # Built once here, not by both pytest workers at once.
        subprocess.run([sys.executable, "-c", "import torchvision_cpu_ext"], cwd=work, env=env, check=True)
        res = subprocess.run(
            [sys.executable, "-m", "pytest", *m.tests, "-q", "-x", "-p", "no:cacheprovider", "-n", "2"],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
        )
        summary = [line for line in res.stdout.splitlines() if line.startswith("FAILED") or " passed" in line]
        # -x stops at the first failures (pytest-xdist then reports them as an interruption, exit 2).
        caught = res.returncode != 0 and any(line.startswith("FAILED") for line in summary)
        print(f"[{m.name}] {'CAUGHT' if caught else 'NOT CAUGHT'} in {time.time() - t0:.0f} s (build included)")
        for line in summary[:4]:
            print(f"    {line}")
        if not caught and res.returncode != 0:
            print(res.stdout[-2000:], res.stderr[-2000:])
        return caught
    finally:
        if keep:
            print(f"    kept {work}")
        else:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(work)], check=False)
            shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="run the mutations whose name contains this")
    ap.add_argument("--keep", action="store_true", help="keep each mutated copy")
    a = ap.parse_args()
    chosen = [m for m in MUTATIONS if not a.only or a.only in m.name]
    results = [run(m, a.keep) for m in chosen]
    print(f"{sum(results)} of {len(results)} mutations caught")
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
