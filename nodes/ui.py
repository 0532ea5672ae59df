"""Per-step sparsity for the ComfyUI web UI: websocket messages, progress text and the run summary.

Data path: the :class:`~.stats.StepAccumulator` reads a step's statistics back from the GPU once per
step (never per attention call); :class:`BrowserReport`, a step listener of the patch's
:class:`~.override.SpargeState`, turns each :class:`~.stats.StepStats` into one small JSON message
and sends it to the client that queued the prompt:

* ``"spargeattn.step"`` (one per model evaluation, usually one per sampler step): see
  :func:`step_payload`;
* ``"spargeattn.summary"`` (one at the end of each sampling run): see :func:`run_payload`; the
  same line (:func:`summary_line`) is written to the log once.

Both carry ``node``, the patch node's id in the prompt (a string; nodes inside subgraphs have ids
such as ``"12:5"``). The same numbers also go to the node as progress text
(``PromptServer.send_progress_text``), which the frontend shows without any JavaScript; the
extension in ``web/`` draws them as a live chart.

Estimated attention speed-up
----------------------------
The speed-up shown is an **estimate** from the statistics, not a measurement. Cost model, relative
to the same attention computed densely::

    cost of a sparse call = OVERHEAD + mean over heads of  density · (1 − PV_SHARE · pv_skipped)
    cost of a dense call  = 1
    speed-up              = calls counted / Σ cost

``density`` is the fraction of Q·Kᵀ blocks computed and ``pv_skipped`` the fraction of those whose
P·V product was skipped. ``PV_SHARE = 0.5``: a computed block does two matmuls of equal size
(Q·Kᵀ and P·V), so skipping P·V saves at most half of it. ``OVERHEAD = 0.05``: block prediction and
INT8 quantization cost about 5% of a dense call at video lengths (the SpargeAttn reference on an
H100, Wan 480p, 32 760 tokens: 2.0 ms next to 36.9 ms dense; relatively more at shorter lengths).
Calls counted: the sparse calls and the dense calls of the same length (every dense reason except
cross-attention and "fewer than min_tokens", whose calls are much shorter than the latent's
self-attention and are left out). Kernel efficiency, launch costs and the rest of the model are not
modelled; with no sparse call the estimate is 1.0.

Nothing here imports ComfyUI at module level: the payload functions are pure (tested in CI), and
without a running ComfyUI server (tests, scripts) nothing is sent.
"""

from __future__ import annotations

import logging
import sys

from .override import CROSS, MIN_TOKENS, SpargeState
from .stats import LayerStats, RunStats, StepStats

log = logging.getLogger("spargeattn")

STEP_EVENT = "spargeattn.step"
SUMMARY_EVENT = "spargeattn.summary"

PV_SHARE = 0.5
OVERHEAD = 0.05
#: Dense reasons whose calls are much shorter than the latent's self-attention (not counted).
SHORT_CALLS = frozenset({CROSS, MIN_TOKENS})


def layer_cost(layer: LayerStats) -> float:
    """Estimated cost of one sparse call of ``layer`` relative to a dense call (see module docstring)."""
    work = sum(d * (1.0 - PV_SHARE * p) for d, p in zip(layer.density, layer.pv_skipped)) / len(layer.density)
    return OVERHEAD + work


def attention_cost(step: StepStats) -> tuple[int, float]:
    """(calls counted, estimated cost in dense-call units) of one step."""
    dense = sum(n for reason, n in step.dense_calls.items() if reason not in SHORT_CALLS)
    sparse = sum(layer.calls * layer_cost(layer) for layer in step.layers.values())
    return step.sparse_calls + dense, sparse + dense


def estimated_speedup(steps: list[StepStats]) -> float | None:
    """Estimated attention speed-up of ``steps`` (an estimate, see the module docstring).

    None when no attention call was seen at all; 1.0 when every counted call was dense.
    """
    calls = cost = 0.0
    for step in steps:
        n, c = attention_cost(step)
        calls, cost = calls + n, cost + c
    if cost > 0:
        return calls / cost
    return 1.0 if any(s.sparse_calls or s.dense_calls for s in steps) else None


def _sparsity(density: float | None) -> float | None:
    return None if density is None else 1.0 - density


def step_payload(step: StepStats, node_id: str) -> dict:
    """The ``"spargeattn.step"`` message of one step (plain JSON).

    Keys: ``node``, ``step`` (0-based evaluation index), ``sigma``, ``sparsity`` (1 − ``computed``),
    ``computed`` (stage 1: mean fraction of Q·Kᵀ blocks computed), ``pv_skipped`` (stage 2: mean
    fraction of computed blocks whose P·V was skipped), ``speedup`` (estimate), ``sparse_calls``,
    ``dense_calls`` ({reason: count}) and ``layers`` ([[layer name, sparsity], ...] in call order).
    Means are over the step's sparse calls, layers and heads; None when there was no sparse call.
    """
    return {
        "node": str(node_id),
        "step": step.index,
        "sigma": step.sigma,
        "sparsity": _sparsity(step.density),
        "computed": step.density,
        "pv_skipped": step.pv_skipped,
        "speedup": estimated_speedup([step]),
        "sparse_calls": step.sparse_calls,
        "dense_calls": dict(step.dense_calls),
        "layers": [[name, 1.0 - sum(layer.density) / len(layer.density)] for name, layer in step.layers.items()],
    }


