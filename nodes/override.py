"""The attention override: which calls go sparse, why the others stay dense, chaining, statistics.

ComfyUI (>= v0.3.60) calls ``transformer_options["optimized_attention_override"]`` as
``override(func, q, k, v, heads, mask=..., skip_reshape=..., skip_output_reshape=...,
transformer_options=..., _inside_attn_wrapper=True, **more)`` for every attention of the native
DiTs, where ``func`` is the default backend. :class:`SpargeOverride` runs the SpargeAttn kernel for
eligible self/joint-attention calls and hands every other call, unchanged (``_inside_attn_wrapper``
included, so nothing recurses), to the override that was installed before it or to ``func``.

All per-model state lives in one :class:`SpargeState` object, held by reference: ComfyUI copies the
dicts of ``transformer_options`` for every call, so state kept in a plain dict there would be lost.
Flux-family blocks (Flux, HunyuanVideo) rotate q and k (RoPE) right before their attention call. With
:class:`DeferredRope` installed as their ``attn1_patch``, the block hands ``pe`` to the state instead
and calls attention on the unrotated q and k; a sparse call then rotates inside the kernel's
preparation (``sparge_attn(..., rope=pe)``), and every other call gets q and k rotated by ComfyUI's own
function first. That saves a read and a write of q and k per call (12 ms of a ~0.17 s Flux step on an
H200 with comfy-kitchen's CUDA RoPE).

This module imports no ComfyUI code; the ComfyUI glue is in ``patch.py``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Container

import torch

from .adapters import UNKNOWN, CallView, TokenLayout, output_layout, token_layout, view_call
from .hilbert import sequence_permutation
from .stats import RunStats, StepAccumulator, StepStats

log = logging.getLogger("spargeattn")

MODES = ("cdf", "topk")
TOKEN_ORDERS = ("row-major", "hilbert")
#: P.V precision: "fast" = FP8 where the GPU has FP8 tensor cores (sm_89+), else fp16; "accurate" = fp16
PRECISIONS = {"fast": "auto", "accurate": "fp16"}
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Categories of dense calls; statistics count by category, verbose logs add the detail.
LOW_PRECISION = "low_precision_attention=False"
MASK = "mask"
CROSS = "cross-attention"
GQA = "grouped K/V heads"
WINDOW = "sigma outside the start/end window"
DENSE_BLOCK = "dense block"
MIN_TOKENS = "fewer tokens than min_tokens"
NOT_CUDA = "not CUDA"
KERNEL = "kernel unavailable"
HEAD_DIM = "unsupported head dim"
DTYPE = "unsupported dtype"
LAYOUT = "token layout"
UNTUNED = "layer not in the tuned thresholds"
TUNING = "tuning (dense output, sparse probe)"


@dataclass(frozen=True)
class SpargeConfig:
    """The node's settings, validated.

    Attributes
    ----------
    mode : "cdf" or "topk"
        Block selection: keep blocks up to cumulative attention mass ``cdf_threshold`` (τ), or a
        fixed fraction ``topk`` of key blocks per query block.
    cdf_threshold, sim_threshold, topk : float
        τ, θ (self-similarity threshold; blocks below it are always computed) and top-k fraction.
    pv_threshold : float
        λ in log2 units: skip P·V of a block when all its probabilities are below 2^-λ of the
        running maximum. 0 turns this second stage off.
    sigma_start, sigma_end : float
        Sparse only while ``sigma_end <= sigma <= sigma_start``.
    dense_blocks : frozenset of int
        Block indices (``transformer_options["block_index"]``) that always run dense.
    min_tokens : int
        Shorter sequences stay dense.
    protect_text : bool
        Text (and reference) tokens are always computed, as rows and as columns.
    token_order : "row-major" or "hilbert"
        Order of the latent grid's tokens inside the kernel.
    verbose : bool
        Log each dense reason once per run and one line of statistics per step.
    precision : "fast" or "accurate"
        P.V in FP8 (sm_89+) or in fp16 (~3x less error, slower; bench/NOTES.md #27).
    """

    mode: str = "topk"
    cdf_threshold: float = 0.98
    sim_threshold: float = -0.1
    pv_threshold: float = 0.0
    topk: float = 0.5
    sigma_start: float = math.inf
    sigma_end: float = 0.0
    dense_blocks: frozenset = frozenset()
    min_tokens: int = 12288
    protect_text: bool = True
    token_order: str = "row-major"
    verbose: bool = False
    precision: str = "fast"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {self.precision!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.token_order not in TOKEN_ORDERS:
            raise ValueError(f"token_order must be one of {TOKEN_ORDERS}, got {self.token_order!r}")
        if not 0.0 < self.cdf_threshold <= 1.0:
            raise ValueError(f"tau (cdf_threshold) must be in (0, 1], got {self.cdf_threshold}")
        if not 0.0 < self.topk <= 1.0:
            raise ValueError(f"topk must be in (0, 1], got {self.topk}")
        if not -1.0 <= self.sim_threshold <= 1.0:
            raise ValueError(f"theta (sim_threshold) must be in [-1, 1], got {self.sim_threshold}")
        if self.pv_threshold < 0:
            raise ValueError(f"lambda (pv_threshold) must be >= 0 (0 turns it off), got {self.pv_threshold}")
        if self.sigma_end > self.sigma_start:
            raise ValueError("end_percent must not come before start_percent: set start_percent <= end_percent")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {self.min_tokens}")

    def kernel_options(self) -> dict:
        """Keyword arguments for ``kernels.sparge_attn``."""
        return {
            "mode": self.mode,
            "cdf_threshold": self.cdf_threshold,
            "sim_threshold": self.sim_threshold,
            "pv_threshold": self.pv_threshold or None,
            "topk": self.topk,
        }


def parse_dense_blocks(text: str) -> frozenset:
    """``"0, 1, 47-49"`` -> {0, 1, 47, 48, 49}; empty text -> no block.

    Raises
    ------
    ValueError
        Naming the part that could not be read and the expected form.
    """
    blocks = set()
    for part in (text or "").replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        if not lo.strip().isdigit() or (sep and not hi.strip().isdigit()):
            raise ValueError(f"dense_blocks: cannot read {part!r}; write block indices and ranges like '0, 1, 47-49'")
        a, b = int(lo), int(hi) if sep else int(lo)
        blocks.update(range(min(a, b), max(a, b) + 1))
    return frozenset(blocks)


@dataclass(frozen=True)
class KernelAPI:
    """The three things the override needs from ``kernels`` (replaceable in tests)."""

    attn: Callable
    unavailable_reason: Callable[[torch.device], str | None]
    head_dims: Container[int]


def load_kernel() -> KernelAPI | str:
    """Import the pack's kernels lazily; the reason as a string when they cannot be imported."""
    try:
        from ..kernels import SUPPORTED_HEAD_DIMS, sparge_attn, unavailable_reason
    except ImportError as e:
        return f"the kernels failed to import ({e})"
    return KernelAPI(sparge_attn, unavailable_reason, SUPPORTED_HEAD_DIMS)


@dataclass(frozen=True)
class Dense:
    """Why a call stays dense: a category (counted) and a detail (logged)."""

    category: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.category}: {self.detail}" if self.detail else self.category


