"""The "SpargeAttn CogVideoX" node: COGVIDEOMODEL -> COGVIDEOMODEL, for kijai's ComfyUI-CogVideoXWrapper.

A separate node rather than the patch node taking a second model type: ComfyUI's ``MODEL`` and the
wrapper's ``COGVIDEOMODEL`` are different socket types, so one node cannot take either without a
wildcard input that would accept anything; and the two patch different things (an attention override
on a ModelPatcher clone, attention functions on a copied diffusers pipeline). The options, their
tooltips and the logic behind them are the patch node's: the inputs are taken from its schema, the
decisions from ``override.SpargeState``.
"""

from __future__ import annotations

import logging

from comfy_api.latest import io

from .cogvideox import KEY, apply_sparge_cogvideox
from .patch import SpargeAttnPatch, kernel_problem
from .ui import BrowserReport

CogVideoModel = io.Custom("COGVIDEOMODEL")


# The patch node's options this node shares (its tuned-thresholds input is not among them yet).
OPTIONS = ("mode", "topk", "cdf_threshold", "sim_threshold", "pv_threshold", "start_percent", "end_percent",
           "dense_blocks", "min_tokens", "protect_text", "token_order", "verbose", "precision")


def _inputs() -> list:
    """The patch node's option inputs (same defaults and tooltips), protect_text worded for CogVideoX."""
    shared = {i.id: i for i in SpargeAttnPatch.define_schema().inputs}
    shared["protect_text"] = io.Boolean.Input(
        "protect_text", display_name="protect text tokens", default=True,
        tooltip="Always compute the 226 text tokens (as queries and as keys); they come first in CogVideoX's "
                "joint attention, 226 of 17 776 tokens at 720x480, 49 frames. They carry the prompt and get "
                "starved by block selection otherwise.")
    return [shared[name] for name in OPTIONS]


class SpargeAttnCogVideoX(io.ComfyNode):
    """Schema and execution; the logic is in :func:`.cogvideox.apply_sparge_cogvideox`."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SpargeAttnCogVideoX",
            display_name="SpargeAttn CogVideoX",
            category="SpargeAttn",
            search_aliases=["sparse attention", "sparge", "spargeattn", "cogvideox", "cogvideo"],
            description=(
                "SpargeAttn (sparse + quantized attention in Triton) for CogVideoX models loaded with kijai's "
                "ComfyUI-CogVideoXWrapper: connect the wrapper's model loader here and this node's output to "
                "CogVideo Sampler. The wrapper's attention never reaches ComfyUI's override, so this node gives "
                "a copy of the model its own attention functions; the loaded model stays unchanged for other "
                "workflows. CogVideoX-5B at 720x480, 49 frames has 17 776 tokens per attention (226 text + "
                "13x30x45 video) at head dim 64. Measured on an H100 (random weights, top-k 0.5): attention "
                "2.0x faster than SDPA, a whole CogVideoX-5B step 1.26x (attention is ~41% of it). Text tokens, "
                "the first steps and "
                "the dense blocks stay dense; verbose logs why. Needs an NVIDIA GPU (sm80+) and Triton; "
                "elsewhere the model runs dense. To undo: bypass this node (Ctrl+B) or remove it."),
            inputs=[CogVideoModel.Input("model", tooltip="The CogVideoX model from a ComfyUI-CogVideoXWrapper "
                                                         "loader (any attention_mode).")] + _inputs(),
            outputs=[CogVideoModel.Output(tooltip="A copy of the model with SpargeAttn attention.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, start_percent, end_percent, dense_blocks, **options) -> io.NodeOutput:
        problem = kernel_problem()
        if problem is not None:
            logging.warning("SpargeAttn CogVideoX: the sparse kernel cannot run here (%s); the model will use "
                            "dense attention.", problem)
        patched, state = apply_sparge_cogvideox(model, start_percent=start_percent, end_percent=end_percent,
                                                dense_blocks=dense_blocks, node_id=cls.hidden.unique_id, **options)
        report = BrowserReport(state)  # per-step messages and the run summary, as for "SpargeAttn Patch"
        patched[KEY].run_listeners.append(report.on_run_end)
        return io.NodeOutput(patched)
