"""The "SpargeAttn Patch" node (MODEL -> MODEL) and its wiring into a ComfyUI ModelPatcher.

The node clones the model and puts a :class:`~.override.SpargeOverride` in the clone's
``transformer_options["optimized_attention_override"]``, on top of any override already there. It
registers, under the key ``"spargeattn"``:

* an ``APPLY_MODEL`` wrapper, run for every model evaluation: reads the latent grid from the
  latent's shape and the model's patch size, and puts the override back on top of the evaluation's
  own ``transformer_options`` (the dict attention actually receives);
* ``ON_PREPARE_STATE`` (once per evaluation): starts a statistics step at the evaluation's sigma,
  and on ComfyUI versions that pass the run's model options, re-installs the override there too;
* ``ON_PRE_RUN`` / ``ON_CLEANUP``: start and finish the run's statistics.

For Flux-family models (Flux, HunyuanVideo) whose blocks offer an ``attn1_patch`` with the rotary
embedding (ComfyUI versions after 0.8), it also adds a :class:`~.override.DeferredRope` patch, so that
sparse calls apply RoPE inside the kernel (``SPARGEATTN_FUSE_ROPE=0`` turns this off).

Nothing outside the clone is changed: no ComfyUI module, no shared diffusion model.
"""

from __future__ import annotations

import logging
import math
import os

import comfy.model_management
import comfy.patcher_extension
from comfy_api.latest import io

from . import tuned_folder
from .adapters import UNKNOWN, latent_grid, model_family
from .override import (MODES, PRECISIONS, TOKEN_ORDERS, DeferredRope, KernelAPI, SpargeConfig, SpargeState, install,
                       load_kernel, parse_dense_blocks)
from .presets import model_signature
from .ui import report_to_browser

KEY = "spargeattn"


def _sigma(t) -> float:
    """The evaluation's noise level as a host float (one read per evaluation, not per call)."""
    return float(t.max())


#: ``SPARGEATTN_FUSE_ROPE=0`` (read per patch) keeps RoPE in ComfyUI for every call
def _fuse_rope_enabled() -> bool:
    return os.environ.get("SPARGEATTN_FUSE_ROPE", "1") != "0"


def flux_rope(diffusion_model):
    """ComfyUI's ``apply_rope(q, k, pe)`` when ``diffusion_model``'s blocks are the Flux-family blocks of
    ``comfy.ldm.flux.layers`` that call ``attn1_patch(q, k, v, pe=..., ...)`` before their attention (and
    attention goes through the override wrapper), else None."""
    try:
        import inspect

        import comfy.ldm.flux.layers as flux_layers
        import comfy.ldm.flux.math as flux_math
        import comfy.ldm.modules.attention as attention
    except ImportError:
        return None
    blocks = getattr(diffusion_model, "double_blocks", None) or getattr(diffusion_model, "single_blocks", None)
    if not blocks or not isinstance(blocks[0], (flux_layers.DoubleStreamBlock, flux_layers.SingleStreamBlock)):
        return None
    if not hasattr(attention, "wrap_attn") or not hasattr(flux_math, "apply_rope"):
        return None
    try:
        source = inspect.getsource(type(blocks[0]).forward)
    except (OSError, TypeError):
        return None
    if "attn1_patch" not in source or "pe=pe" not in source:
        return None
    return flux_math.apply_rope


