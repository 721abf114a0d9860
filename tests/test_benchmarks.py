"""The benchmark command's machinery runs every op on a tiny case (no timing is asserted)."""

from __future__ import annotations

import base64
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import bench_ops  # noqa: E402

# The benchmark compares with torchvision's kernels, which only the native configuration has.
pytestmark = pytest.mark.needs_native


@pytest.mark.parametrize("op", sorted(bench_ops.STATEMENTS))
def test_bench_case_runs(op):
    channels = 2 * 3 * 3 if op.startswith("ps_") else 8
    case = bench_ops.Case(op, f"tiny {op}", (2, channels, 12, 14), 6, 0.25, 3)
    layouts, dtypes = ["nchw", "channels_last"], [torch.float32, torch.bfloat16]
    rows = bench_ops.bench_case(case, 1, 0.001, layouts, dtypes)
    # torchvision (fp32 only) and ours (every dtype), every layout, forward and backward: once each.
    expected = {
        (d, impl, lay, str(dt)[6:])
        for d in ("forward", "backward")
        for impl, dts in (("torchvision", dtypes[:1]), ("ours", dtypes))
        for lay in layouts
        for dt in dts
    }
    keys = [(r["direction"], r["impl"], r["layout"], r["dtype"]) for r in rows]
    assert len(keys) == len(set(keys)) and set(keys) == expected
    # Each speedup divides the same direction's torchvision NCHW float32 time by the row's.
    base = {
        r["direction"]: r["ms"]
        for r in rows
        if (r["impl"], r["layout"], r["dtype"]) == ("torchvision", "nchw", "float32")
    }
    for r in rows:
        assert r["ms"] > 0
        assert r["speedup_vs_torchvision_fp32_nchw"] == pytest.approx(base[r["direction"]] / r["ms"], rel=1e-9)


@pytest.mark.slow  # JIT-builds benchmarks/line_floor.cpp (torch/extension.h) on first use
def test_bench_case_line_floor():
    case = tiny_case("ps_roi_pool")
    rows = bench_ops.bench_case(case, 2, 0.001, ["nchw", "channels_last"], [torch.float32], line_floor=True)
    forward = [r for r in rows if r["direction"] == "forward"]
    assert len(forward) == 4 and all(r["line_floor_ms"] > 0 for r in forward)
    assert not any("line_floor_ms" in r for r in rows if r["direction"] == "backward")
    # Each row carries its layout's floor (torchvision's NCHW row the one the table divides by).
    floor = {(r["impl"], r["layout"]): r["line_floor_ms"] for r in forward}
    assert floor["torchvision", "nchw"] == floor["ours", "nchw"]
    assert floor["torchvision", "channels_last"] == floor["ours", "channels_last"]
    assert (forward[0]["impl"], forward[0]["layout"]) == ("torchvision", "nchw")
    tv_ms, nchw_floor = forward[0]["ms"], floor["ours", "nchw"]
    assert f"| {nchw_floor:.2f} ({tv_ms / nchw_floor:.1f}x) |" in bench_ops.markdown(
        {
            **dict.fromkeys(["cpu", "aten_cpu_capability", "isa_variant", "torch", "torchvision", "python", "command"]),
            "limits": dict.fromkeys(
                ["copy_gb_s_1t", "copy_gb_s_2t", "sgemm_gflop_s_1t", "sgemm_gflop_s_2t", "alloc_touch_50mb_ms"], 1.0
            ),
        },
        rows,
    )
    # The floor reads the bytes it is given: their sum, for a map of ones in bfloat16 (0x3F80).
    x = torch.ones(1000, dtype=torch.bfloat16)
    off = torch.tensor([0, 64, 129, 1999], dtype=torch.int64)
    assert bench_ops.line_floor_module().read_lines(x, off) == 0x80 + 0x80 + 0x3F + 0x3F
    with pytest.raises(RuntimeError, match="outside the tensor's storage"):
        bench_ops.line_floor_module().read_lines(x, torch.tensor([2000]))
    with pytest.raises(RuntimeError, match="offsets: contiguous int64"):
        bench_ops.line_floor_module().read_lines(x, off.int())
    misaligned = torch.from_numpy(np.zeros(1000, dtype=np.uint8)[1:])  # numpy aligns its buffer to 16
    with pytest.raises(RuntimeError, match="not aligned to 64 bytes"):
        bench_ops.line_floor_module().read_lines(misaligned, off[:1])


