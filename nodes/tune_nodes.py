"""The "SpargeAttn Tune" and "SpargeAttn Save Tuned" nodes: ComfyUI glue of ``tune.py`` and ``presets.py``.

Workflow: model -> SpargeAttn Tune -> sampler (as usual; the output is the dense reference) ->
SpargeAttn Save Tuned (its ``latent`` input takes the sampler's LATENT so that it runs after
sampling) -> ``models/spargeattn/<name>.safetensors`` -> the "tuned thresholds" combo of
SpargeAttn Patch.

The tuner lives in the patch state that :func:`~.patch.apply_sparge` attaches to the model, so the
save node finds it on the MODEL it receives (or any clone of it).
"""

from __future__ import annotations

import logging

import comfy.model_management
import comfy.patcher_extension
import comfy.utils
from comfy_api.latest import io, ui

from .. import __version__
from . import presets, tuned_folder
from .adapters import model_family
from .override import MODES, PRECISIONS, TOKEN_ORDERS, SpargeState
from .patch import KEY, _slider, apply_sparge, kernel_problem
from .tune import Tuner, search_length

log = logging.getLogger("spargeattn")


def tune_model(model, *, mode: str = "topk", l1_target: float = 0.05, pv_target: float = 0.06,
               sim_threshold: float = -0.1, node_id: str | None = None, **patch_options):
    """Clone ``model`` in tune mode (what the Tune node runs).

    Every eligible attention call returns the dense output and advances the per-layer, per-head
    search of :class:`~.tune.Tuner` by one sparse probe. A progress bar on node ``node_id`` shows the
    search; an interruption (ComfyUI's "Cancel") stops sampling at the next tuned attention call.

    Parameters
    ----------
    model : comfy.model_patcher.ModelPatcher
    mode, l1_target, pv_target, sim_threshold
        See :class:`~.tune.Tuner`.
    node_id : str, optional
        The Tune node's id: progress is shown on it.
    **patch_options
        The remaining :func:`~.patch.apply_sparge` options (window, dense_blocks, min_tokens,
        protect_text, token_order, verbose, precision, kernel).

    Returns
    -------
    (ModelPatcher, SpargeState)
    """
    bar = comfy.utils.ProgressBar(search_length(pv_target > 0), node_id=node_id)

    tuner = Tuner(mode, l1_target, pv_target, sim_threshold, on_eval=bar.update_absolute,
                  on_call=comfy.model_management.throw_exception_if_processing_interrupted)
    patched, state = apply_sparge(model, mode=mode, sim_threshold=sim_threshold, node_id=node_id, tuner=tuner,
                                  **patch_options)

    def report(patcher) -> None:
        if tuner.layers:
            done, total = tuner.progress()
            log.info("SpargeAttn Tune: %d model evaluations tuned so far, search %d/%d layer-steps done%s. Connect "
                     "'SpargeAttn Save Tuned' after the sampler to write the thresholds.", tuner.evaluations, done,
                     total, "" if tuner.complete else " (sample more steps to finish it)")

    patched.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_CLEANUP, KEY, report)
    return patched, state


def tuned_thresholds(model) -> presets.TunedThresholds:
    """The thresholds found so far by the tuner attached to ``model`` (the Tune node's MODEL)."""
    state = model.get_attachment(KEY) if hasattr(model, "get_attachment") else None
    tuner = state.tuner if isinstance(state, SpargeState) else None
    if tuner is None:
        raise ValueError("SpargeAttn Save Tuned: this model is not in tune mode; connect the MODEL output of a "
                         "'SpargeAttn Tune' node (the one the sampler used)")
    result = tuner.result()
    diffusion_model = model.get_model_object("diffusion_model")
    signature = presets.model_signature(diffusion_model, model_family(diffusion_model))
    if (signature.heads, signature.head_dim) != (result.heads, result.head_dim):
        raise ValueError(f"SpargeAttn Save Tuned: the tuned calls had {result.heads} heads x {result.head_dim}, the "
                         f"model reports {signature.heads} x {signature.head_dim}; this model cannot be tuned here")
    c = state.config
    return presets.TunedThresholds(
        signature=signature, layers=result.layers, mode=tuner.mode, token_order=c.token_order,
        protect_text=c.protect_text, l1_target=tuner.l1_target, pv_target=tuner.pv_target,
        latent_grids=list(tuner.grids), evaluations=result.evaluations, complete=result.complete,
        pack_version=__version__, precision=c.precision)


