"""The browser report and the Sparsity Map node inside a real ComfyUI (``COMFYUI_PATH``), in-process: a
tiny random-weight Wan 2.1 sampled with ComfyUI's sampler on the CPU.

A kernel with the real one's signature (exact attention, fixed density) is injected so the test is fast;
the real kernel (Triton interpreter) runs in tests/test_comfy_browser.py. The message sink is a
recording object with ``PromptServer``'s members, placed where the report looks for ComfyUI's server.
"""

import json
import logging
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from comfy_support import build_model, latent_for, require_comfy, sample


@pytest.fixture(scope="module")
def pack():
    require_comfy()
    from sparge_pack.nodes import override, patch, sparsity_map, ui

    return types.SimpleNamespace(override=override, patch=patch, sparsity_map=sparsity_map, ui=ui)


@pytest.fixture(scope="module")
def wan(pack):
    return build_model("wan")


class Sink:
    def __init__(self):
        self.client_id = "browser-7"
        self.messages, self.texts = [], []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, json.loads(json.dumps(data)), sid))

    def send_progress_text(self, text, node_id, sid=None):
        self.texts.append((text, node_id, sid))


def fixed_density_kernel(override, density):
    def attn(q, k, v, *, layout, scale, keep_ranges, return_stats, **options):
        t = (lambda x: x) if layout == "HND" else (lambda x: x.transpose(1, 2))
        out = t(F.scaled_dot_product_attention(t(q), t(k), t(v), scale=scale))
        h = q.shape[1] if layout == "HND" else q.shape[2]
        return out, {"density": torch.linspace(density, 1.0, h), "pv_skipped": torch.zeros(h)}

    return override.KernelAPI(attn, lambda device: None, range(1, 257))


def patch(pack, model, node_id="7"):
    patched, state = pack.patch.apply_sparge(model, start_percent=0.0, dense_blocks="", min_tokens=0,
                                             kernel=fixed_density_kernel(pack.override, 0.25), node_id=node_id)
    pack.ui.report_to_browser(patched, state, pack.patch.KEY)
    return patched, state


def test_one_message_per_sampler_step_and_the_summary_after_the_run(pack, wan, monkeypatch, caplog):
    sink = Sink()
    monkeypatch.setitem(sys.modules, "server", types.SimpleNamespace(PromptServer=types.SimpleNamespace(instance=sink)))
    patched, state = patch(pack, wan, node_id="12:7")
    with caplog.at_level(logging.INFO, logger="spargeattn"):
        sample(patched, "wan", latent_for("wan"), steps=3)
    events = [m[0] for m in sink.messages]
    assert events == ["spargeattn.step"] * 3 + ["spargeattn.summary"]
    steps = [m[1] for m in sink.messages[:3]]
    assert [s["step"] for s in steps] == [0, 1, 2] and all(m[2] == "browser-7" for m in sink.messages)
    # 2 Wan blocks, each a self-attention (sparse) and a cross-attention (dense) per step
    assert all(s["sparse_calls"] == 2 and s["dense_calls"] == {"cross-attention": 2} for s in steps)
    assert [name for name, _ in steps[0]["layers"]] == ["double.0", "double.1"]  # Wan reports its blocks as "double"
    assert steps[0]["computed"] == pytest.approx(0.625) and steps[0]["node"] == "12:7"
    summary = sink.messages[-1][1]
    assert summary == pack.ui.run_payload(state.last_run, "12:7") and summary["steps"] == 3
    assert summary["line"].startswith("3 steps · sparsity 0.38 · est. attention 1.5× · 6 dense calls (cross-attention)")
    assert sink.texts[-1] == (summary["line"], "12:7", "browser-7") and len(sink.texts) == 4
    assert [r.getMessage() for r in caplog.records if "est. attention" in r.getMessage()] == \
        ["SpargeAttn #12:7: " + summary["line"]]


def test_without_a_server_sampling_works_and_only_logs(pack, wan, monkeypatch, caplog):
    monkeypatch.delitem(sys.modules, "server", raising=False)
    patched, state = patch(pack, wan)
    with caplog.at_level(logging.INFO, logger="spargeattn"):
        sample(patched, "wan", latent_for("wan"), steps=2)
    assert len(state.last_run.steps) == 2
    assert sum("2 steps · sparsity" in r.getMessage() for r in caplog.records) == 1


def test_sparsity_map_node(pack, wan):
    node = pack.sparsity_map.SpargeAttnSparsityMap
    latent = {"samples": latent_for("wan")}
    with pytest.raises(ValueError, match="not patched by SpargeAttn"):
        node.execute(wan, latent)
    patched, state = patch(pack, wan)
    with pytest.raises(ValueError, match="Run the sampler first"):
        node.execute(patched, latent)
    sample(patched, "wan", latent_for("wan"), steps=2)
    image = node.execute(patched.clone(), latent).result[0]  # a later clone (e.g. a LoRA loader) still works
    assert image.dtype == torch.float32 and image.ndim == 4 and image.shape[0] == 1 and image.shape[3] == 3
    assert 0.0 <= image.min() and image.max() <= 1.0 and image.std() > 0.1
    assert image.shape[1] > 150 and image.shape[2] > 300