def test_interleaved_seconds_times_each_configuration_in_turn_with_its_kernels():
    log: list[tuple[str, bool]] = []
    env = {"log": log, "ext": bench_ops.torchvision_cpu_ext}
    configs = [(impl, f"log.append(({impl!r}, ext.is_enabled()))", env) for impl in ("torchvision", "ours")]
    secs = bench_ops.interleaved_seconds(configs, 0.001)
    assert len(secs) == 2 and all(s > 0 for s in secs)
    # torchvision's kernels (the package disabled) and ours alternate, round after round.
    assert {e for tag, e in log if tag == "torchvision"} == {False} and {e for tag, e in log if tag == "ours"} == {True}
    switches = sum(a[0] != b[0] for a, b in zip(log, log[1:], strict=False))
    assert switches == 2 * bench_ops.ROUNDS - 1
    assert bench_ops.torchvision_cpu_ext.is_enabled()


def test_bench_nms_runs(monkeypatch):
    monkeypatch.setattr(bench_ops, "NMS_CASES", [(50, False, 0.5), (50, True, 0.7)])
    rows = bench_ops.bench_nms(1, 0.001)
    assert [r["impl"] for r in rows] == ["torchvision", "ours"] * 3
    limits = dict.fromkeys(
        ["copy_gb_s_1t", "copy_gb_s_2t", "sgemm_gflop_s_1t", "sgemm_gflop_s_2t", "alloc_touch_50mb_ms"], 1.0
    )
    meta = dict.fromkeys(["cpu", "aten_cpu_capability", "isa_variant", "torch", "torchvision", "python", "command"], "")
    table = bench_ops.markdown({**meta, "limits": limits}, rows)
    assert table.count("| nms") == 4 and table.count("| batched_nms") == 2


def tiny_case(op: str, boxes: int = 6) -> bench_ops.Case:
    channels = 2 * 3 * 3 if op.startswith("ps_") else 8
    return bench_ops.Case(op, f"tiny {op}", (2, channels, 12, 14), boxes, 0.25, 3)


