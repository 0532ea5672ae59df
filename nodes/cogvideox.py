"""SpargeAttn for CogVideoX as run by kijai's ComfyUI-CogVideoXWrapper (model type ``COGVIDEOMODEL``).

The wrapper runs CogVideoX through its own diffusers-style code, so ComfyUI's attention override never
sees it. What it does instead (``custom_cogvideox_transformer_3d.py``, checked against wrapper commit
``fdb8abd2``, Aug 2025):

* ``COGVIDEOMODEL`` is a dict; ``model["pipe"]`` is a ``CogVideoXPipeline`` whose ``transformer`` holds
  ``transformer_blocks[i].attn1``, a diffusers ``Attention`` with its own ``CogVideoXAttnProcessor2_0``.
* The processor joins ``[text (226 tokens), video]``, applies RoPE to the video part, and calls
  ``processor.attn_func(q, k, v, attn_mask=None, is_causal=False)`` with q, k, v of shape (B, H, N, D),
  head dim 64. ``attn_func`` was picked at load time by the loader's ``attention_mode`` and returns
  (B, H, N, D), except for ``attention_mode="comfy"``, where it returns (B, N, H·D).
* The sampler node calls ``model["pipe"](...)``, which loops over the scheduler's timesteps and calls
  ``pipe.transformer(hidden_states=(B, T, C, H, W) latent, timestep=..., ...)`` once per step (several
  times with context windows), cond and uncond batched together.

:func:`apply_sparge_cogvideox` returns a *copy* of that dict whose pipeline, transformer, block list,
blocks and attention modules are new objects sharing every weight with the original, and whose
processors are copies with ``attn_func`` replaced by a :class:`CogVideoXAttention` (one per layer, so
the layer index is known). The original model, which other workflows may share, is not touched: no
attribute of it is set and no hook is added to it. The copy's pipeline class is a subclass of the
original's whose ``__call__`` opens and closes the statistics run; a forward pre-hook on the copied
transformer starts a statistics step per timestep and records the latent grid.

Decisions, statistics and the kernel call are those of :class:`~.override.SpargeState` (the same
dense reasons and :class:`~.stats.StepStats` as the "SpargeAttn Patch" node); the text tokens are the
sequence minus the latent grid and sit first (``TEXT_FIRST``). This module imports neither ComfyUI nor
the wrapper; the node is in ``cogvideox_node.py``.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import types
from collections import OrderedDict
from dataclasses import replace
from typing import Callable

import torch

from .adapters import TEXT_FIRST, output_layout, view_call
from .override import MASK, Dense, KernelAPI, SpargeConfig, SpargeState, parse_dense_blocks
from .stats import RunStats

log = logging.getLogger("spargeattn")

KEY = "spargeattn"  # key of the RunHooks in the patched COGVIDEOMODEL dict
BLOCK_TYPE = "block"  # statistics key of layer i: "block.i"; options["block_index"] = i
# ComfyUI's alphas_cumprod for the last step of a zero-terminal-SNR schedule (comfy/model_sampling.py),
# which CogVideoX's schedulers use (rescale_betas_zero_snr): sigma there is ~4518 instead of infinite.
ZSNR_ALPHA_BAR = 4.8973451890853435e-08


def latent_grid(latent_shape, patch_size: int, patch_size_t: int | None = None) -> tuple[int, int, int]:
    """Token grid (T', H', W') of the latent the wrapper's transformer gets.

    Parameters
    ----------
    latent_shape : sequence of int
        (B, T, C, H, W): latent frames first, channels second (the wrapper's layout).
    patch_size : int
        Spatial patch (2 for every CogVideoX).
    patch_size_t : int or None
        Temporal patch: None for CogVideoX 1.0 (every latent frame is a token row), 2 for 1.5.

    Returns
    -------
    (T', H', W')
        As ``CogVideoXPatchEmbed`` lays the video tokens out, row-major (t, h, w). 720x480, 49
        frames: latent (B, 13, 16, 60, 90) -> (13, 30, 45) = 17 550 tokens.
    """
    if len(latent_shape) != 5:
        raise ValueError(f"expected a (B, T, C, H, W) latent, got shape {tuple(latent_shape)}")
    _, t, _, h, w = (int(s) for s in latent_shape)
    return (t // patch_size_t if patch_size_t else t, h // patch_size, w // patch_size)


class NoiseLevels:
    """Noise level sigma = sqrt((1 - ᾱ_t) / ᾱ_t) of a discrete-time scheduler, as ComfyUI computes it.

    ComfyUI's start/end percent mean timestep (1 - percent) * 999 of the training schedule
    (``ModelSamplingDiscrete.percent_to_sigma``); the same mapping here gives the "SpargeAttn Patch"
    node's start/end percent the same meaning for the wrapper's samplers.

    Parameters
    ----------
    alphas_cumprod : tensor
        ᾱ per training timestep, from the scheduler in use (``scheduler.alphas_cumprod``).
    """

    def __init__(self, alphas_cumprod):
        a = torch.as_tensor(alphas_cumprod, dtype=torch.float64).detach().cpu().reshape(-1)
        if a.numel() < 2:
            raise ValueError(f"alphas_cumprod needs at least 2 timesteps, got {a.numel()}")
        a = a.clamp(ZSNR_ALPHA_BAR, 1.0 - 1e-12)
        self.log_sigmas = ((1.0 - a) / a).sqrt().log().tolist()

    def sigma(self, timestep: float) -> float:
        """Sigma at a (possibly fractional) training timestep, interpolated in log sigma."""
        last = len(self.log_sigmas) - 1
        t = min(max(float(timestep), 0.0), float(last))
        lo = math.floor(t)
        hi = min(lo + 1, last)
        w = t - lo
        return math.exp((1.0 - w) * self.log_sigmas[lo] + w * self.log_sigmas[hi])

    def percent_to_sigma(self, percent: float) -> float:
        """Sigma at ``percent`` of sampling: inf at 0 (before the first step), 0 at 1."""
        if percent <= 0.0:
            return math.inf
        if percent >= 1.0:
            return 0.0
        return self.sigma((1.0 - percent) * (len(self.log_sigmas) - 1))


class CogVideoXAttention:
    """The ``attn_func`` of one copied processor: SpargeAttn for eligible calls, the original otherwise.

    Called as ``attn_func(q, k, v, attn_mask=None, is_causal=False)`` with q, k, v of shape
    (B, H, N, D). Returns what the original function returns: (B, H, N, D), or (B, N, H·D) when
    ``merged_heads`` (the wrapper's ``attention_mode="comfy"``).

    Parameters
    ----------
    state : SpargeState
    layer : int
        Index of the transformer block; reported to the state as ``block_index`` (dense blocks,
        statistics key ``"block.<layer>"``, per-layer settings).
    original : callable
        The processor's ``attn_func`` before patching (the wrapper's sdpa / sage / comfy function).
    merged_heads : bool
        The original returns (B, N, H·D).
    """

    def __init__(self, state: SpargeState, layer: int, original: Callable, merged_heads: bool):
        self.state = state
        self.layer = layer
        self.original = original
        self.merged_heads = merged_heads
        self.options = {"block_index": layer, "block_type": BLOCK_TYPE}

    @torch.compiler.disable
    def __call__(self, q, k, v, is_causal=False, attn_mask=None, **kwargs):
        state = self.state
        view = view_call(q, k, v, q.shape[1], skip_reshape=True)
        if is_causal:
            decision = Dense(MASK, "is_causal=True")
        else:
            decision = state.decide(view, attn_mask, {**kwargs, "transformer_options": self.options})
        if isinstance(decision, Dense):
            state.count_dense(decision)
            return self.original(q, k, v, is_causal=is_causal, attn_mask=attn_mask, **kwargs)
        out = state.run_sparse(view, decision, self.options, kwargs.get("scale"))
        return output_layout(out, view, skip_output_reshape=not self.merged_heads)


class RunHooks:
    """Drives a :class:`SpargeState` from the wrapper's sampling: runs, steps, latent grid, window.

    Parameters
    ----------
    state : SpargeState
    start_percent, end_percent : float
        Sampling window in which attention may be sparse (ComfyUI's percent; see :class:`NoiseLevels`),
        turned into sigmas at the start of every run from the scheduler the sampler node chose.

    Attributes
    ----------
    run_listeners : list of callables
        Each is called with the finished run's :class:`~.stats.RunStats` at the end of every
        pipeline call (the UI's summary).
    """

    def __init__(self, state: SpargeState, start_percent: float, end_percent: float):
        self.state = state
        self.start_percent = start_percent
        self.end_percent = end_percent
        self.levels: NoiseLevels | None = None
        self.run_listeners: list[Callable[[RunStats], None]] = []
        self._timestep: float | None = None
        self._in_step = False

    def begin_run(self, scheduler) -> None:
        """Start of a pipeline call: window from ``scheduler``'s noise levels, fresh statistics."""
        alphas = getattr(scheduler, "alphas_cumprod", None)
        self.levels = NoiseLevels(alphas) if alphas is not None else None
        if self.levels is not None:
            start, end = (self.levels.percent_to_sigma(p) for p in (self.start_percent, self.end_percent))
        else:
            start, end = math.inf, 0.0
            if self.start_percent > 0.0 or self.end_percent < 1.0:
                log.warning("SpargeAttn CogVideoX: scheduler %s has no alphas_cumprod, so start/end percent "
                            "cannot be placed; attention may be sparse at every step", type(scheduler).__name__)
        self.state.config = replace(self.state.config, sigma_start=start, sigma_end=end)
        self.state.begin_run()
        self._in_step = False

    def end_run(self) -> None:
        """End of a pipeline call: the last step's statistics are flushed, the run goes to the listeners."""
        run = self.state.end_run()
        self._in_step = False
        for listener in self.run_listeners:
            listener(run)

    def before_forward(self, module, args, kwargs) -> None:
        """Forward pre-hook of the copied transformer (one host read of the timestep per call)."""
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        timestep = kwargs.get("timestep", args[2] if len(args) > 2 else None)
        t = None if timestep is None else float(torch.as_tensor(timestep).reshape(-1)[0])
        if not self._in_step or t != self._timestep:  # context windows of one step share its timestep
            self._in_step, self._timestep = True, t
            sigma = self.levels.sigma(t) if self.levels is not None and t is not None else None
            self.state.begin_step(sigma)
        grid = None
        if isinstance(hidden, torch.Tensor) and hidden.ndim == 5:
            config = module.config
            grid = latent_grid(hidden.shape, config.patch_size, getattr(config, "patch_size_t", None))
        self.state.set_latent(grid)


@functools.lru_cache(maxsize=None)
def _hooked_pipeline_class(base: type) -> type:
    """Subclass of the wrapper's pipeline class whose ``__call__`` is one statistics run."""

    def __call__(self, *args, **kwargs):
        hooks = self.__dict__["_spargeattn_hooks"]
        hooks.begin_run(self.scheduler)
        try:
            return base.__call__(self, *args, **kwargs)
        finally:
            hooks.end_run()

    return type(base.__name__, (base,), {"__call__": __call__, "__module__": base.__module__,
                                          "__doc__": base.__doc__, "_spargeattn_base": base})


def _own_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A shallow copy of ``module`` that shares its parameters, buffers and children but owns its
    registries: setting a child, an attribute or a hook on the copy leaves ``module`` untouched.

    Instance attributes bound to ``module`` itself (accelerate's offload hooks store
    ``_old_forward`` = ``module.forward`` and ``forward`` = ``partial(new_forward, module)``) are
    re-bound to the copy, so the copy runs its own children.
    """
    new = copy.copy(module)
    for name, value in vars(module).items():
        if type(value) in (dict, OrderedDict, set, list):
            new.__dict__[name] = copy.copy(value)
        elif isinstance(value, types.MethodType) and value.__self__ is module:
            new.__dict__[name] = types.MethodType(value.__func__, new)
        elif isinstance(value, functools.partial) and value.args and value.args[0] is module:
            rebound = functools.partial(value.func, new, *value.args[1:], **value.keywords)
            rebound.__dict__.update(value.__dict__)
            new.__dict__[name] = rebound
    return new


def _copy_block(block: torch.nn.Module, layer: int, make_attn: Callable) -> torch.nn.Module:
    inner = getattr(block, "_orig_mod", None)
    if inner is not None and hasattr(block, "dynamo_ctx"):  # torch.compile'd block: compile the copy alike
        return type(block)(_copy_block(inner, layer, make_attn), block.dynamo_ctx)
    attn = getattr(block, "attn1", None)
    processor = getattr(attn, "processor", None)
    if not callable(getattr(processor, "attn_func", None)):
        raise ValueError(
            f"transformer block {layer} ({type(block).__name__}) has no attn1.processor.attn_func to replace: this "
            "node patches the CogVideoX transformer of kijai's ComfyUI-CogVideoXWrapper (December 2024 or later, "
            "where each processor holds an attn_func); update the wrapper or load the model with its loader")
    new_block, new_attn = _own_copy(block), _own_copy(attn)
    new_processor = copy.copy(processor)
    original = processor.attn_func
    if isinstance(original, CogVideoXAttention):  # patched twice: the later settings replace the earlier
        original = original.original
    new_processor.attn_func = make_attn(layer, original, getattr(processor, "attention_mode", None))
    new_attn.processor = new_processor
    new_block.attn1 = new_attn
    return new_block


def copy_transformer(transformer: torch.nn.Module, make_attn: Callable) -> torch.nn.Module:
    """Copy of the wrapper's transformer whose layer ``i`` calls ``make_attn(i, attn_func, attention_mode)``.

    Only the path down to the processors is copied (transformer, block list, blocks, ``attn1``); weights
    and every other submodule stay shared.
    """
    blocks = getattr(transformer, "transformer_blocks", None)
    if not isinstance(blocks, torch.nn.ModuleList) or len(blocks) == 0:
        raise ValueError(f"{type(transformer).__name__} has no transformer_blocks: expected the CogVideoX transformer "
                         "of ComfyUI-CogVideoXWrapper (model['pipe'].transformer)")
    new_blocks = _own_copy(blocks)
    for i, block in enumerate(blocks):
        new_blocks[i] = _copy_block(block, i, make_attn)
    new = _own_copy(transformer)
    new.transformer_blocks = new_blocks
    return new


def apply_sparge_cogvideox(model: dict, *, start_percent: float = 0.0, end_percent: float = 1.0,
                           dense_blocks: str = "", kernel: KernelAPI | None = None, node_id: str | None = None,
                           **options) -> tuple[dict, SpargeState]:
    """Copy a ``COGVIDEOMODEL`` with SpargeAttn in every layer's self-attention.

    Parameters
    ----------
    model : dict
        The wrapper's model (``{"pipe": CogVideoXPipeline, "dtype": ..., ...}``).
    start_percent, end_percent : float
        Fraction of sampling between which attention may be sparse (as in "SpargeAttn Patch").
    dense_blocks : str
        Transformer blocks (layer indices) that always stay dense, e.g. ``"0, 1"``.
    kernel : KernelAPI, optional
        A kernel to use instead of ``kernels`` (tests).
    node_id : str, optional
        The node's id in the workflow, for logs.
    **options
        The remaining :class:`~.override.SpargeConfig` fields (mode, topk, ...).

    Returns
    -------
    (dict, SpargeState)
        The patched copy and its state (settings, statistics per run in ``state.last_run``). The
        copy holds the :class:`RunHooks` under ``"spargeattn"`` (``run_listeners``, for nodes
        downstream); the wrapper ignores keys it does not know.

    Raises
    ------
    ValueError
        When ``model`` is not a CogVideoXWrapper model, or start/end percent are out of order.
    """
    if start_percent > end_percent:
        raise ValueError(f"start_percent ({start_percent}) is after end_percent ({end_percent}): "
                         "set start_percent <= end_percent")
    pipe = model.get("pipe") if isinstance(model, dict) else None
    if pipe is None or not isinstance(getattr(pipe, "transformer", None), torch.nn.Module):
        raise ValueError("expected the COGVIDEOMODEL output of a ComfyUI-CogVideoXWrapper loader (a dict with a "
                         f"'pipe' holding a transformer), got {type(model).__name__}")
    state = SpargeState(SpargeConfig(dense_blocks=parse_dense_blocks(dense_blocks), **options), TEXT_FIRST, kernel,
                        node_id)
    hooks = RunHooks(state, start_percent, end_percent)
    transformer = copy_transformer(
        pipe.transformer, lambda i, func, mode: CogVideoXAttention(state, i, func, merged_heads=mode == "comfy"))
    for key, hook in list(transformer._forward_pre_hooks.items()):  # an earlier patch's hook, copied along
        if isinstance(getattr(hook, "__self__", None), RunHooks):
            del transformer._forward_pre_hooks[key]
            transformer._forward_pre_hooks_with_kwargs.pop(key, None)
    transformer.register_forward_pre_hook(hooks.before_forward, with_kwargs=True)
    new_pipe = copy.copy(pipe)
    new_pipe.transformer = transformer
    new_pipe._spargeattn_hooks = hooks
    new_pipe.__class__ = _hooked_pipeline_class(getattr(type(pipe), "_spargeattn_base", type(pipe)))
    patched = dict(model)
    patched["pipe"] = new_pipe
    patched[KEY] = hooks
    return patched, state