def _dense_text(dense_calls: dict[str, int]) -> str:
    total = sum(dense_calls.values())
    if not total:
        return "no dense calls"
    noun = "dense call" if total == 1 else "dense calls"
    if len(dense_calls) == 1:
        return f"{total} {noun} ({next(iter(dense_calls))})"
    reasons = ", ".join(f"{n} {r}" for r, n in sorted(dense_calls.items(), key=lambda kv: (-kv[1], kv[0])))
    return f"{total} {noun} ({reasons})"


def _numbers_text(sparsity, pv_skipped, speedup) -> list[str]:
    parts = ["no sparse calls" if sparsity is None else f"sparsity {sparsity:.2f}"]
    if pv_skipped:
        parts.append(f"P·V skipped {pv_skipped:.2f}")
    if speedup is not None:
        parts.append(f"est. attention {speedup:.1f}×")
    return parts


def step_line(payload: dict) -> str:
    """Progress text of one step, e.g. ``step 3 · sparsity 0.52 · est. attention 1.9× · 4 dense calls (...)``."""
    parts = [f"step {payload['step']}"]
    parts += _numbers_text(payload["sparsity"], payload["pv_skipped"], payload["speedup"])
    parts.append(_dense_text(payload["dense_calls"]))
    return " · ".join(parts)


def run_payload(run: RunStats, node_id: str) -> dict:
    """The ``"spargeattn.summary"`` message of a finished run (plain JSON).

    Keys: ``node``, ``steps``, ``sparsity``, ``computed``, ``pv_skipped`` (means weighted by sparse
    calls), ``speedup`` (estimate), ``sparse_calls``, ``dense_calls`` and ``line``
    (:func:`summary_line`).
    """
    totals = run.totals()
    payload = {
        "node": str(node_id),
        "steps": totals["steps"],
        "sparsity": _sparsity(totals["density"]),
        "computed": totals["density"],
        "pv_skipped": totals["pv_skipped"],
        "speedup": estimated_speedup(run.steps),
        "sparse_calls": totals["sparse_calls"],
        "dense_calls": totals["dense_calls"],
    }
    payload["line"] = summary_line(payload)
    return payload


def summary_line(payload: dict) -> str:
    """E.g. ``30 steps · sparsity 0.62 · est. attention 2.4× · 120 dense calls (cross-attention)``."""
    steps = payload["steps"]
    parts = [f"{steps} step" + ("" if steps == 1 else "s")]
    parts += _numbers_text(payload["sparsity"], payload["pv_skipped"], payload["speedup"])
    parts.append(_dense_text(payload["dense_calls"]))
    return " · ".join(parts)


def _prompt_server():
    """ComfyUI's running ``PromptServer``, or None (tests, scripts: then nothing is sent).

    ComfyUI's ``main.py`` imports its ``server`` module and creates the instance before any node
    runs; the module is looked up, not imported, so that importing this pack never starts it.
    """
    server = sys.modules.get("server")
    return getattr(getattr(server, "PromptServer", None), "instance", None)


class BrowserReport:
    """Sends one state's steps and run summaries to the browser and logs the summary once.

    Parameters
    ----------
    state : SpargeState
        Its ``node_id`` tags every message; :meth:`on_step` is added to its ``step_listeners``.
    """

    def __init__(self, state: SpargeState):
        self.node_id = str(state.node_id)
        state.step_listeners.append(self.on_step)

    def _send(self, event: str, payload: dict, text: str) -> None:
        server = _prompt_server()
        if server is None or server.client_id is None:  # no browser queued this prompt: nobody to tell
            return
        server.send_sync(event, payload, server.client_id)
        server.send_progress_text(text, self.node_id, server.client_id)

    def on_step(self, step: StepStats) -> None:
        """Step listener: one message and one progress text per step."""
        payload = step_payload(step, self.node_id)
        self._send(STEP_EVENT, payload, step_line(payload))

    def on_run_end(self, run: RunStats | None) -> None:
        """End of a sampling run: the summary message, progress text and one log line."""
        if run is None or not run.steps:
            return
        payload = run_payload(run, self.node_id)
        log.info("SpargeAttn #%s: %s", self.node_id, payload["line"])
        self._send(SUMMARY_EVENT, payload, payload["line"])


def report_to_browser(patched, state: SpargeState, key: str) -> BrowserReport:
    """Attach a :class:`BrowserReport` to a patched ModelPatcher.

    The summary is sent from an ``ON_CLEANUP`` callback added under ``key`` after the one that
    ends the run (callbacks of a key run in the order they were added), so it sees the finished
    run in ``state.last_run``.
    """
    from comfy.patcher_extension import CallbacksMP

    report = BrowserReport(state)
    patched.add_callback_with_key(CallbacksMP.ON_CLEANUP, key, lambda patcher: report.on_run_end(state.last_run))
    return report

