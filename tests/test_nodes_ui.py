"""The browser report's pure side, without ComfyUI: cost model, step/summary payloads, summary line,
and the sender (one message per step, one summary per run, nothing without a server).

The sender is checked against a recording object with ``PromptServer``'s three members (``client_id``,
``send_sync``, ``send_progress_text``); the real server and browser are exercised by
tests/test_comfy_browser.py.
"""

import json
import logging
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from sparge_pack.nodes import override as ov
from sparge_pack.nodes import ui
from sparge_pack.nodes.adapters import VIDEO
from sparge_pack.nodes.stats import LayerStats, RunStats, StepStats


def step(index=0, layers=None, dense=None, sigma=0.5):
    layers = layers or {}
    return StepStats(index, sigma, sum(layer.calls for layer in layers.values()), dense or {}, layers)


def test_cost_model_counts_same_length_dense_calls_and_skips_short_ones():
    s = step(layers={"block.0": LayerStats(2, [0.5, 0.5], [0.0, 0.0])},
             dense={ov.CROSS: 3, ov.MIN_TOKENS: 5, ov.WINDOW: 1})
    calls, cost = ui.attention_cost(s)
    assert calls == 3 and cost == pytest.approx(2 * (ui.OVERHEAD + 0.5) + 1)
    assert ui.estimated_speedup([s]) == pytest.approx(3 / (2 * 0.55 + 1))


def test_pv_skip_saves_at_most_the_pv_half_of_a_computed_block():
    layer = LayerStats(1, [0.4, 0.8], [0.5, 1.0])
    # head 0: 0.4 * (1 - 0.5 * 0.5) = 0.3; head 1: 0.8 * (1 - 0.5) = 0.4
    assert ui.layer_cost(layer) == pytest.approx(ui.OVERHEAD + 0.35)
    full = LayerStats(1, [1.0], [0.0])
    assert ui.estimated_speedup([step(layers={"a": full})]) == pytest.approx(1 / (1 + ui.OVERHEAD))
    sparser = [ui.estimated_speedup([step(layers={"a": LayerStats(1, [d], [0.0])})]) for d in (0.9, 0.5, 0.2)]
    assert sparser == sorted(sparser) and sparser[-1] == pytest.approx(1 / 0.25)


def test_speedup_when_nothing_ran_sparse():
    assert ui.estimated_speedup([step(dense={ov.NOT_CUDA: 4, ov.CROSS: 4})]) == 1.0
    assert ui.estimated_speedup([step(dense={ov.CROSS: 4})]) == 1.0
    assert ui.estimated_speedup([step()]) is None and ui.estimated_speedup([]) is None


def test_run_speedup_weights_every_call_of_every_step():
    a = step(0, {"x": LayerStats(1, [0.5], [0.0])})
    b = step(1, dense={ov.WINDOW: 1})
    assert ui.estimated_speedup([a, b]) == pytest.approx(2 / (0.55 + 1))


def test_step_payload_is_json_with_layers_in_call_order_and_the_node_id_kept():
    s = step(3, {"double.1": LayerStats(2, [0.25, 0.75], [0.1, 0.3]),
                 "double.0": LayerStats(1, [1.0, 1.0], [0.0, 0.0])}, {ov.CROSS: 2}, sigma=0.7)
    p = ui.step_payload(s, "12:5")
    assert json.loads(json.dumps(p)) == p
    assert p["node"] == "12:5" and p["step"] == 3 and p["sigma"] == 0.7
    assert p["layers"] == [["double.1", 0.5], ["double.0", 0.0]]
    assert p["computed"] == pytest.approx((2 * 0.5 + 1.0) / 3) and p["sparsity"] == pytest.approx(1 - p["computed"])
    assert p["pv_skipped"] == pytest.approx((2 * 0.2 + 0.0) / 3)
    assert p["dense_calls"] == {ov.CROSS: 2} and p["sparse_calls"] == 3
    assert p["speedup"] == pytest.approx(ui.estimated_speedup([s]))
    dense_only = ui.step_payload(step(0, dense={ov.NOT_CUDA: 2}), 7)
    assert dense_only["node"] == "7" and dense_only["sparsity"] is None and dense_only["layers"] == []
    assert ui.step_line(dense_only) == "step 0 · no sparse calls · est. attention 1.0× · 2 dense calls (not CUDA)"


def test_summary_line_format():
    example = {"steps": 30, "sparsity": 0.62, "pv_skipped": 0.0, "speedup": 2.4, "dense_calls": {ov.CROSS: 120}}
    assert ui.summary_line(example) == "30 steps · sparsity 0.62 · est. attention 2.4× · 120 dense calls (cross-attention)"
    more = dict(example, steps=1, pv_skipped=0.125, dense_calls={ov.WINDOW: 4, ov.CROSS: 30, ov.DENSE_BLOCK: 4})
    assert ui.summary_line(more) == ("1 step · sparsity 0.62 · P·V skipped 0.12 · est. attention 2.4× · 38 dense "
                                     "calls (30 cross-attention, 4 dense block, 4 sigma outside the start/end window)")
    assert ui.summary_line(dict(example, dense_calls={})).endswith("· no dense calls")


