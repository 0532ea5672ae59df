"""Plumbing of the end-to-end benchmark (``bench/bench_e2e.py --tiny``) inside a real ComfyUI (``COMFYUI_PATH``).

The script runs as the lead runs it on the GPU (a subprocess), with tiny random-weight models on the CPU:
once with the kernel off, where every patched call must stay dense with the reason "not CUDA" and the
latent must equal the unpatched one, and once with the kernel in the Triton interpreter, where the
patched calls must run sparse and report their density.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from comfy_support import require_comfy

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "bench_e2e.py")


def run_bench(tmp_path, interpret: str, models: str, configs: str, *extra) -> dict:
    require_comfy()
    # the tiny models run on the CPU on any machine (on a GPU they would take the real kernel instead)
    env = {**os.environ, "TRITON_INTERPRET": interpret, "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, SCRIPT, "--tiny", "--models", models, "--configs", configs, "--steps", "1",
           "--out", str(tmp_path), *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads((tmp_path / "e2e.json").read_text())


def test_without_the_kernel_every_patched_call_is_dense_and_the_latent_unchanged(tmp_path):
    results = run_bench(tmp_path, "0", "wan1.3b,flux", "unpatched,full,topk0.5")
    for key, dense_reasons in (("wan1.3b", {"not CUDA", "cross-attention"}), ("flux", {"not CUDA"})):
        configs = results["models"][key]["configs"]
        assert list(configs) == ["unpatched", "full", "topk0.5"]
        assert 0 < configs["unpatched"]["attention_share"] < 1
        for name in ("full", "topk0.5"):
            rec = configs[name]
            assert rec["rel_l1"] == 0.0 and rec["cosine"] == pytest.approx(1.0)
            assert rec["sparse_calls_per_step"] == 0 and set(rec["dense_calls_per_step"]) == dense_reasons
            assert rec["warning"] == "no attention call ran sparse"
    report = (tmp_path / "e2e.md").read_text()
    assert "| wan1.3b (tiny) (192 tok) |" in report and "| flux (tiny) (72 tok) |" in report
    # the report names what ran ComfyUI's RoPE: on a CPU, comfy-kitchen's eager backend (its CUDA backend
    # needs a GPU and ComfyUI turns its Triton backend off), or ComfyUI's own functions without it
    rope = results["meta"]["rope"]
    if importlib.util.find_spec("comfy_kitchen") is not None:
        assert rope.startswith("comfy-kitchen ") and rope.endswith(", eager backend"), rope
    else:
        assert rope == "ComfyUI's torch ops (no comfy-kitchen)", rope
    assert f"RoPE: {rope};" in report


def test_in_the_interpreter_the_patched_calls_run_sparse(tmp_path):
    results = run_bench(tmp_path, "1", "wan1.3b", "unpatched,topk0.5")
    rec = results["models"]["wan1.3b"]["configs"]["topk0.5"]
    assert rec["sparse_calls_per_step"] == 2 and rec["dense_calls_per_step"] == {"cross-attention": 2.0}
    assert rec["density"] < 0.5 and "warning" not in rec
    assert 0 < rec["rel_l1"] < 0.05 and all(d is not None for d in rec["density_per_step"])
    assert rec["plan_replays"] >= 1  # the node's calls reach the kernels' launch plans (same shapes, same key)


def test_compiled_like_torch_compile_model_the_patched_calls_still_run_sparse(tmp_path):
    results = run_bench(tmp_path, "1", "wan1.3b", "unpatched,topk0.5", "--compile", "aot_eager", "--warmup", "1")
    configs = results["models"]["wan1.3b"]["configs"]
    rec = configs["topk0.5"]
    assert rec["sparse_calls_per_step"] == 2 and rec["dense_calls_per_step"] == {"cross-attention": 2.0}
    assert rec["density"] < 0.5 and rec["attention_share"] is None and rec["finite"]
    assert rec["cosine"] > 0.99  # against the compiled unpatched run
    assert "compiled with torch.compile (backend aot_eager)" in (tmp_path / "e2e.md").read_text()
