"""The end-to-end report (``bench/bench_e2e.py``'s ``render``) on the committed H200 results: no GPU, no ComfyUI.

The speed-up column is what the closing notes quote against issue 7's targets, so a ratio just under its
target (Wan 2.1-14B at 16:11 UTC with ComfyUI's eager RoPE: 2.887 / 1.927 s = 1.498x against 1.5x) must
print as missed, not round up to "1.50x".
"""

import importlib.util
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: the current table: 2026-12-04 14:48 UTC, the kernels with the row sums of NOTES #48
RESULTS = os.path.join(ROOT, "bench", "results", "h200_e2e.json")
#: ComfyUI 0.19.3, 2026-12-03 23:06 UTC (the kernels before NOTES #45-#48)
RESULTS_1203 = os.path.join(ROOT, "bench", "results", "h200_e2e_20261203.json")
RESULTS_COMFYUI080 = os.path.join(ROOT, "bench", "results", "h200_e2e_comfyui080.json")
#: the 16:11 UTC runs (comfy-kitchen's eager RoPE), whose Wan 2.1-14B row sits just under its target
RESULTS_EAGER_ROPE = os.path.join(ROOT, "bench", "results", "h200_e2e_eager_rope.json")
#: Flux with RoPE in the kernel (default) and left to ComfyUI (topk0.5-comfyrope), 2026-12-04
RESULTS_FLUX_ROPE = os.path.join(ROOT, "bench", "results", "h200_e2e_flux_rope.json")
#: Flux and HunyuanVideo, RoPE in the kernel and left to ComfyUI, 2026-12-04 11:01 UTC
RESULTS_HUNYUAN_ROPE = os.path.join(ROOT, "bench", "results", "h200_e2e_hunyuan_rope.json")


def _bench_e2e():
    spec = importlib.util.spec_from_file_location("bench_e2e_report", os.path.join(ROOT, "bench", "bench_e2e.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _summary_rows(text):
    rows = {}
    for line in text.splitlines():
        m = re.match(r"\| (.+?) \((\d+) tok\) \|", line)
        if m:
            rows[m.group(1)] = [c.strip() for c in line.strip("|").split("|")]
    return rows


def _load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def test_speedups_are_judged_against_the_targets_unrounded():
    E = _bench_e2e()
    for path in (RESULTS, RESULTS_1203, RESULTS_COMFYUI080, RESULTS_EAGER_ROPE, RESULTS_FLUX_ROPE, RESULTS_HUNYUAN_ROPE):
        results = _load(path)
        rows = _summary_rows(E.render(results))
        assert set(rows) == {r["label"] for r in results["models"].values()}
        for row in results["models"].values():
            c = row["configs"]
            ratio = c["unpatched"]["s_per_step"] / c["topk0.5"]["s_per_step"]
            cells = rows[row["label"]]
            assert cells[5] == f"{ratio:.3f}×", cells
            assert cells[6] == f"≥ {row['target']}×: {'met' if ratio >= row['target'] else 'missed'}", cells
    results = _load(RESULTS_EAGER_ROPE)
    wan14 = _summary_rows(E.render(results))["Wan 2.1-14B 480p 81f"]
    assert wan14[5] == "1.498×" and wan14[6].endswith("missed"), wan14
    # the same record moved just over its target reads as met
    c = results["models"]["wan14b"]["configs"]
    c["topk0.5"]["s_per_step"] = c["unpatched"]["s_per_step"] / 1.5 * 0.999
    assert _summary_rows(E.render(results))["Wan 2.1-14B 480p 81f"][6] == "≥ 1.5×: met"


def test_the_report_names_the_rope_that_ran():
    E = _bench_e2e()
    for path in (RESULTS, RESULTS_1203, RESULTS_COMFYUI080):
        assert "RoPE: comfy-kitchen 0.2.40, cuda backend;" in E.render(_load(path))
    assert "RoPE: not recorded;" in E.render(_load(RESULTS_EAGER_ROPE))  # runs from before the field existed


def _detail_rows(text):
    """The rows of the report's details table, by (model, config)."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 16:
            rows[cells[0], cells[1]] = cells
    return rows


def test_the_details_count_the_calls_that_rotated_in_the_kernel():
    E = _bench_e2e()
    for path, model, calls in ((RESULTS_FLUX_ROPE, "Flux.1 1024²", "57"), (RESULTS_HUNYUAN_ROPE, "Flux.1 1024²", "57"),
                               (RESULTS_HUNYUAN_ROPE, "HunyuanVideo 720p 129f", "60")):
        rows = _detail_rows(E.render(_load(path)))
        assert (rows[model, "topk0.5"][15] == calls and rows[model, "topk0.5-comfyrope"][15] == "0"
                and rows[model, "unpatched"][15] == "—")
    assert "topk0.5-comfyrope" in E.CONFIGS and E.CONFIGS["topk0.5-comfyrope"]["fuse_rope"] is False
    old = {m: c[15] for (m, cfg), c in _detail_rows(E.render(_load(RESULTS_1203))).items() if cfg == "topk0.5"}
    assert old and set(old.values()) == {"—"}, old  # older results have no such field
    # the current table: the node's default (RoPE in the kernel) where the model allows it
    rotated = {m: c[15] for (m, cfg), c in _detail_rows(E.render(_load(RESULTS))).items() if cfg == "topk0.5"}
    assert rotated == {"Wan 2.1-1.3B 480p 81f": "0", "Flux.1 1024²": "57", "Wan 2.1-14B 480p 81f": "0",
                       "HunyuanVideo 720p 129f": "60"}, rotated
