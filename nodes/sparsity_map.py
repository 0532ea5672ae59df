"""The "SpargeAttn Sparsity Map" node: the last run's per-layer x per-head sparsity as an IMAGE.

The picture is made by :func:`.heatmap.sparsity_image` (no ComfyUI import, tested in CI); this module
only finds the patch's state on the model and hands the picture to ComfyUI.
"""

from __future__ import annotations

import numpy as np
import torch
from comfy_api.latest import io

from .heatmap import sparsity_image
from .override import SpargeState
from .patch import KEY


def patched_state(model) -> SpargeState:
    """The :class:`SpargeState` that "SpargeAttn Patch" attached to ``model`` (or a clone of it)."""
    state = model.get_attachment(KEY) if hasattr(model, "get_attachment") else None
    if not isinstance(state, SpargeState):
        raise ValueError("SpargeAttn Sparsity Map: this model is not patched by SpargeAttn; connect the MODEL "
                         "output of a 'SpargeAttn Patch' node (the one the sampler uses)")
    return state


class SpargeAttnSparsityMap(io.ComfyNode):
    """Schema and execution; the picture is made by :func:`sparsity_image`."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SpargeAttnSparsityMap",
            display_name="SpargeAttn Sparsity Map",
            category="SpargeAttn",
            search_aliases=["sparsity heatmap", "spargeattn map", "attention sparsity"],
            description=(
                "A heatmap of the last sampling run of a SpargeAttn-patched model: for each attention layer "
                "(rows) and head (columns), the share of Q·Kᵀ blocks that were skipped, averaged over the "
                "run's sparse calls, with the run's summary line. Send it to Preview Image or Save Image. "
                "Layers that always ran dense are not shown."),
            inputs=[
                io.Model.Input("model", tooltip="The model output of 'SpargeAttn Patch' (the one the sampler uses)."),
                io.Latent.Input("samples", tooltip="The sampler's LATENT output: it makes this node run after "
                                                   "sampling. The latent itself is not used."),
            ],
            outputs=[io.Image.Output(tooltip="The heatmap (one RGB image).")],
        )

    @classmethod
    def execute(cls, model, samples) -> io.NodeOutput:
        pixels = sparsity_image(patched_state(model))
        return io.NodeOutput(torch.from_numpy(pixels.astype(np.float32) / 255.0).unsqueeze(0))