def test_run_payload_totals():
    run = RunStats([step(0, {"x": LayerStats(1, [0.5], [0.0])}, {ov.CROSS: 1}),
                    step(1, {"x": LayerStats(3, [0.3], [0.0])}, {ov.CROSS: 1})])
    p = ui.run_payload(run, "4")
    assert json.loads(json.dumps(p)) == p
    assert p["steps"] == 2 and p["sparse_calls"] == 4 and p["dense_calls"] == {ov.CROSS: 2}
    assert p["sparsity"] == pytest.approx(1 - (0.5 + 3 * 0.3) / 4)
    assert p["line"] == ui.summary_line(p) and p["line"].startswith("2 steps · sparsity 0.65 · est. attention 2.")


class RecordingServer:
    """The three members of ComfyUI's ``PromptServer`` that the report uses; records what is sent."""

    def __init__(self, client_id="browser-1"):
        self.client_id = client_id
        self.messages, self.texts = [], []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, json.loads(json.dumps(data)), sid))

    def send_progress_text(self, text, node_id, sid=None):
        self.texts.append((text, node_id, sid))


@pytest.fixture
def server(monkeypatch):
    instance = RecordingServer()
    module = types.ModuleType("server")
    module.PromptServer = types.SimpleNamespace(instance=instance)
    monkeypatch.setitem(sys.modules, "server", module)
    return instance


class DensityKernel:
    def __init__(self, density=0.4):
        self.density = density
        self.api = ov.KernelAPI(self.attn, lambda device: None, range(1, 257))

    def attn(self, q, k, v, *, layout, scale, keep_ranges, return_stats, **options):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        h = q.shape[2]
        return out.transpose(1, 2), {"density": torch.full((h,), self.density), "pv_skipped": torch.zeros(h)}


def sample_run(state, steps=3, blocks=2):
    """Drive the override the way a sampler does: per step, self-attention per block and cross-attention."""
    state.begin_run()
    for i in range(steps):
        state.begin_step(1.0 - i / steps)
        for block in range(blocks):
            options = {"block_index": block, "block_type": "block"}
            q = torch.randn(1, 40, 32)
            ov.SpargeOverride(state, None)(F.scaled_dot_product_attention, q, q, q, 2, skip_reshape=False,
                                           transformer_options=options, _inside_attn_wrapper=True)
            kv = torch.randn(1, 7, 32)
            ov.SpargeOverride(state, None)(lambda *a, **k: torch.zeros(1, 40, 32), q, kv, kv, 2,
                                           transformer_options=options, _inside_attn_wrapper=True)
    return state.end_run()


def test_one_message_per_step_and_one_summary_to_the_client_that_queued(server, caplog):
    state = ov.SpargeState(ov.SpargeConfig(min_tokens=0), VIDEO, kernel=DensityKernel().api, node_id="12:5")
    report = ui.BrowserReport(state)
    with caplog.at_level(logging.INFO, logger="spargeattn"):
        run = sample_run(state, steps=3, blocks=2)
        report.on_run_end(state.last_run)
    steps = [m for m in server.messages if m[0] == ui.STEP_EVENT]
    assert [m[1]["step"] for m in steps] == [0, 1, 2]  # 12 attention calls, 3 messages
    assert all(m[2] == "browser-1" and m[1]["node"] == "12:5" for m in server.messages)
    assert steps[0][1]["layers"] == [["block.0", pytest.approx(0.6)], ["block.1", pytest.approx(0.6)]]
    assert steps[0][1]["dense_calls"] == {ov.CROSS: 2}
    summaries = [m for m in server.messages if m[0] == ui.SUMMARY_EVENT]
    assert len(summaries) == 1 and summaries[0][1] == ui.run_payload(run, "12:5")
    assert summaries[0][1]["line"] == "3 steps · sparsity 0.60 · est. attention 2.2× · 6 dense calls (cross-attention)"
    assert [t[0] for t in server.texts][:3] == [ui.step_line(m[1]) for m in steps]
    assert server.texts[-1] == (summaries[0][1]["line"], "12:5", "browser-1")
    logged = [r.getMessage() for r in caplog.records if "est. attention" in r.getMessage()]
    assert logged == ["SpargeAttn #12:5: " + summaries[0][1]["line"]]


def test_nothing_is_sent_without_a_server_or_a_client_but_the_summary_is_logged(monkeypatch, caplog):
    monkeypatch.delitem(sys.modules, "server", raising=False)
    state = ov.SpargeState(ov.SpargeConfig(min_tokens=0), VIDEO, kernel=DensityKernel().api, node_id="3")
    report = ui.BrowserReport(state)
    with caplog.at_level(logging.INFO, logger="spargeattn"):
        sample_run(state, steps=2)
        report.on_run_end(state.last_run)
    assert sum("2 steps · sparsity" in r.getMessage() for r in caplog.records) == 1

    quiet = RecordingServer(client_id=None)  # a prompt queued through the API without a client id
    module = types.ModuleType("server")
    module.PromptServer = types.SimpleNamespace(instance=quiet)
    monkeypatch.setitem(sys.modules, "server", module)
    sample_run(state, steps=2)
    report.on_run_end(state.last_run)
    assert quiet.messages == [] and quiet.texts == []


def test_an_empty_run_sends_no_summary(server):
    state = ov.SpargeState(ov.SpargeConfig(), node_id="1")
    report = ui.BrowserReport(state)
    state.begin_run()
    report.on_run_end(state.end_run())
    report.on_run_end(None)
    assert server.messages == []