@pytest.mark.parametrize("op", sorted(bench_ops.STATEMENTS))
def test_work_model_footprint_is_what_the_forward_reads(op, torchvision_kernels):
    # The backward of all ones reaches exactly the input elements the forward reads with a
    # non-zero weight (roi_pool's only reaches its argmax, so its bins come from the reference).
    import numpy as np
    import reference

    case = tiny_case(op, boxes=20)
    rois = bench_ops.proposal_boxes(case, seed=3)
    n, c, h, w = case.shape
    p = case.pooled
    work = bench_ops.work_model(case, rois)
    tv = torch.ops.torchvision
    ones = torch.ones(case.boxes, c // (p * p) if op.startswith("ps_") else c, p, p)
    x = torch.randn(case.shape)
    if op == "roi_align":
        reached = tv._roi_align_backward(ones, rois, 0.25, p, p, n, c, h, w, 2, True)
    elif op == "ps_roi_align":
        mapping = tv.ps_roi_align(x, rois, 0.25, p, p, 2)[1]
        reached = tv._ps_roi_align_backward(ones, rois, mapping, 0.25, p, p, 2, n, c, h, w)
    elif op == "ps_roi_pool":
        mapping = tv.ps_roi_pool(x, rois, 0.25, p, p)[1]
        # The backward also scatters into the last row and column, which the forward never pools.
        reached = tv._ps_roi_pool_backward(ones, rois, mapping, 0.25, p, p, n, c, h, w)[..., :-1, :-1]
    else:
        mask, reads = np.zeros((n, h, w), dtype=bool), 0
        for k in range(case.boxes):
            b, rows, cols = reference._pool_bins(rois[k].tolist(), 0.25, p, p, 1, h, w, np.float32)
            for h0, h1 in rows:
                for w0, w1 in cols:
                    mask[b, h0:h1, w0:w1] = True
                    reads += max(h1 - h0, 0) * max(w1 - w0, 0)
        assert work == {"input_elems": int(mask.sum()) * c, "pool_reads": reads * c}
        return
    assert work["input_elems"] == int((reached != 0).sum())
    # The line-read floor's lines: those holding a reached element, in either layout and dtype.
    full = torch.zeros(case.shape, dtype=torch.bool)
    full[..., : reached.shape[2], : reached.shape[3]] = reached != 0
    masks = bench_ops.footprint(case, rois)[0]
    for layout in ("nchw", "channels_last"):
        order = full.permute(0, 2, 3, 1) if layout == "channels_last" else full
        for element_size in (4, 2):
            elems = torch.nonzero(order.reshape(-1)).flatten()
            expected = torch.unique(elems * element_size // bench_ops.LINE) * bench_ops.LINE
            assert torch.equal(bench_ops.input_lines(case, masks, layout, element_size), expected)


def test_nms_pairs_counts_the_greedy_loop():
    boxes, scores = bench_ops.nms_boxes(300, crowded=True)
    iou = torchvision.ops.box_iou(boxes, boxes)

    def brute(sel: torch.Tensor) -> int:
        order = sel[torch.sort(scores[sel], descending=True, stable=True).indices].tolist()
        suppressed, pairs = set(), 0
        for pos, i in enumerate(order):
            if i not in suppressed:
                for j in order[pos + 1 :]:
                    if j not in suppressed:
                        pairs += 1
                        if iou[i, j] > 0.5:
                            suppressed.add(j)
        return pairs

    assert bench_ops.nms_pairs(boxes, scores, 0.5) == brute(torch.arange(300))
    classes = torch.randint(0, 4, (300,), generator=torch.Generator().manual_seed(2))
    expected = sum(brute(torch.nonzero(classes == k).flatten()) for k in range(4))
    assert bench_ops.nms_pairs(boxes, scores, 0.5, classes) == expected


@pytest.mark.slow
def test_report_from_a_tiny_run(tmp_path, monkeypatch):
    import report

    monkeypatch.setattr(bench_ops, "NMS_CASES", [(50, False, 0.5)])
    rows = []
    for op in ("roi_align", "ps_roi_pool"):
        for threads in (1, 2):
            rows += bench_ops.bench_case(tiny_case(op), threads, 0.001, ["nchw", "channels_last"], [torch.float32])
    rows += bench_ops.bench_nms(1, 0.001)
    rows += bench_ops.bench_deform_conv2d(1, 0.001, [((1, 8, 6, 7), True)])
    rows += bench_ops.bench_depthwise(1, 0.001, DW_TINY, extras=())
    assert all(r["bytes"] > 0 and r["flops"] > 0 for r in rows)
    memory = {  # as bench_ops.deform_memory's, abridged
        "rows": [
            {
                "case": "deform_conv2d [1, 8, 6, 7] 3x3 DCNv2",
                "direction": d,
                "impl": impl,
                "layout": "nchw",
                "dtype": "float32",
                "threads": 2,
                "extra_peak_bytes": mib << 20,
                "output_bytes": 1 << 20,
                "columns_bytes": 3 << 20,
            }
            for d, impl, mib in (("forward", "torchvision", 5), ("forward", "ours", 1), ("backward", "ours", 2))
        ],
        "calibration": [{"alloc_free_100mib": 100.0, "return_100mib": 0.0, "two_8mib": 16.0}],
    }
    limits = {"copy_gb_s_1t": 10.0, "copy_gb_s_2t": 18.0, "sgemm_gflop_s_1t": 100.0, "sgemm_gflop_s_2t": 190.0}
    meta = dict.fromkeys(["cpu", "aten_cpu_capability", "isa_variant", "torch", "torchvision", "python"], "x")
    meta.update(
        command="tiny",
        limits=limits,
        info=bench_ops.json_info(),
        ops_when_disabled={"roi_align": "torchvision"},
        work_model=bench_ops.WORK_MODEL,
        kernels={"nms": ["nms", "boxes._batched_nms_vanilla"]},
    )
    written = report.build_report({"meta": meta, "rows": rows, "memory": memory}, tmp_path / "report")

    pngs = sorted(p.name for p in (tmp_path / "report").glob("*.png"))
    assert pngs == sorted(
        ["roofline.png", "speedup_depthwise_conv.png"]
        + [
            f"{kind}_{op}.png"
            for kind in ("speedup", "bandwidth")
            for op in ("roi_align", "ps_roi_pool", "nms", "deform_conv2d")
        ]
    )
    assert set(written) == {*pngs, "report.md", "report.html"}
    page = (tmp_path / "report" / "report.html").read_text()
    md = (tmp_path / "report" / "report.md").read_text()
    for name in pngs:
        assert base64.b64encode((tmp_path / "report" / name).read_bytes()).decode() in page
        assert f"]({name})" in md
    assert page.count('src="data:image/png;base64,') == len(pngs) and 'src="http' not in page
    # Tables, the machine's limits, the model and the kernels that ran are on the page.
    assert "tiny ps_roi_pool" in page and "sgemm GFLOP/s" in page and "grad_input written once" in page
    assert "_roi_align_backward" in page and "isa_variant" in page
    assert "| boxes._batched_nms_vanilla | torchvision_cpu_ext | ? | yes |" in md
    # deform_conv2d's section ends with the peak-memory table.
    line = "| deform_conv2d [1, 8, 6, 7] 3x3 DCNv2 | forward | 3.0 | 1.0 | 5.0 | 1.0 |"
    assert line in md and md.index(line) > md.index("## deform_conv2d") and "Extra peak memory per call" in page
    # depthwise_conv's section: its goals, conv1d, conv2d and roofline tables, then all its rows.
    dw = md[md.index("## depthwise_conv") :]
    titles = ["Goals (issue 19)", "Which is fastest", "conv1d, microseconds", "conv2d forward", "conv2d backward"]
    titles += ["Roofline", "Our paths"]
    titles.append("All rows")
    assert [dw.index(f"### {t}") for t in titles] == sorted(dw.index(f"### {t}") for t in titles)
    assert "<h3>Goals (issue 19)</h3>" in page and "| depthwise_conv2d [2, 8, 7, 6] k3x3 s2 | CL | bf16 | 1 |" in dw


def test_report_takes_bench_ops_arguments():
    import argparse

    import report

    ap = argparse.ArgumentParser()
    bench_ops.add_arguments(ap)
    ours = {s for a in report.parser()._actions for s in a.option_strings}
    assert {s for a in ap._actions for s in a.option_strings} <= ours
    a = report.parser().parse_args(["--quick", "--threads", "2", "--ops", "nms", "--min-time", "0.1"])
    b = ap.parse_args(["--quick", "--threads", "2", "--ops", "nms", "--min-time", "0.1"])
    assert {k: v for k, v in vars(a).items() if k in vars(b)} == vars(b)


def test_bench_frozen_bn_runs():
    rows = bench_ops.bench_frozen_bn(1, 0.001, shapes=[(1, 8, 5, 6)])
    assert [(r["impl"], r["layout"], r["dtype"]) for r in rows][:2] == [
        ("torchvision", "nchw", "float32"),
        ("torchvision", "nchw", "bfloat16"),
    ]
    assert len(rows) == 8 and all(r["ms"] > 0 and r["bytes"] > 0 for r in rows)
    assert rows[0]["speedup_vs_torchvision_fp32_nchw"] == 1.0


def test_bench_deform_conv2d_runs():
    rows = bench_ops.bench_deform_conv2d(1, 0.001, [((1, 8, 6, 7), True)])
    assert len(rows) == 2 * 7
    assert {(r["direction"], r["impl"]) for r in rows} >= {("forward", "ours"), ("backward", "aten_conv2d")}
    baseline = [r for r in rows if r["impl"] == "torchvision"]
    assert [r["speedup_vs_torchvision_fp32_nchw"] for r in baseline] == [1.0, 1.0]
    assert all(r["ms"] > 0 and r["vs_aten_conv2d"] > 0 for r in rows)


@pytest.mark.measures_memory
def test_extra_peak_reads_what_a_call_allocates():
    import peak_memory

    def alloc_free(mib):
        return lambda: torch.empty(mib * peak_memory.MIB // 4).fill_(1).sum()

    for call in (alloc_free(64), alloc_free(64)):  # warm-ups
        call()
    res = peak_memory.extra_peak(alloc_free(64))
    assert res["output_bytes"] == 4  # the sum
    assert abs(res["extra_peak_bytes"] / peak_memory.MIB - 64) < 3
    # The outputs are subtracted: returning the 64 MiB tensor reads about nothing extra.
    res = peak_memory.extra_peak(lambda: torch.empty(16 * peak_memory.MIB).fill_(1))
    assert res["output_bytes"] == 64 * peak_memory.MIB and abs(res["extra_peak_bytes"]) < 3 * peak_memory.MIB


@pytest.mark.measures_memory
def test_deform_memory_runs():
    import peak_memory

    # A fresh process under the malloc settings, as the benchmark's.
    memory = bench_ops.deform_memory([(1, 16, 40, 40)], warmup_hw=8)
    rows = memory["rows"]
    variants = {(r["impl"], r["layout"], r["dtype"], r["threads"]) for r in rows}
    assert len(rows) == 2 * len(peak_memory.MEMORY_VARIANTS) and variants == set(peak_memory.MEMORY_VARIANTS)
    assert all(r["columns_bytes"] == 16 * 9 * 40 * 40 * 4 for r in rows)
    assert all(r["rss_growth_bytes"] - r["output_bytes"] == r["extra_peak_bytes"] for r in rows)
    out32 = [r["output_bytes"] for r in rows if r["direction"] == "forward" and r["dtype"] == "float32"]
    assert set(out32) == {16 * 40 * 40 * 4}
    (cal,) = memory["calibration"]
    assert abs(cal["alloc_free_100mib"] - 100) < 3 and abs(cal["return_100mib"]) < 3 and abs(cal["two_8mib"] - 16) < 2
    md = peak_memory.memory_markdown(memory)
    assert "| deform_conv2d [1, 16, 40, 40] 3x3 DCNv2 | backward | 0.9 | " in md and "tv NCHW fp32 2T" in md


DW_TINY = [bench_ops.DwCase((2, 8, 10), 3, bias=True), bench_ops.DwCase((2, 8, 7, 6), 3, stride=2)]


def _dw_labels(rows: list[dict]) -> set[tuple]:
    return {(r["case"][:16], r["direction"], r["impl"], r["layout"], r["dtype"]) for r in rows}


def test_bench_depthwise_runs():
    rows = bench_ops.bench_depthwise(1, 0.001, DW_TINY, extras=())
    conv1d = {("depthwise_conv1d", "forward", impl, "ncl", "float32") for impl in ("ours_module", "ours_op", "aten")}
    conv1d.add(("depthwise_conv1d", "forward", "aten_module", "ncl", "float32"))
    conv2d = {
        ("depthwise_conv2d", "forward", impl, layout, str(dtype)[6:])
        for impl in ("ours", "aten")
        for layout, dtype in bench_ops.DW_FORWARD
    }
    conv2d |= {
        ("depthwise_conv2d", "backward", impl, layout, "float32")
        for impl in ("ours", "aten")
        for layout in ("nchw", "channels_last")
    }
    assert len(rows) == len(conv1d | conv2d) and _dw_labels(rows) == conv1d | conv2d
    for r in rows:
        aten = next(
            a["ms"]
            for a in rows
            if a["impl"] == "aten"
            and (a["case"], a["direction"], a["layout"], a["dtype"], a["threads"])
            == (r["case"], r["direction"], r["layout"], r["dtype"], r["threads"])
        )
        assert r["ms"] > 0 and r["speedup_vs_aten"] == pytest.approx(aten / r["ms"], rel=1e-9)
        assert r["speedup_vs_torchvision_fp32_nchw"] is None and r["fastest"] in bench_ops.DW_CALLS
        # Our forward rows name the path they took, as info's depthwise_path says.
        assert ("path" in r) == (r["impl"].startswith("ours") and r["direction"] == "forward")
    # bytes: input + output + weights (+ bias) once each; the stride-2 map is 4 x 3.
    fwd = {(r["case"][:16], r["direction"], r["dtype"]): r for r in rows if r["layout"] != "channels_last"}
    assert fwd["depthwise_conv1d", "forward", "float32"]["bytes"] == (2 * 8 * 10 * 2 + 8 * 3 + 8) * 4
    assert fwd["depthwise_conv2d", "forward", "bfloat16"]["bytes"] == (2 * 8 * 42 + 2 * 8 * 12 + 8 * 9) * 2
    assert fwd["depthwise_conv2d", "backward", "float32"]["bytes"] == (2 * 8 * 12 + 2 * 2 * 8 * 42 + 2 * 8 * 9) * 4
    assert fwd["depthwise_conv2d", "forward", "float32"]["flops"] == 2 * 2 * 8 * 12 * 9


@pytest.mark.slow  # JIT-builds benchmarks/empty_op.cpp on first use and compiles with Inductor
def test_bench_depthwise_extras():
    rows = bench_ops.bench_depthwise(1, 0.001, DW_TINY[1:])
    peers = [p for p, v in bench_ops.dw_peer_versions().items() if v and p != "torch.compile"]
    forward = {(r["impl"], r["layout"], r["dtype"]) for r in rows if r["direction"] == "forward"}
    extra = {("empty_op", "nchw", "float32")} | {(p, "nchw", "float32") for p in peers}
    extra |= {("torch.compile", layout, str(dtype)[6:]) for layout, dtype in bench_ops.DW_FORWARD}
    assert forward == extra | {
        (impl, lay, str(dt)[6:]) for impl in ("ours", "aten") for lay, dt in bench_ops.DW_FORWARD
    }
    empty = next(r for r in rows if r["impl"] == "empty_op")
    assert empty["bytes"] is None and empty["flops"] is None
    # The empty op returns what the convolution returns, but for the values.
    x = torch.randn(2, 8, 7, 6).contiguous(memory_format=torch.channels_last)
    w = torch.randn(8, 1, 3, 3)
    y = bench_ops.empty_op_module().depthwise_conv2d(x, w, None, [2, 2], [1, 1], [1, 1])
    ref = torch.nn.functional.conv2d(x, w, None, 2, 1, 1, 8)
    assert y.shape == ref.shape and y.stride() == ref.stride() and y.dtype == ref.dtype
    assert bench_ops.empty_op_module().depthwise_conv1d(x[:, :, 0], w[..., 0], None, [1], [1], [1]).shape == (2, 8, 6)
    # ONNX Runtime and OpenVINO compute the same convolution.
    case, (x32, w32, _, _) = DW_TINY[1], bench_ops.dw_inputs(DW_TINY[1])
    for peer in peers:
        stmt, env = bench_ops.dw_peer_config(peer, case, x32, w32, None, 1)
        out = eval(stmt, env)
        out = out[0] if isinstance(out, list) else out.to_tuple()[0]
        ref = torch.nn.functional.conv2d(x32, w32, None, 2, 1, 1, 8)
        torch.testing.assert_close(torch.from_numpy(out), ref, rtol=1e-4, atol=1e-5)


def test_depthwise_report_tables():
    import report

    def row(case, impl, ms, layout="nchw", dtype="float32", direction="forward", nbytes=10**6):
        key = {"case": case, "direction": direction, "impl": impl, "layout": layout, "dtype": dtype, "threads": 2}
        return {**key, "ms": ms, "bytes": nbytes, "flops": 1, "fastest": "ours", "op": "depthwise_conv"}

    big = 40 * 2**20
    rows = [
        row("c1", "aten", 0.06, "ncl"),
        row("c1", "ours_module", 0.003, "ncl"),  # 20x
        row("c1", "empty_op", 0.0015, "ncl", nbytes=None),
        row("a", "aten", 1.0),
        row("a", "ours", 0.1),  # 10x NCHW fp32
        row("a", "aten", 1.0, dtype="bfloat16"),
        row("a", "ours", 0.4, dtype="bfloat16"),  # 2.5x NCHW bf16: geometric mean 5x
        row("a", "aten", 1.0, "channels_last"),
        row("a", "ours", 1.25, "channels_last"),  # 0.8x: slower than ATen
        row("b", "aten", 8.0, "channels_last", nbytes=big),
        row("b", "ours", 2.0, "channels_last", nbytes=big),  # 4x; geometric mean with 0.8x: 1.79x
        row("b", "aten", 2.0, direction="backward"),
        row("b", "ours", 1.0, direction="backward"),
    ]
    for r in rows:
        key = (r["case"], r["direction"], r["layout"], r["dtype"])
        aten = next(
            a for a in rows if a["impl"] == "aten" and (a["case"], a["direction"], a["layout"], a["dtype"]) == key
        )
        r["speedup_vs_aten"] = aten["ms"] / r["ms"]
    limits = {"copy_gb_s_2t": 20.0, "llc_bytes": float(32 * 2**20)}
    rows = report.derive(rows, limits)
    goals = report.dw_goals_table(rows, limits)[0]
    assert "| conv1d through optimize(), vs F.conv1d (every case) | 2 | 20.0x | >= 15x | yes |" in goals
    assert "| conv2d forward, vs ATen (every row: min) | 2 | 0.80x | >= 1x | **no** |" in goals
    assert "| conv2d NCHW rows (geometric mean) | 2 | 5.00x over 2 rows | >= 5x | yes |" in goals
    assert "| conv2d channels_last fp32 rows (geometric mean) | 2 | 1.79x over 2 rows | >= 2x | **no** |" in goals
    # Only "b" is beyond the last-level cache: 41.9 MB in 2 ms is 21 GB/s, 105% of 20 GB/s.
    assert "| large rows: % of the copy bandwidth | 2 | 105% CL fp32 | >= 80% | yes |" in goals
    assert "| conv2d backward, vs ATen (geometric mean) | 2 | 2.00x over 1 rows; min 2.00x | >= 2x | yes |" in goals
    conv1d = report.dw_conv1d_table(rows)[0]
    assert "| c1 | 2 | 60.0 |  | 3.0 (20.00x) |  | 1.5 (50%) |  |  |  | ours |" in conv1d
    fastest = report.dw_fastest_table(rows)[0]
    assert "| a | forward | 2 | ours NCHW 0.100 ms | ours NCHW 0.400 ms |" in fastest
    assert "| b | forward | 2 | ours CL 2.000 ms |  |" in fastest and "| c1 | forward | 2 | ours_module ncl" in fastest
    roofline = report.dw_roofline_table(rows, limits)[0]
    assert roofline.count("| b | forward | CL | fp32 | 2 |") == 2 and "| 2.097 | 2.000 | 21.0 | 105 |" in roofline
