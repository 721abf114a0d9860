"""Concurrency: every op of the op table called from many Python threads at once gives, bit for
bit, what a serial call gives; the output pool stays bounded and nothing leaks; enable() and
disable() refuse to switch while other threads run torchvision ops.

The calls are the per-op test files' own (their module-level sample_inputs(), op_tester.Sample),
so every row of the op table is covered (test_every_op_has_sample_inputs) without a second list
of ops or of input makers here.

What runs at once (test_concurrent_calls_equal_serial_calls): THREADS Python threads, released
together, each calling every sample of every op in its own shuffled order, CALLS times per op
(spread over the op's samples). Before each call a thread sets its torch.set_num_threads from its
own cycle (1, 2 or 3 intra-op threads, so parallel regions of different sizes run at once), and
calls in its own mode: under torch.inference_mode(), under torch.no_grad(), or with autograd
(forward, then torch.autograd.grad of the sample's grad_args for a fixed output gradient). The
debug thresholds send these small inputs down the parallel paths, and every output through the
output pool (its mutex is then on every call). Each output and gradient must equal the serial
result of the same call at the same thread count bit for bit (dtype, shape, strides, and the bits:
NaN where NaN).

torch.set_num_threads: with ATen's OpenMP backend it sets the calling thread's OpenMP thread count
(an OpenMP ICV, per thread) and the default of threads that have not run a parallel region yet;
threads that already have their own count keep it, and keep it through their first call of our
kernels (NOTE [ thread count on first use ] in csrc/cpu/override.cpp: that call used to reset it
to the process-wide count; test_a_threads_own_thread_count_survives_its_first_call_of_each_op).
So each thread here sets its own count before each call, reads it back (torch.get_num_threads())
and compares with the serial result at that count; the serial results at 1, 2 and 3 threads
differ only for deform_conv2d's gradients (deterministic per count, not across counts:
TestDeformConv2d.thread_invariant).

Long mode (on demand, >= 16 threads x 1,000 calls per op; the result is in benchmarks/RESULTS.md):
    TORCHVISION_CPU_EXT_CONCURRENCY_LONG=1 PYTHONPATH=. python -m pytest tests/test_concurrency.py -s
"""

from __future__ import annotations

import ctypes
import importlib
import os
import random
import resource
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.utils._python_dispatch
from op_tester import Sample, seeded_randn

import torchvision_cpu_ext
from torchvision_cpu_ext import _debug, _op_table, _registry
from torchvision_cpu_ext._info import cpu_kernel_owner

LONG = os.environ.get("TORCHVISION_CPU_EXT_CONCURRENCY_LONG") == "1"
THREADS = 16 if LONG else 8
CALLS = 1000 if LONG else 30  # per op and thread
THREAD_COUNTS = (1, 2, 3)
MODES = ("inference_mode", "no_grad", "grad")

# Parallel paths and the output pool for small inputs (NOTE [ debug thresholds ]): the same in
# the serial and the concurrent calls, so both take the same paths.
STRESS = dict(
    output_pool_min_bytes=1,
    deform_serial_work=0,
    depthwise_serial_work=0,
    nms_parallel_work=0,
    nms_radix_min=0,
    grad_band_bytes=2048,
)


def load_samples() -> dict[str, list[Sample]]:
    """{op table row: its samples}, from every test file with a module-level sample_inputs()."""
    samples: dict[str, list[Sample]] = {}
    for path in sorted(Path(__file__).parent.glob("test_*.py")):
        if "\ndef sample_inputs(" not in path.read_text():
            continue
        for row, calls in importlib.import_module(path.stem).sample_inputs().items():
            assert row not in samples, f"two test files give samples of {row}"
            samples[row] = calls
    return samples


@pytest.fixture(scope="module")
def samples() -> dict[str, list[Sample]]:
    return load_samples()