@dataclass
class EvalContext:
    """What the current model evaluation knows before attention runs."""

    sigma: float | None = None
    in_window: bool = True
    grid: tuple[int, int, int] | None = None
    ref_tokens: int = 0
    calls: int = 0


class SpargeState:
    """Settings, run state and statistics of one patched model.

    One object per "SpargeAttn Patch" execution, shared by reference by every clone of the patched
    model (``copy.deepcopy`` returns the object itself, since ComfyUI deep-copies model options on
    some versions).

    Parameters
    ----------
    config : SpargeConfig
    family : str
        Token-order family of the model (``adapters.model_family``).
    kernel : KernelAPI, optional
        Injected kernel; by default ``kernels`` is imported on the first eligible call.
    node_id : str, optional
        The patch node's id in the workflow (names the node in logs and, later, in UI messages).
    thresholds : presets.TunedThresholds, optional
        Per-layer, per-head thresholds from a tuned file; they replace the config's τ/θ/λ/top-k, and
        layers missing from the file stay dense.
    tuner : tune.Tuner, optional
        Tune mode: every eligible call returns the dense output and feeds one sparse probe to it.

    Attributes
    ----------
    run : RunStats
        Statistics of the run in progress; ``last_run`` holds the previous, finished one.
    step_listeners : list of callables
        Each is called with the :class:`StepStats` of every finished step (once per step).
    """

    def __init__(self, config: SpargeConfig, family: str = UNKNOWN, kernel: KernelAPI | None = None,
                 node_id: str | None = None, thresholds=None, tuner=None):
        self.config = config
        self.family = family
        self.kernel = kernel
        self.node_id = node_id
        self.thresholds = thresholds
        self.tuner = tuner
        self.step_listeners: list[Callable[[StepStats], None]] = []
        if config.verbose:
            self.step_listeners.append(lambda step: self._log(step.summary_line()))
        self.last_run: RunStats | None = None
        self._device_reasons: dict[str, Dense | None] = {}
        self._delegating = 0
        #: ComfyUI's RoPE, ``rotate(q, k, pe) -> (q, k)``, set by patch.py where :class:`DeferredRope` is
        #: installed; None: RoPE is never deferred
        self.rotate: Callable | None = None
        #: why deferring RoPE was turned off for this model (None while it is on)
        self.rope_off: str | None = None
        self._pending_rope: tuple | None = None
        #: sparse calls that applied RoPE in the kernel, since the patch (host counter)
        self.rope_calls = 0
        self._reset_run()

    def __deepcopy__(self, memo):
        return self

    # ---- run / step lifecycle (driven by patch.py's callbacks and wrapper) ----

    def _reset_run(self) -> None:
        self._pending_rope = None
        self.run = RunStats()
        self.eval: EvalContext | None = None
        self._step = StepAccumulator()
        self._logged: set[str] = set()

    def begin_run(self) -> None:
        """Start of a sampling run: statistics start afresh, reasons are logged again."""
        self._reset_run()

    def begin_step(self, sigma: float | None) -> None:
        """Start of a model evaluation at noise level ``sigma`` (one host value, read once)."""
        self._flush_step()
        c = self.config
        in_window = sigma is None or c.sigma_end <= sigma <= c.sigma_start
        self.eval = EvalContext(sigma=sigma, in_window=in_window)

    def set_latent(self, grid: tuple[int, int, int] | None, ref_tokens: int = 0) -> None:
        """Latent grid (and reference-latent tokens) of the evaluation that is about to run."""
        if self.eval is None:
            self.begin_step(None)
        self.eval.grid = grid
        self.eval.ref_tokens = ref_tokens

    def end_run(self) -> RunStats:
        """End of a sampling run (ComfyUI's cleanup): keep its statistics, reset the rest."""
        self._flush_step()
        run = self.run
        if self.config.verbose and run.steps:
            self._log(f"run finished: {run.summary_line()}")
        self._reset_run()
        self.last_run = run
        return run

    def _flush_step(self) -> None:
        if self.tuner is not None:
            self.tuner.end_eval()
        if self.eval is None or not self._step:
            return
        step = self._step.flush(len(self.run.steps), self.eval.sigma)
        self.run.steps.append(step)
        for listener in self.step_listeners:
            listener(step)

    # ---- deferred RoPE (see DeferredRope) ----

    def defer_rope(self, q: torch.Tensor, k: torch.Tensor, pe: torch.Tensor) -> bool:
        """Keep ``pe`` for the attention call on exactly these q and k (host only). False when deferring
        is off; it turns itself off for good when the call deferred before never reached the override
        (something between the block and the attention bypassed it), since that call ran unrotated."""
        if self.rotate is None or self.rope_off is not None:
            return False
        if self._pending_rope is not None:
            self.rope_off = ("an attention call whose RoPE was deferred did not reach the SpargeAttn override; "
                             "RoPE is applied by ComfyUI again from now on")
            self._pending_rope = None
            log.warning("SpargeAttn: %s. Another node may have replaced the attention; if images look wrong, "
                        "re-run the prompt.", self.rope_off)
            return False
        self._pending_rope = (q, k, pe)
        return True

    def take_rope(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
        """The ``pe`` deferred for this call's q and k (consumed), or None."""
        pending = self._pending_rope
        if pending is None or pending[0] is not q or pending[1] is not k:
            return None
        self._pending_rope = None
        return pending[2]

    # ---- decisions ----

    def _log(self, message: str) -> None:
        node = f" #{self.node_id}" if self.node_id is not None else ""
        log.info("SpargeAttn%s: %s", node, message)

    def log_once(self, key: str, message: str) -> None:
        """Log ``message`` once per run when verbose."""
        if self.config.verbose and key not in self._logged:
            self._logged.add(key)
            self._log(message)

    def _device_reason(self, device: torch.device) -> Dense | None:
        """Why the kernel cannot run on ``device`` (asked once per device), or None."""
        key = str(device)
        if key not in self._device_reasons:
            category = KERNEL if device.type == "cuda" else NOT_CUDA
            if self.kernel is None:
                loaded = load_kernel()
                if isinstance(loaded, str):
                    self._device_reasons[key] = Dense(category, loaded)
                    return self._device_reasons[key]
                self.kernel = loaded
            why = self.kernel.unavailable_reason(device)
            self._device_reasons[key] = None if why is None else Dense(category, why)
        return self._device_reasons[key]

    def decide(self, view: CallView, mask, kwargs: dict) -> TokenLayout | Dense:
        """Token layout for a sparse call, or why this call stays dense."""
        c = self.config
        options = kwargs.get("transformer_options") or {}
        if kwargs.get("low_precision_attention", True) is False:
            return Dense(LOW_PRECISION, "the model asks for full-precision attention here")
        if mask is not None:
            return Dense(MASK, f"mask of shape {tuple(mask.shape)}")
        if view.n_q != view.n_k:
            return Dense(CROSS, f"{view.n_q} queries, {view.n_k} keys")
        if kwargs.get("enable_gqa") or view.k.shape != view.q.shape or view.v.shape != view.q.shape:
            return Dense(GQA, f"q {tuple(view.q.shape)}, k {tuple(view.k.shape)}, v {tuple(view.v.shape)}")
        ctx = self.eval or EvalContext()
        if not ctx.in_window:
            return Dense(WINDOW, f"sigma {ctx.sigma:.4g} outside [{c.sigma_end:.4g}, {c.sigma_start:.4g}]")
        block = options.get("block_index")
        if c.dense_blocks and block is None:
            self.log_once("no-block-index", "this model reports no block index; dense_blocks is ignored")
        elif block in c.dense_blocks:
            return Dense(DENSE_BLOCK, f"{options.get('block_type', 'block')} block {block}")
        if self.thresholds is not None:
            key = self.layer_key(options)
            if key not in self.thresholds.layers:
                return Dense(UNTUNED, key)
        if view.n_q < c.min_tokens:
            return Dense(MIN_TOKENS, f"{view.n_q} < {c.min_tokens}")
        device = self._device_reason(view.q.device)
        if device is not None:
            return device
        if view.head_dim not in self.kernel.head_dims:
            return Dense(HEAD_DIM, f"head dim {view.head_dim}")
        if view.q.dtype not in KERNEL_DTYPES or view.k.dtype != view.q.dtype or view.v.dtype != view.q.dtype:
            return Dense(DTYPE, f"{view.q.dtype}/{view.k.dtype}/{view.v.dtype}")
        layout = token_layout(self.family, view.n_q, options.get("grid_sizes") or ctx.grid, options,
                              ctx.ref_tokens, c.protect_text)
        return Dense(LAYOUT, layout) if isinstance(layout, str) else layout

    def count_dense(self, reason: Dense) -> None:
        """Count a dense call (host only) and log its reason once."""
        self._step.add_dense(reason.category)
        self.log_once(str(reason), f"dense attention: {reason}")

    def layer_key(self, options: dict) -> str:
        """The call's layer name: ``"double.3"``, or ``"call.N"`` (N-th sparse call of the evaluation)
        for models that report no block index."""
        block = options.get("block_index")
        if block is not None:
            return f"{options.get('block_type', 'block')}.{block}"
        return f"call.{(self.eval or EvalContext()).calls}"

    def run_sparse(self, view: CallView, layout: TokenLayout, options: dict, scale,
                   tokens_major_out: bool = False, rope: torch.Tensor | None = None) -> torch.Tensor:
        """Run the kernel on an eligible call; returns the output in ``view.layout``.
        ``tokens_major_out``: the caller wants (B, N, H*D), so an HND output is written in that memory
        order (its reshape is then a view instead of a copy). ``rope``: ComfyUI's ``pe`` for q and k
        (in ``view.layout``), applied inside the kernel."""
        ctx = self.eval or EvalContext()
        key = self.layer_key(options)
        if self.thresholds is not None:
            kernel_options = self.thresholds.kernel_options(key, view.heads, view.q.device)
        else:
            kernel_options = self.config.kernel_options()
        out, stats = self._kernel_call(view, layout, scale, kernel_options, tokens_major_out, rope)
        ctx.calls += 1
        self.rope_calls += rope is not None
        self._step.add_sparse(key, stats["density"], stats["pv_skipped"])
        self.log_once(f"sparse {view.layout} {view.n_q} {layout.keep_ranges}",
                      f"sparse attention: {view.n_q} tokens, {view.heads} heads x {view.head_dim}, "
                      f"layout {view.layout}, always computed {list(layout.keep_ranges)}, "
                      f"token order {self.config.token_order}"
                      + (", RoPE applied in the kernel" if rope is not None else ""))
        return out

    def tune(self, view: CallView, layout: TokenLayout, kwargs: dict, ref: torch.Tensor,
             skip_output_reshape: bool) -> None:
        """Tune mode: run this evaluation's probe for the call's layer and hand its error against the
        dense output ``ref`` (what the model gets) to the tuner. Counted as a dense call."""
        options = kwargs.get("transformer_options") or {}
        ctx = self.eval or EvalContext()
        key = self.layer_key(options)
        probe = self.tuner.options(key, view.heads, view.head_dim, view.q.device)
        out, stats = self._kernel_call(view, layout, kwargs.get("scale"), probe)
        ctx.calls += 1
        self.tuner.note_grid(ctx.grid)
        self.tuner.observe(key, output_layout(out, view, skip_output_reshape), ref, skip_output_reshape, stats)
        self.count_dense(Dense(TUNING))

    def _kernel_call(self, view: CallView, layout: TokenLayout, scale, kernel_options: dict,
                     tokens_major_out: bool = False, rope: torch.Tensor | None = None):
        """The kernel on q, k, v (in the configured token order); (output in ``view.layout``, stats)."""
        q, k, v = view.q, view.k, view.v
        inverse = None
        if self.config.token_order == "hilbert" and layout.grid is not None:
            perm, inverse = sequence_permutation(tuple(int(g) for g in layout.grid), layout.grid_start,
                                                 view.n_q, q.device)
            q, k, v = (t.index_select(view.token_dim, perm) for t in (q, k, v))
            if rope is not None:
                rope = rope.index_select(view.token_dim, perm)
        extra = {}
        if rope is not None:
            extra["rope"] = rope
        if tokens_major_out and inverse is None and view.layout == "HND":
            b, h, n, d = q.shape
            extra["out"] = torch.empty(b, n, h, d, dtype=q.dtype, device=q.device).transpose(1, 2)
        out, stats = self.kernel.attn(
            q, k, v, layout=view.layout, scale=scale, keep_ranges=list(layout.keep_ranges) or None,
            return_stats=True, pv_dtype=PRECISIONS[self.config.precision], **extra, **kernel_options)
        if inverse is not None:
            out = out.index_select(view.token_dim, inverse)
        return out, stats


class SpargeOverride:
    """The callable placed in ``transformer_options["optimized_attention_override"]``.

    Parameters
    ----------
    state : SpargeState
    previous : callable or None
        The override that was installed before this one; dense calls go to
        ``previous(func, ...)`` when set, else to ``func(...)``.
    """

    def __init__(self, state: SpargeState, previous: Callable | None):
        self.state = state
        self.previous = previous

    def __deepcopy__(self, memo):
        return self

    # torch.compile (ComfyUI's TorchCompileModel) must not trace into this: it would guard on the
    # per-step state and recompile every step, or, with guards filtered, freeze the first step's
    # decisions. Disabled here, every call makes a graph break and runs eagerly, deciding afresh.
    @torch.compiler.disable
    def __call__(self, func, q, k, v, heads, mask=None, attn_precision=None,
                 skip_reshape=False, skip_output_reshape=False, **kwargs):
        state = self.state
        kw = dict(mask=mask, attn_precision=attn_precision, skip_reshape=skip_reshape,
                  skip_output_reshape=skip_output_reshape, **kwargs)

        def dense():
            if self.previous is None:
                return func(q, k, v, heads, **kw)
            state._delegating += 1
            try:
                return self.previous(func, q, k, v, heads, **kw)
            finally:
                state._delegating -= 1

        if state._delegating:
            # Re-entered through an override that was chained below us: the call was decided already.
            return dense()
        rope = state.take_rope(q, k)
        view = view_call(q, k, v, heads, skip_reshape)
        decision = state.decide(view, mask, kwargs)
        if rope is not None and (isinstance(decision, Dense) or state.tuner is not None or view.layout != "HND"):
            q, k = state.rotate(q, k, rope)  # ComfyUI's RoPE, as the block would have applied it
            rope = None
            view = view_call(q, k, v, heads, skip_reshape)
        if isinstance(decision, Dense):
            state.count_dense(decision)
            return dense()
        if state.tuner is not None:
            ref = dense()
            state.tune(view, decision, kwargs, ref, skip_output_reshape)
            return ref
        out = state.run_sparse(view, decision, kwargs.get("transformer_options") or {}, kwargs.get("scale"),
                               tokens_major_out=not skip_output_reshape, rope=rope)
        return output_layout(out, view, skip_output_reshape)


class DeferredRope:
    """``attn1_patch`` of ComfyUI's Flux-family blocks (``comfy.ldm.flux.layers``): takes ``pe`` out of the
    block's attention call, so that the kernel applies it (see the module docstring).

    The block calls it as ``patch(q, k, v, pe=pe, attn_mask=mask, extra_options=options)`` right before
    ``attention(q, k, v, pe=pe, ...)``, which rotates q and k when ``pe`` is not None and then calls the
    attention override. RoPE is deferred only when nothing can come between: this patch is the block's
    last ``attn1_patch`` (a later one may read ``pe`` or replace q/k), there is no mask, and the options'
    override is this state's :class:`SpargeOverride`, or reaches it through overrides that declare that
    they hand every call down unchanged (an attribute ``spargeattn_next`` naming the override they call
    next; the end-to-end benchmark's attention timer does).
    """

    def __init__(self, state: SpargeState):
        self.state = state

    def __deepcopy__(self, memo):
        return self

    # as SpargeOverride.__call__: under TorchCompileModel this runs eagerly (a graph break), so that the
    # hand-over to the override happens on real tensors at every call
    @torch.compiler.disable
    def __call__(self, q, k, v, pe=None, attn_mask=None, extra_options=None, **_):
        state = self.state
        options = extra_options if isinstance(extra_options, dict) else {}
        override = options.get("optimized_attention_override")
        for _ in range(8):  # through pass-through overrides stacked on top of ours
            if isinstance(override, SpargeOverride) or override is None:
                break
            override = getattr(override, "spargeattn_next", None)
        if pe is None or attn_mask is not None or not isinstance(override, SpargeOverride) or override.state is not state:
            return {}
        chain = (options.get("patches") or {}).get("attn1_patch") or ()
        if not chain or chain[-1] is not self:
            state.log_once("rope-not-last", "another attn1_patch runs after SpargeAttn's: RoPE stays in ComfyUI")
            return {}
        if not state.defer_rope(q, k, pe):
            return {}
        return {"pe": None}


def install(state: SpargeState, transformer_options: dict) -> None:
    """Put ``state``'s override on top of whatever override ``transformer_options`` holds.

    Idempotent while ours is on top; otherwise the current override becomes our ``previous``, so a
    node applied later cannot silently switch SpargeAttn off, and its override still runs for every
    call that we leave dense.
    """
    current = transformer_options.get("optimized_attention_override")
    if isinstance(current, SpargeOverride) and current.state is state:
        return
    transformer_options["optimized_attention_override"] = SpargeOverride(state, current)