def apply_sparge(model, *, start_percent: float = 0.0, end_percent: float = 1.0, dense_blocks: str = "",
                 kernel: KernelAPI | None = None, node_id: str | None = None, thresholds=None, tuner=None,
                 fuse_rope: bool | None = None, **options):
    """Clone ``model`` (a ComfyUI ModelPatcher) with SpargeAttn installed.

    Parameters
    ----------
    model : comfy.model_patcher.ModelPatcher
    start_percent, end_percent : float
        Fraction of the sampling schedule between which attention may be sparse.
    dense_blocks : str
        Block indices that always stay dense, e.g. ``"0, 1, 47-49"``.
    kernel : KernelAPI, optional
        A kernel to use instead of ``kernels`` (tests).
    node_id : str, optional
        The node's id in the workflow, for logs.
    thresholds : presets.TunedThresholds, optional
        Tuned per-layer, per-head thresholds (checked against the model's shape here).
    tuner : tune.Tuner, optional
        Tune mode (the "SpargeAttn Tune" node).
    fuse_rope : bool, optional
        Flux-family models: rotate q and k inside the kernel (:class:`~.override.DeferredRope`); None (default):
        yes unless the environment has ``SPARGEATTN_FUSE_ROPE=0``.
    **options
        The remaining :class:`~.override.SpargeConfig` fields (mode, topk, ...).

    Returns
    -------
    (ModelPatcher, SpargeState)
        The patched clone and its state (settings, statistics).
    """
    if start_percent > end_percent:
        raise ValueError(f"start_percent ({start_percent}) is after end_percent ({end_percent}): "
                         "set start_percent <= end_percent")
    sampling = model.get_model_object("model_sampling")
    config = SpargeConfig(sigma_start=float(sampling.percent_to_sigma(start_percent)),
                          sigma_end=float(sampling.percent_to_sigma(end_percent)),
                          dense_blocks=parse_dense_blocks(dense_blocks), **options)
    diffusion_model = model.get_model_object("diffusion_model")
    family = model_family(diffusion_model)
    if thresholds is not None:
        thresholds.check_model(model_signature(diffusion_model, family))
    state = SpargeState(config, family, kernel, node_id, thresholds, tuner)

    def on_prepare_state(patcher, timestep, model_options=None, *_):
        state.begin_step(_sigma(timestep))
        if isinstance(model_options, dict):
            install(state, model_options.setdefault("transformer_options", {}))

    def apply_model_wrapper(executor, *args, **kwargs):
        x, t = args[0], args[1]
        options = args[5] if len(args) > 5 else kwargs.get("transformer_options")
        if state.eval is None:
            state.begin_step(_sigma(t))
        dm = executor.class_obj.diffusion_model
        patch_size = getattr(dm, "patch_size", None)
        grid, ref_tokens = None, 0
        if patch_size is not None and x.ndim in (4, 5):
            grid = latent_grid(x.shape, patch_size)
            ref = kwargs.get("ref_latent")
            if ref is not None and ref.ndim == x.ndim:
                ref_tokens = math.prod(latent_grid(ref.shape, patch_size))
        state.set_latent(grid, ref_tokens)
        if options is not None:
            install(state, options)
        return executor(*args, **kwargs)

    patched = model.clone()
    install(state, patched.model_options.setdefault("transformer_options", {}))
    cb, wr = comfy.patcher_extension.CallbacksMP, comfy.patcher_extension.WrappersMP
    patched.add_callback_with_key(cb.ON_PRE_RUN, KEY, lambda patcher: state.begin_run())
    patched.add_callback_with_key(cb.ON_PREPARE_STATE, KEY, on_prepare_state)
    patched.add_callback_with_key(cb.ON_CLEANUP, KEY, lambda patcher: state.end_run())
    patched.add_wrapper_with_key(wr.APPLY_MODEL, KEY, apply_model_wrapper)
    patched.set_attachments(KEY, state)  # found again by the "SpargeAttn Sparsity Map" node
    if fuse_rope is None:
        fuse_rope = _fuse_rope_enabled()
    rotate = flux_rope(diffusion_model) if fuse_rope else None
    if rotate is not None:
        state.rotate = rotate
        patched.set_model_attn1_patch(DeferredRope(state))
    if family == UNKNOWN and config.protect_text:
        logging.warning("SpargeAttn Patch: the token order of %s is unknown to this pack; joint text+image "
                        "attention stays dense (turn protect_text off to make it sparse without text "
                        "protection).", type(diffusion_model).__name__)
    return patched, state


def kernel_problem() -> str | None:
    """Why the sparse kernel cannot run on ComfyUI's device, or None when it can."""
    device = comfy.model_management.get_torch_device()
    if device.type != "cuda":
        return f"not CUDA: ComfyUI runs on {device}"
    loaded = load_kernel()
    return loaded if isinstance(loaded, str) else loaded.unavailable_reason(device)


def _slider(cls, id_, name, default, lo, hi, step, tooltip, **kw):
    return cls.Input(id_, display_name=name, default=default, min=lo, max=hi, step=step,
                     display_mode=io.NumberDisplay.slider, tooltip=tooltip, **kw)