def _tensors(result: Any) -> tuple[torch.Tensor, ...]:
    return tuple(result) if isinstance(result, (tuple, list)) else (result,)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's values as integers, so that equality is bitwise (NaN payloads and signed
    zeros included) and needs no NaN rule."""
    if t.is_quantized:
        t = t.int_repr()
    if t.is_floating_point():
        t = t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
    return t


def identical(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride() and torch.equal(bits(a), bits(b))


class Call:
    """One sample's call in one mode: outputs (and gradients) as a tuple of tensors."""

    def __init__(self, sample: Sample):
        self.sample = sample
        self.grad_out: torch.Tensor | None = None
        if sample.grad_args:
            with torch.no_grad():
                out = sample.output(sample.fn(*sample.args))
            self.grad_out = seeded_randn(out.shape, out.dtype).to(out.dtype)

    def __call__(self, mode: str) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor | None, ...]]:
        s = self.sample
        if mode == "grad" and s.grad_args:
            args = list(s.args)
            for i in s.grad_args:
                if args[i] is not None:
                    args[i] = args[i].detach().requires_grad_()
            result = s.fn(*args)
            leaves = [args[i] for i in s.grad_args if args[i] is not None]
            grads = torch.autograd.grad(s.output(result), leaves, self.grad_out, allow_unused=True)
            return tuple(t.detach() for t in _tensors(result)), grads
        with torch.inference_mode() if mode == "inference_mode" else torch.no_grad():
            return _tensors(s.fn(*s.args)), ()


def serial_results(calls: dict[tuple[str, str], Call]) -> dict:
    """{(row, sample, thread count): (outputs, gradients)} of serial calls."""
    before = torch.get_num_threads()
    results = {}
    try:
        for count in THREAD_COUNTS:
            torch.set_num_threads(count)
            for key, call in calls.items():
                outs, _ = call("no_grad")
                _, grads = call("grad") if call.sample.grad_args else ((), ())
                results[(*key, count)] = (outs, grads)
    finally:
        torch.set_num_threads(before)
    return results