def save_tuned(model, name: str, overwrite: bool = False, folder: str | None = None) -> tuple[str, str]:
    """Write the tuned thresholds of ``model``; returns (path, summary line)."""
    thresholds = tuned_thresholds(model)
    path = presets.save(thresholds, folder or tuned_folder.save_folder(), name, overwrite)
    summary = thresholds.summary()
    log.info("SpargeAttn: tuned thresholds written to %s: %s", path, summary)
    return path, summary


class SpargeAttnTune(io.ComfyNode):
    """Schema and execution of the Tune node; the logic is in :func:`tune_model`."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SpargeAttnTune",
            display_name="SpargeAttn Tune",
            category="SpargeAttn",
            search_aliases=["tune sparse attention", "spargeattn tune", "calibrate sparge"],
            description=(
                "Finds, during one ordinary sampling run, the sparsest per-layer, per-head SpargeAttn thresholds "
                "whose attention error stays below your targets. The sampler gets dense attention (the image is "
                "the reference); each attention call also runs the sparse kernel once with candidate thresholds "
                "for all heads and measures the relative L1 error on the GPU. The search takes 15 model "
                "evaluations (sampler steps) inside the start/end window, 9 with the P·V target at 0; further "
                "steps, and further runs with the same Tune node, only verify and can only make the result more "
                "careful, so 20-30 steps give a sturdier file. Cost: one extra sparse attention and an error sum "
                "per attention call, budgeted at <= 3x an untuned run (the reference SpargeAttn tuner: hours to days per "
                "model). Then save with 'SpargeAttn Save Tuned' and pick the file in 'SpargeAttn Patch'. Needs "
                "the sparse kernel (NVIDIA sm80+, Triton)."),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to tune (Flux, Wan 2.1/2.2, HunyuanVideo)."),
                io.Combo.Input("mode", options=list(MODES), default="topk",
                               tooltip="What is tuned per head: topk, the fraction of key blocks each query block "
                                       "computes, or cdf, τ, the predicted attention mass kept (adapts per "
                                       "input). The file applies in this mode."),
                _slider(io.Float, "l1_target", "relL1 target", 0.05, 0.005, 0.3, 0.005,
                        "Stage 1: the relative L1 error of each head's attention output against dense, "
                        "Σ|O−O_dense|/Σ|O_dense|, must stay at or below this on every tuned call. 0.05 is the "
                        "SpargeAttn paper's value for CogVideoX and Mochi (0.07 for Flux). The kernel's INT8/FP8 "
                        "quantization alone costs ~0.02-0.04; heads that cannot meet the target stay at full density."),
                _slider(io.Float, "pv_target", "P·V target", 0.06, 0.0, 0.4, 0.005,
                        "Stage 2: the error with the P·V skip (λ) on top of stage 1 must stay at or below this "
                        "(paper: 0.06 for CogVideoX and Mochi). Must be above the relL1 target; 0 leaves the P·V "
                        "skip off and shortens the search to 9 steps. λ is one value per layer for now."),
                _slider(io.Float, "sim_threshold", "θ (self-similarity)", -0.1, -1.0, 1.0, 0.05,
                        "Not searched: blocks whose tokens are less alike than θ are always computed, and the "
                        "search adapts τ / top-k around that. -0.1 almost never triggers (the tuned upstream "
                        "CogVideoX file has a median θ of -0.94); 0.6 protects many blocks."),
                _slider(io.Float, "start_percent", "start percent", 0.2, 0.0, 1.0, 0.01,
                        "Tune only calls from this point of the schedule on; use the same window as the "
                        "SpargeAttn Patch node that will apply the file (earlier steps stay dense there)."),
                _slider(io.Float, "end_percent", "end percent", 1.0, 0.0, 1.0, 0.01,
                        "Tune only calls up to this point of the schedule."),
                io.String.Input("dense_blocks", display_name="dense blocks", default="",
                                tooltip="Blocks not tuned (they stay dense when the file is applied), e.g. '0, 1'. "
                                        "Empty: tune every block and let the error decide."),
                _slider(io.Int, "min_tokens", "minimum tokens", 12288, 0, 262144, 256,
                        "Shorter attention calls are not tuned (they stay dense in the patch node too)."),
                io.Boolean.Input("protect_text", display_name="protect text tokens", default=True,
                                 tooltip="As in SpargeAttn Patch: text tokens are always computed. Tune with the "
                                         "setting you will apply."),
                io.Combo.Input("token_order", display_name="token order", options=list(TOKEN_ORDERS),
                               default="row-major",
                               tooltip="Token order inside the kernel while tuning; the file records it and the "
                                       "patch node applies the file in the same order."),
                io.Boolean.Input("verbose", default=False,
                                 tooltip="Log dense reasons once per run and one statistics line per step."),
                io.Combo.Input("precision", display_name="P·V precision", options=list(PRECISIONS), default="fast",
                               tooltip="The P·V precision the probes run with; the file records it. Tune with the "
                                       "one you will apply: the errors measured with 'fast' (FP8) include its "
                                       "rounding, so such a file is on the careful side under 'accurate' (fp16); "
                                       "a file tuned with 'accurate' and applied with 'fast' exceeds its targets "
                                       "by about the FP8 rounding (SpargeAttn Patch warns)."),
            ],
            outputs=[io.Model.Output(tooltip="The model in tune mode: sample with it as usual, then connect it "
                                             "to 'SpargeAttn Save Tuned'.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, mode, l1_target, pv_target, sim_threshold, start_percent, end_percent, dense_blocks,
                min_tokens, protect_text, token_order, verbose, precision="fast") -> io.NodeOutput:
        problem = kernel_problem()
        if problem is not None:
            logging.warning("SpargeAttn Tune: the sparse kernel cannot run here (%s); attention calls on this "
                            "device stay dense and nothing can be tuned.", problem)
        patched, _ = tune_model(model, mode=mode, l1_target=l1_target, pv_target=pv_target,
                                sim_threshold=sim_threshold, node_id=cls.hidden.unique_id,
                                start_percent=start_percent, end_percent=end_percent, dense_blocks=dense_blocks,
                                min_tokens=min_tokens, protect_text=protect_text, token_order=token_order,
                                verbose=verbose, precision=precision)
        return io.NodeOutput(patched)


class SpargeAttnSaveTuned(io.ComfyNode):
    """Schema and execution of the save node; the logic is in :func:`save_tuned`."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SpargeAttnSaveTuned",
            display_name="SpargeAttn Save Tuned",
            category="SpargeAttn",
            search_aliases=["save spargeattn thresholds", "save tuned sparse attention"],
            description=(
                "Writes the thresholds found by 'SpargeAttn Tune' to models/spargeattn/<name>.safetensors: per "
                "layer and head τ, θ, λ and top-k, with the model's shape, latent grid, targets and pack version. "
                "The write is atomic (an interrupted save leaves no partial file). Pick the file in the "
                "'tuned thresholds' list of SpargeAttn Patch (press R to refresh the list)."),
            inputs=[
                io.Model.Input("model", tooltip="The MODEL output of 'SpargeAttn Tune' (the one the sampler used)."),
                io.Latent.Input("latent", tooltip="The sampler's LATENT output: makes this node run after "
                                                  "sampling. Not modified."),
                io.String.Input("name", default="spargeattn_tuned",
                                tooltip="File name without folder; letters, digits, '-', '_' and '.' are kept, "
                                        "anything else (path separators included) becomes '_'."),
                io.Boolean.Input("overwrite", default=False,
                                 tooltip="Replace an existing file of that name. Off: an existing file is an error "
                                         "and is left as it is."),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, latent, name, overwrite) -> io.NodeOutput:
        path, summary = save_tuned(model, name, overwrite)
        return io.NodeOutput(ui=ui.PreviewText(f"{path}\n{summary}"))