class SpargeAttnPatch(io.ComfyNode):
    """Schema and execution of the patch node; the logic is in :func:`apply_sparge`."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SpargeAttnPatch",
            display_name="SpargeAttn Patch",
            category="SpargeAttn",
            search_aliases=["sparse attention", "sparge", "spargeattn", "sparse sage attention",
                            "block sparse attention", "speed up video"],
            description=(
                "Sparse + quantized attention (SpargeAttn in Triton) for Flux, Wan 2.1/2.2 and HunyuanVideo. "
                "For each 128-query block it predicts which 64-key blocks matter and computes only those, "
                "with INT8 Q·Kᵀ and FP8 P·V. The gain grows with sequence length. Measured on an H100 "
                "(random weights, top-k 0.5): attention 2.3x faster than dense SDPA at Wan 480p x 81 frames "
                "(32 760 tokens), a whole Wan 2.1-1.3B step 1.57x, HunyuanVideo 720p 1.94x; Flux 1024² "
                "(4 608 tokens) attention 1.37x, but attention is only ~15% of a Flux step, hence min_tokens. "
                "Cross-attention, masked attention, short sequences, the first steps and the "
                "dense blocks stay dense; verbose logs why. Needs an NVIDIA GPU (sm80+) and Triton; "
                "elsewhere the model runs dense. To undo: bypass this node (Ctrl+B) or remove it."),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to patch (Flux, Wan 2.1/2.2, HunyuanVideo)."),
                io.Combo.Input("mode", options=list(MODES), default="topk",
                               tooltip="How key blocks are chosen per query block. topk: a fixed fraction "
                                       "(predictable speed; the upstream recommendation). cdf: as many as needed "
                                       "to cover tau of the predicted attention mass (adapts per head)."),
                _slider(io.Float, "topk", "top-k", 0.5, 0.05, 1.0, 0.01,
                        "mode topk: fraction of key blocks each query block computes. Wan 480p attention on "
                        "an H100 vs dense SDPA: 0.5 -> 2.3x, 0.15 -> 7.0x, 1.0 (every block, quantization "
                        "only) -> 1.2x; a whole Wan 2.1-1.3B step: 0.5 -> 1.57x, 0.3 -> 1.85x."),
                _slider(io.Float, "cdf_threshold", "τ (cdf)", 0.98, 0.5, 1.0, 0.005,
                        "mode cdf: keep the most likely key blocks until their predicted attention mass "
                        "reaches tau. 0.98 is the upstream default; lower is sparser, 1.0 keeps all."),
                _slider(io.Float, "sim_threshold", "θ (self-similarity)", -0.1, -1.0, 1.0, 0.05,
                        "Blocks whose tokens are less alike (mean cosine) than theta are always computed, "
                        "because their mean token predicts them badly. -0.1 (upstream top-k default) "
                        "almost never triggers; 0.6 (upstream cdf default) protects many blocks and "
                        "lowers sparsity."),
                _slider(io.Float, "pv_threshold", "λ (P·V skip)", 0.0, 0.0, 50.0, 1.0,
                        "Second stage: skip the P·V product of a computed block when all its "
                        "probabilities are below 2^-lambda of the row's running maximum. 15 skips "
                        "blocks under ~3e-5 (upstream example); 0 turns this stage off."),
                _slider(io.Float, "start_percent", "start percent", 0.2, 0.0, 1.0, 0.01,
                        "Sampling progress before which attention stays dense: the early, high-noise "
                        "steps lay out the composition. 0.2 = the first 20% of the model's timestep range "
                        "(about 10 of 50 steps on an unshifted schedule, more on shifted Wan/Flux ones)."),
                _slider(io.Float, "end_percent", "end percent", 1.0, 0.0, 1.0, 0.01,
                        "Sampling progress after which attention is dense again; 1.0 = sparse until the "
                        "last step."),
                io.String.Input("dense_blocks", display_name="dense blocks", default="0, 1",
                                tooltip="Transformer blocks that always run dense, e.g. '0, 1' or '0, 1, 47-49' "
                                        "(for Flux the index applies to double and single blocks). In the "
                                        "upstream tuned CogVideoX-2B parameters, blocks 0 and 1 kept only 9 "
                                        "and 13 of 30 heads sparse."),
                _slider(io.Int, "min_tokens", "minimum tokens", 12288, 0, 262144, 256,
                        "Shorter sequences stay dense: the gain grows with length (H100, attention at "
                        "top-k 0.5 vs dense SDPA: 1.37x at 4 608 tokens, 2.0x at 17 776, 2.3x at 32 760). "
                        "A Flux 1024² step (4 608 tokens) gains 2-3% at top-k 0.5, so it stays dense below "
                        "the default 12 288; set 4096 to make it sparse."),
                io.Boolean.Input("protect_text", display_name="protect text tokens", default=True,
                                 tooltip="Always compute text tokens (as queries and as keys) in joint "
                                         "attention (Flux, HunyuanVideo): 512 of 4 608 tokens in Flux 1024², at most "
                                         "256 of ~119K in HunyuanVideo 720p. They carry the prompt and get "
                                         "starved by block selection otherwise."),
                io.Combo.Input("token_order", display_name="token order", options=list(TOKEN_ORDERS),
                               default="row-major",
                               tooltip="Order of image/video tokens inside the kernel. hilbert walks the "
                                       "latent grid along a 3-D Hilbert curve so blocks are compact boxes: "
                                       "+2-3 points of sparsity in the paper (CogVideoX, Mochi) at slightly "
                                       "higher error, for one gather/scatter per call."),
                io.Boolean.Input("verbose", default=False,
                                 tooltip="Log each reason for dense attention once per run, one statistics "
                                         "line per step (density, P·V skipped, dense calls) and a run summary."),
                io.Combo.Input("tuned", display_name="tuned thresholds", options=tuned_folder.choices(),
                               default=tuned_folder.NONE,
                               tooltip="Per-layer, per-head thresholds found by 'SpargeAttn Tune' and written by "
                                       "'SpargeAttn Save Tuned' (models/spargeattn). A file replaces mode, token "
                                       "order and the τ, θ, λ and top-k sliders with its own values; layers it "
                                       "does not list stay dense. A file tuned for another model is refused. "
                                       "none: use the sliders."),
                io.Combo.Input("precision", display_name="P·V precision", options=list(PRECISIONS),
                               default="fast",
                               tooltip="fast: P·V in FP8 on GPUs with FP8 tensor cores (RTX 40xx, H100 and "
                                       "newer; fp16 on older ones). accurate: P·V in fp16, about 3x closer to "
                                       "dense attention (relL1 0.012 instead of 0.040 on random inputs at Wan "
                                       "480p) for ~20% more attention time on an H100 (Wan 480p top-k 0.5: "
                                       "2.0x instead of 2.3x vs dense SDPA)."),
            ],
            outputs=[io.Model.Output(tooltip="The model with SpargeAttn attention.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, mode, topk, cdf_threshold, sim_threshold, pv_threshold, start_percent,
                end_percent, dense_blocks, min_tokens, protect_text, token_order, verbose,
                tuned=tuned_folder.NONE, precision="fast") -> io.NodeOutput:
        thresholds = tuned_folder.load(tuned)
        if thresholds is not None:
            mode, token_order = thresholds.mode, thresholds.token_order
            logging.info("SpargeAttn Patch: tuned thresholds from %s: %s", thresholds.source, thresholds.summary())
            if thresholds.precision == "accurate" and precision != "accurate":
                logging.warning("SpargeAttn Patch: %s was tuned with P·V precision 'accurate' and is applied with "
                                "'%s': the FP8 rounding comes on top of the errors it was tuned for. Set P·V "
                                "precision to 'accurate', or tune again with 'fast'.", thresholds.source, precision)
        problem = kernel_problem()
        if problem is not None:
            logging.warning("SpargeAttn Patch: the sparse kernel cannot run here (%s); the model will "
                            "use dense attention.", problem)
        patched, state = apply_sparge(
            model, start_percent=start_percent, end_percent=end_percent, dense_blocks=dense_blocks,
            node_id=cls.hidden.unique_id, mode=mode, topk=topk, cdf_threshold=cdf_threshold,
            sim_threshold=sim_threshold, pv_threshold=pv_threshold, min_tokens=min_tokens,
            protect_text=protect_text, token_order=token_order, verbose=verbose, thresholds=thresholds,
            precision=precision)
        report_to_browser(patched, state, KEY)
        return io.NodeOutput(patched)