def run_concurrently(samples: dict[str, list[Sample]], threads: int, calls_per_op: int, seed: int = 0) -> dict:
    """The concurrent calls against the serial ones. Returns calls and differences per op, the
    failures (first few), the errors raised in the threads and the wall time."""
    calls = {(row, s.name): Call(s) for row, row_samples in samples.items() for s in row_samples}
    expected = serial_results(calls)
    counts: Counter[str] = Counter()
    differences: Counter[str] = Counter()
    failures: list[str] = []
    errors: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(threads)

    def worker(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        mode = MODES[index % len(MODES)]
        cycle = THREAD_COUNTS[(index // len(MODES)) % len(THREAD_COUNTS) :] + THREAD_COUNTS
        # calls_per_op calls of each op, its samples in turn; then one shuffled order per thread.
        plan = [
            (row, calls[(row, s.name)])
            for row, rs in samples.items()
            for i in range(calls_per_op)
            for s in [rs[i % len(rs)]]
        ]
        rng.shuffle(plan)
        local = Counter()
        local_diff = Counter()
        local_fail = []
        try:
            start.wait()
            for n, (row, call) in enumerate(plan):
                torch.set_num_threads(cycle[n % len(THREAD_COUNTS)])
                count = torch.get_num_threads()
                outs, grads = call(mode)
                want_outs, want_grads = expected[(row, call.sample.name, count)]
                ok = all(identical(a, b) for a, b in zip(outs, want_outs, strict=True))
                if grads:
                    ok = ok and all(identical(a, b) for a, b in zip(grads, want_grads, strict=True))
                local[row] += 1
                if not ok:
                    local_diff[row] += 1
                    local_fail.append(f"{call.sample.name} (thread {index}, {mode}, {count} intra-op threads)")
        except Exception as e:  # reported by the test, with the thread's settings
            errors.append(f"thread {index} ({mode}): {type(e).__name__}: {e}")
        with lock:
            counts.update(local)
            differences.update(local_diff)
            failures.extend(local_fail[:5])

    begin = time.perf_counter()
    workers = [threading.Thread(target=worker, args=(i,), name=f"tvce-concurrency-{i}") for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return dict(
        calls=counts, differences=differences, failures=failures, errors=errors, seconds=time.perf_counter() - begin
    )


def test_every_op_has_sample_inputs(samples):
    rows = {row.name for row in _op_table.OPS if row.implemented}
    assert set(samples) == rows, (
        f"op table rows without sample_inputs() in their test file: {sorted(rows - set(samples))}; "
        f"samples of no row: {sorted(set(samples) - rows)}"
    )
    assert all(samples[row] for row in rows)


def test_concurrent_calls_equal_serial_calls(samples):
    with _debug.thresholds(**STRESS):
        before = torch.get_num_threads()
        try:
            result = run_concurrently(samples, THREADS, CALLS)
        finally:
            torch.set_num_threads(before)
            torchvision_cpu_ext.empty_cache()
    total = sum(result["calls"].values())
    print(
        f"\nconcurrency: {THREADS} threads x {CALLS} calls per op, {len(samples)} ops, {total} calls in "
        f"{result['seconds']:.1f} s; differences per op: "
        + ", ".join(f"{row} {result['differences'][row]}/{result['calls'][row]}" for row in sorted(samples))
    )
    assert not result["errors"], result["errors"][:5]
    assert all(result["calls"][row] == THREADS * CALLS for row in samples), result["calls"]
    assert sum(result["differences"].values()) == 0, result["failures"][:20]


def test_a_threads_own_thread_count_survives_its_first_call_of_each_op(samples):
    """NOTE [ thread count on first use ] (csrc/cpu/override.cpp): a thread that set its own count
    keeps it through its first call of our kernels, though another thread set another count
    since; and the kernels run at the thread's count. One fresh thread per op, so that each op's
    call is its thread's first."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    kept = {}
    try:
        for row, row_samples in samples.items():
            own, others_set = threading.Event(), threading.Event()

            def first_calls(row=row, row_samples=row_samples, own=own, others_set=others_set) -> None:
                torch.set_num_threads(1)
                torch.get_num_threads()  # libtorch's own initialisation of this thread (any ATen op)
                torch.set_num_threads(1)
                own.set()
                others_set.wait(30)
                with _debug.thresholds(**STRESS):
                    for sample in row_samples:
                        Call(sample)("grad")
                kept[row] = torch.get_num_threads()

            thread = threading.Thread(target=first_calls)
            thread.start()
            own.wait(30)
            torch.set_num_threads(2)  # the process-wide count, now not the thread's
            others_set.set()
            thread.join()
    finally:
        torch.set_num_threads(before)
    assert kept == {row: 1 for row in samples}


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
    ] + [("keepcost", ctypes.c_size_t)]


def _heap_in_use() -> int | None:
    """Bytes the C heap has handed out and not had back (glibc's mallinfo2, every arena): what
    a leak of C++ or Python objects grows, without RSS's page-level noise. None off glibc."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallinfo2.restype = _Mallinfo2
    except (OSError, AttributeError):
        return None
    info = libc.mallinfo2()
    return int(info.uordblks + info.hblkhd)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


LEAK_CALLS = 10_000
LEAK_WINDOWS = 10  # of LEAK_CALLS // LEAK_WINDOWS calls; the first WARMUP fill caches and pools
LEAK_WARMUP = 3
LEAK_THREADS = 4
RSS_SLACK = 16 << 20
HEAP_SLACK = 512 << 10


def measure_steady_state(samples: dict[str, list[Sample]], calls: int = LEAK_CALLS) -> list[dict[str, int]]:
    """calls of every sample in turn from LEAK_THREADS threads (the same threads throughout, each
    in one mode), with the output pool on every output; after each window (all threads stopped)
    RSS, the heap in use but the pool's blocks, and the pool's cached bytes."""
    calls_of = [Call(s) for rs in samples.values() for s in rs]
    per_window = calls // LEAK_WINDOWS // LEAK_THREADS
    window_done = threading.Barrier(LEAK_THREADS + 1)
    errors: list[str] = []

    def worker(index: int) -> None:
        mode = MODES[index % len(MODES)]
        n = index
        for _ in range(LEAK_WINDOWS):
            try:
                for _ in range(per_window):
                    calls_of[n % len(calls_of)](mode)
                    n += 1
            except Exception as e:  # reported by the test
                errors.append(f"thread {index}: {type(e).__name__}: {e}")
            window_done.wait()
            window_done.wait()  # the main thread has measured

    points = []
    workers = [threading.Thread(target=worker, args=(i,)) for i in range(LEAK_THREADS)]
    for w in workers:
        w.start()
    for _ in range(LEAK_WINDOWS):
        window_done.wait()
        cached = int(torch.ops.torchvision_cpu_ext._output_pool_stats()[0])
        heap = _heap_in_use()
        points.append(dict(rss=_rss(), heap=None if heap is None else heap - cached, pool=cached))
        window_done.wait()
    for w in workers:
        w.join()
    assert not errors, errors[:5]
    return points


@pytest.mark.measures_memory
def test_output_pool_bounded_and_memory_steady_over_10000_calls(samples):
    """10,000 calls of every op from 4 threads, every output through the output pool: the pool
    stays within its cap and empty_cache() empties it; RSS and the heap (but the pool's blocks)
    stop growing once the caches are warm: after the warm-up windows, no window grows RSS by more
    than RSS_SLACK above the warm-up's end, nor the heap by more than HEAP_SLACK. A leak of one
    output per call (~KiB) grows both by MiBs per window; see the long-mode note in RESULTS.md for
    the check that they fail then."""
    with _debug.thresholds(**STRESS):
        try:
            points = measure_steady_state(samples)
        finally:
            torchvision_cpu_ext.empty_cache()
    cap = int(torch.ops.torchvision_cpu_ext._output_pool_stats()[1])
    print(
        "\nmemory per window (MiB): "
        + "; ".join(
            f"rss {p['rss'] / 2**20:.1f} heap {(p['heap'] or 0) / 2**20:.2f} pool {p['pool'] / 2**20:.2f}"
            for p in points
        )
    )
    assert all(0 < p["pool"] <= cap for p in points)
    assert torch.ops.torchvision_cpu_ext._output_pool_stats()[0] == 0
    base = points[LEAK_WARMUP - 1]
    steady = points[LEAK_WARMUP:]
    assert max(p["rss"] for p in steady) - base["rss"] <= RSS_SLACK, points
    if base["heap"] is not None:
        assert max(p["heap"] for p in steady) - base["heap"] <= HEAP_SLACK, points


class _BlockInRoIAlign(torch.utils._python_dispatch.TorchDispatchMode):
    """Holds the thread that enters torchvision::roi_align until released: a thread inside an op."""

    def __init__(self) -> None:
        super().__init__()
        self.inside, self.release = threading.Event(), threading.Event()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name == "torchvision::roi_align":
            self.inside.set()
            self.release.wait(30)
        return func(*args, **(kwargs or {}))


@pytest.mark.needs_native
@pytest.mark.parametrize("switch", ["disable", "enable"])
def test_switching_while_another_thread_runs_an_op_raises(switch):
    import torchvision

    if switch == "enable":
        torchvision_cpu_ext.disable()
    block = _BlockInRoIAlign()

    def call() -> None:
        with block:
            torchvision.ops.roi_align(torch.rand(1, 2, 8, 8), [torch.tensor([[0.0, 0.0, 4.0, 4.0]])], 2)

    thread = threading.Thread(target=call, name="tvce-in-roi_align")
    thread.start()
    try:
        assert block.inside.wait(30)
        assert _registry.threads_in_ops() == ["tvce-in-roi_align"]
        busy = rf"{switch}\(\) while other threads run torchvision ops \(tvce-in-roi_align\)"
        with pytest.raises(RuntimeError, match=busy):
            getattr(torchvision_cpu_ext, switch)()
        assert torchvision_cpu_ext.is_enabled() == (switch == "disable")  # nothing switched
    finally:
        block.release.set()
        thread.join()
        torchvision_cpu_ext.enable()
    assert _registry.threads_in_ops() == []
    with torchvision_cpu_ext.disabled():  # and once no other thread is in an op, it switches
        assert not torchvision_cpu_ext.is_enabled()
    assert cpu_kernel_owner("roi_align") == "torchvision_cpu_ext"


@pytest.mark.needs_native
def test_switches_from_many_threads_at_once_stay_consistent():
    """enable() and disable() from 8 threads at once (no ops running): each switch is atomic, so
    no registration is made twice or dropped half, and the last switch decides the state."""
    start = threading.Barrier(8)
    errors = []

    def switch(index: int) -> None:
        start.wait()
        for _ in range(25):
            try:
                (torchvision_cpu_ext.disable if index % 2 else torchvision_cpu_ext.enable)()
            except Exception as e:  # reported by the test
                errors.append(repr(e))

    threads = [threading.Thread(target=switch, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    torchvision_cpu_ext.disable()
    assert not errors, errors[:3]
    assert cpu_kernel_owner("roi_align") == "torchvision" and not torchvision_cpu_ext.is_enabled()
    torchvision_cpu_ext.enable()
    assert cpu_kernel_owner("roi_align") == "torchvision_cpu_ext" and torchvision_cpu_ext.is_enabled()
