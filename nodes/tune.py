"""Tuning per-layer, per-head thresholds during one ordinary sampling run (no ComfyUI import).

Why the reference takes days
----------------------------
SpargeAttn's ``autotune`` (docs/spargeattn-algorithm.md §6) bisects τ and then λ for every head
separately, for each of 32 θ values, with ~20 kernel calls per (head, θ) on every attention call of
every step. We instead spend **one extra sparse kernel call per attention call**, for all heads at
once (per-head threshold tensors), and advance a search by one probe per model evaluation.

What one tuned call does
------------------------
The model gets the dense output (the override installed before ours, or ComfyUI's backend), so the
generated image is the reference. The same q, k, v also go through the sparse kernel once, with the
probe thresholds of this layer's current search step, and the per-(batch, head) relative L1 error
``Σ|O_sparse − O_dense| / Σ|O_dense|`` is reduced on the GPU (one subtraction and two sums). The
largest error over the evaluation's calls of a layer (cond and uncond, batched or not) is the
evaluation's observation. Cost per tuned call: dense + one sparse call at the probe's density
(about half the blocks on average over the search) + that reduction, a memory-bound pass over two
outputs; the attention part of a step costs roughly 1.5-2x, the rest of the model is unchanged, so
a step stays under the 3x budget (``bench/bench_tune.py`` measures it).

The search: a lattice ladder, one step per model evaluation
-----------------------------------------------------------
Settings are integer levels, sparser as the level grows: stage 1 has 65 levels 0..64 (top-k
``1 − g/64``; τ ``1 − 10^(−3.5 (1 − g/64))``, level 0 = τ 1, level 32 ≈ τ 0.982), stage 2 has 33
levels 0..32 (λ ``33 − g`` in log2 units, level 0 = P·V skip off). Each head keeps a level ``lo``,
its current setting. Evaluation ``n`` of a layer follows :func:`schedule` (``SEARCH1``, ``SEARCH2``,
then ``VERIFY1`` / ``VERIFY2`` in turn forever):

* ``E s`` (explore): probe ``lo + s``; if the error is ``<= EXPLORE_MARGIN · target`` (0.8), ``lo += s``;
* ``V s`` (verify): probe ``lo``; if the error is above ``VERIFY_MARGIN · target`` (0.9) or NaN,
  ``lo −= s`` (not below 0).

The margins leave headroom for calls that tuning never sees: the error of one setting varies from
call to call (about ±10% on the synthetic attention of the tests), and the file is used on other
steps, seeds and prompts.

The steps ``s`` of the schedule only halve (32, 16, 8, ... 1), so ``lo`` is always a multiple of
the current ``s``. Stage 1 (τ or top-k, per head, all on the GPU) comes first: a bisection with
verification that reaches a resolution of one level in 9 evaluations. Stage 2 (λ) follows for 6
evaluations with stage 1 fixed. After these 15 evaluations every further evaluation verifies one
stage in turn, so a harder step or prompt later in the run can only make the setting denser.

Guarantee: a stricter target never gives a sparser result. Tuning returns the dense output, so the
model's trajectory, hence every attention input, is the same whatever the target. Take two runs
with targets ``t1 <= t2`` and a head with ``lo1 <= lo2`` before an evaluation. If ``lo1 == lo2``
both probe the same setting and see the same error: run 1 explores successfully only if run 2 does,
and run 2 backs off only if run 1 does. If ``lo1 < lo2`` then ``lo2 − lo1 >= s`` (both are
multiples of ``s``), so ``lo1 + s <= lo2`` and ``lo2 − s >= lo1``: one step cannot cross. By
induction ``lo1 <= lo2`` after every evaluation, with no assumption on how the error depends on the
setting. The same holds for stage 2 with respect to its target, for a fixed stage-1 result.

Stage 2 is per layer today
--------------------------
The kernel takes ``pv_threshold`` as one float per call, so λ is searched per layer (the layer's
error is its worst head) and the probe's λ must be known on the host: the stage-2 errors of an
evaluation are read back once per evaluation (not per call) and the ladder is updated there. A
head whose error already exceeds the P·V target keeps the skip off for its whole layer. With a
per-head λ tensor in the kernel, stage 2 would run per head on the GPU exactly like stage 1.

θ is not searched: it is the judge that the user sets (``sim_threshold``), stored per head. One
probe per call cannot afford a second search dimension (the reference's 32 θ values are most of its
cost), the measured error already covers what the judge protects on the calls seen, and the
reference's own tuned CogVideoX file shows the judge barely used (median θ −0.94).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

MODES = ("cdf", "topk")
STAGE1_TOP = 64
STAGE2_TOP = 32
#: Fractions of the target that an explore step must stay under to move sparser, and that a verify step
#: must stay under to keep the setting: headroom for the calls that tuning never sees.
EXPLORE_MARGIN = 0.8
VERIFY_MARGIN = 0.9
#: log10 span of 1 − τ over the stage-1 levels (level 64: τ = 0, level 1: 1 − τ ≈ 3.6e-4).
TAU_DECADES = 3.5


class Probe(NamedTuple):
    """One search step: stage (1: τ / top-k, 2: λ), kind ("E" explore, "V" verify) and step in levels."""

    stage: int
    kind: str
    step: int


SEARCH1 = tuple(Probe(1, k, s) for k, s in
                (("E", 32), ("E", 16), ("E", 8), ("V", 8), ("E", 4), ("E", 2), ("V", 2), ("E", 1), ("V", 1)))
SEARCH2 = tuple(Probe(2, k, s) for k, s in (("E", 16), ("E", 8), ("E", 4), ("V", 4), ("E", 2), ("E", 1)))
VERIFY1, VERIFY2 = Probe(1, "V", 1), Probe(2, "V", 1)


def schedule(index: int, stage2: bool) -> Probe:
    """The probe of a layer's ``index``-th tuned evaluation (the same for every target)."""
    search = SEARCH1 + (SEARCH2 if stage2 else ())
    if index < len(search):
        return search[index]
    if not stage2:
        return VERIFY1
    return (VERIFY1, VERIFY2)[(index - len(search)) % 2]


def search_length(stage2: bool) -> int:
    """Evaluations per layer until the search is done and only verification remains."""
    return len(SEARCH1) + (len(SEARCH2) if stage2 else 0)


def probe_level(level, probe: Probe, top: int):
    """The level a probe evaluates: ``lo + s`` for explore (at most ``top``), ``lo`` for verify."""
    if probe.kind == "E":
        return (level + probe.step).clamp(max=top) if isinstance(level, torch.Tensor) else min(level + probe.step, top)
    return level


def ladder_update(level, probe: Probe, top: int, error, target: float):
    """The new level after observing ``error`` at :func:`probe_level` (tensors or Python numbers)."""
    if isinstance(level, torch.Tensor):
        if probe.kind == "E":
            return torch.where(error <= EXPLORE_MARGIN * target, (level + probe.step).clamp(max=top), level)
        return torch.where(error <= VERIFY_MARGIN * target, level, (level - probe.step).clamp(min=0))
    if probe.kind == "E":
        return min(level + probe.step, top) if error <= EXPLORE_MARGIN * target else level
    return level if error <= VERIFY_MARGIN * target else max(level - probe.step, 0)


def topk_of(level: torch.Tensor) -> torch.Tensor:
    """Stage-1 level -> top-k fraction (level 0: 1.0, level 64: 0, i.e. one block per row)."""
    return 1.0 - level.to(torch.float32) / STAGE1_TOP


def tau_of(level: torch.Tensor) -> torch.Tensor:
    """Stage-1 level -> τ: 1 at level 0, then ``1 − 10^(−TAU_DECADES (1 − g/64))`` (log-spaced)."""
    x = level.to(torch.float32) / STAGE1_TOP
    return torch.where(level > 0, 1.0 - torch.pow(10.0, -TAU_DECADES * (1.0 - x)), torch.ones_like(x))


def lambda_of(level: int) -> float:
    """Stage-2 level -> λ in log2 units; 0.0 (P·V skip off) at level 0."""
    return 0.0 if level <= 0 else float(STAGE2_TOP + 1 - level)


def rel_l1_per_head(out: torch.Tensor, ref: torch.Tensor, heads: int, heads_first: bool) -> torch.Tensor:
    """Σ|out − ref| / Σ|ref| per (batch, head), shape (B, H), float32, on the tensors' device (no host sync).

    ``out`` and ``ref``: ComfyUI attention outputs, (B, H, N, D) when ``heads_first`` else (B, N, H·D).
    The difference is taken in the outputs' dtype (one temporary), the sums accumulate in float32.
    """
    if not heads_first:
        out, ref = (t.reshape(t.shape[0], t.shape[1], heads, -1) for t in (out, ref))
    dims = (2, 3) if heads_first else (1, 3)
    num = torch.sub(out, ref).abs_().sum(dim=dims, dtype=torch.float32)
    den = ref.abs().sum(dim=dims, dtype=torch.float32)
    return num / den.clamp_min(1e-30)


@dataclass
class _Layer:
    """Search state of one attention layer. Stage-1 levels and measurements live on the GPU."""

    heads: int
    head_dim: int
    level1: torch.Tensor  # (H,) int64, per head
    density: torch.Tensor  # (H,) measured at the current stage-1 setting (NaN: not yet)
    pv_skipped: torch.Tensor  # (H,) measured at the current stage-2 setting (NaN: not yet)
    level2: int = 0  # per layer (host)
    evals: int = 0
    probe: Probe | None = None  # this evaluation's probe, fixed at its first call
    options: dict | None = None
    probed1: torch.Tensor | None = None
    probed2: int = 0
    error: torch.Tensor | None = None  # (H,) worst error over this evaluation's calls
    dens_sum: torch.Tensor | None = None
    skip_sum: torch.Tensor | None = None
    calls: int = 0


@dataclass
class TuneResult:
    """Per-layer, per-head thresholds (CPU float32 tensors) and what the tuner saw."""

    layers: dict  # layer -> {"cdf_threshold", "sim_threshold", "pv_threshold", "topk", "density", "pv_skipped"}
    heads: int
    head_dim: int
    evaluations: int
    complete: bool = False


class Tuner:
    """Finds per-layer, per-head thresholds from the attention calls of ordinary sampling runs.

    Parameters
    ----------
    mode : "cdf" or "topk"
        Stage 1 searches τ (cdf) or the top-k fraction (topk) per head.
    l1_target : float
        Stage 1: relL1 against the dense output must stay at or below this (e.g. 0.05).
    pv_target : float
        Stage 2 (P·V skip λ) target, larger than ``l1_target`` (e.g. 0.06); 0 skips stage 2.
    sim_threshold : float
        θ, fixed during tuning (see the module docstring) and stored per head.
    on_eval : callable, optional
        Called as ``on_eval(done, total)`` after every tuned model evaluation (progress bar).
    on_call : callable, optional
        Called before every tuned attention call (host only; e.g. raises when the user cancelled).

    Notes
    -----
    The override calls :meth:`options` then :meth:`observe` for every eligible attention call, and
    :meth:`end_eval` once per model evaluation. Nothing here synchronises with the GPU per call;
    :meth:`end_eval` reads the stage-2 errors back once per evaluation.
    """

    def __init__(self, mode: str, l1_target: float, pv_target: float, sim_threshold: float,
                 on_eval: Callable[[int, int], None] | None = None, on_call: Callable[[], None] | None = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not 0.0 < l1_target < 1.0:
            raise ValueError(f"the relL1 target must be in (0, 1), got {l1_target}")
        if pv_target and not l1_target < pv_target < 1.0:
            raise ValueError(f"the P·V target ({pv_target}) must be larger than the relL1 target ({l1_target}) "
                             "and below 1, or 0 to leave the P·V skip off")
        if not -1.0 <= sim_threshold <= 1.0:
            raise ValueError(f"theta (sim_threshold) must be in [-1, 1], got {sim_threshold}")
        self.mode = mode
        self.l1_target = float(l1_target)
        self.pv_target = float(pv_target)
        self.sim_threshold = float(sim_threshold)
        self.on_eval = on_eval
        self.on_call = on_call
        self.layers: dict[str, _Layer] = {}
        self.evaluations = 0
        self.grids: list[tuple[int, int, int]] = []

    @property
    def stage2(self) -> bool:
        return self.pv_target > 0

    # ---- per call ----

    def note_grid(self, grid) -> None:
        """Record a latent grid (T', H', W') seen while tuning (host values, for the file's metadata)."""
        if grid is not None:
            grid = tuple(int(g) for g in grid)
            if grid not in self.grids:
                self.grids.append(grid)

    def options(self, layer: str, heads: int, head_dim: int, device: torch.device) -> dict:
        """``sparge_attn`` keyword arguments of this evaluation's probe for ``layer``."""
        if self.on_call is not None:
            self.on_call()
        st = self.layers.get(layer)
        if st is None:
            nan = torch.full((heads,), math.nan, device=device)
            st = self.layers[layer] = _Layer(heads, head_dim, torch.zeros(heads, dtype=torch.int64, device=device),
                                             nan, nan.clone())
        elif st.heads != heads or st.head_dim != head_dim:
            raise ValueError(f"SpargeAttn Tune: layer {layer} was called with {st.heads} heads x {st.head_dim}, now "
                             f"{heads} x {head_dim}; tune one model per Tune node")
        if st.level1.device != device:
            st.level1, st.density, st.pv_skipped = (t.to(device) for t in (st.level1, st.density, st.pv_skipped))
        if st.options is None:
            st.probe = schedule(st.evals, self.stage2)
            stage1 = st.probe.stage == 1
            st.probed1 = probe_level(st.level1, st.probe, STAGE1_TOP) if stage1 else st.level1
            st.probed2 = 0 if stage1 else probe_level(st.level2, st.probe, STAGE2_TOP)
            st.options = self._kernel_options(st.probed1, st.probed2)
        return st.options

    def _kernel_options(self, level1: torch.Tensor, level2: int) -> dict:
        one = torch.ones(level1.shape, dtype=torch.float32, device=level1.device)
        cdf = self.mode == "cdf"
        lam = lambda_of(level2)
        return {"mode": self.mode, "cdf_threshold": tau_of(level1) if cdf else one,
                "topk": one if cdf else topk_of(level1), "sim_threshold": self.sim_threshold,
                "pv_threshold": lam if lam > 0 else None}

    def observe(self, layer: str, out: torch.Tensor, ref: torch.Tensor, heads_first: bool, stats: dict) -> None:
        """Record one call: its sparse output ``out`` against the dense ``ref`` (same layout), and the
        kernel's per-head statistics."""
        st = self.layers[layer]
        err = rel_l1_per_head(out, ref, st.heads, heads_first).amax(dim=0)
        err = torch.where(torch.isnan(err), torch.full_like(err, math.inf), err)  # NaN counts as a failure
        st.error = err if st.error is None else torch.maximum(st.error, err)
        dens, skip = stats["density"].float(), stats["pv_skipped"].float()
        st.dens_sum = dens if st.dens_sum is None else st.dens_sum + dens
        st.skip_sum = skip if st.skip_sum is None else st.skip_sum + skip
        st.calls += 1

    # ---- per model evaluation ----

    def end_eval(self) -> None:
        """Advance the search of every layer tuned in this evaluation (one host read for stage 2)."""
        touched = [st for st in self.layers.values() if st.calls]
        if not touched:
            return
        stage2 = [st for st in touched if st.probe.stage == 2]
        worst = torch.stack([st.error.max() for st in stage2]).cpu().tolist() if stage2 else []
        errors2 = dict(zip(map(id, stage2), worst))
        for st in touched:
            dens = st.dens_sum / st.calls
            if st.probe.stage == 1:
                new = ladder_update(st.level1, st.probe, STAGE1_TOP, st.error, self.l1_target)
                st.density = torch.where(new == st.probed1, dens,
                                         torch.where(new != st.level1, torch.full_like(dens, math.nan), st.density))
                st.level1 = new
            else:
                st.density = dens  # stage 1 is fixed during stage-2 evaluations
                new = ladder_update(st.level2, st.probe, STAGE2_TOP, errors2[id(st)], self.pv_target)
                if new == st.probed2:
                    st.pv_skipped = st.skip_sum / st.calls
                elif new != st.level2:
                    st.pv_skipped = torch.full_like(dens, math.nan)
                st.level2 = new
            st.evals += 1
            st.probe = st.options = st.probed1 = st.error = st.dens_sum = st.skip_sum = None
            st.calls = 0
        self.evaluations += 1
        if self.on_eval is not None:
            self.on_eval(*self.progress())

    def progress(self) -> tuple[int, int]:
        """(search evaluations done, needed) summed over the layers seen so far."""
        n = search_length(self.stage2)
        return sum(min(st.evals, n) for st in self.layers.values()), n * len(self.layers)

    @property
    def complete(self) -> bool:
        """Every layer seen has finished its search (only verification remains)."""
        n = search_length(self.stage2)
        return bool(self.layers) and all(st.evals >= n for st in self.layers.values())

    # ---- result ----

    def result(self) -> TuneResult:
        """The thresholds found so far, as CPU tensors (one device read)."""
        if not self.layers:
            raise ValueError("SpargeAttn Tune: no attention call was tuned yet; run a sampler with the tuned model "
                             "first (were all calls dense? turn verbose on to see why)")
        packed = torch.cat([torch.cat((st.level1.float(), st.density, st.pv_skipped))
                            for st in self.layers.values()]).cpu()
        first = next(iter(self.layers.values()))
        layers, offset = {}, 0
        for name, st in self.layers.items():
            heads = st.heads
            level1, dens, skip = packed[offset:offset + 3 * heads].view(3, heads)
            offset += 3 * heads
            one = torch.ones(heads)
            level1 = level1.round().to(torch.int64)
            layers[name] = {
                "cdf_threshold": tau_of(level1) if self.mode == "cdf" else one,
                "topk": topk_of(level1) if self.mode == "topk" else one.clone(),
                "sim_threshold": torch.full((heads,), self.sim_threshold),
                "pv_threshold": torch.full((heads,), lambda_of(st.level2)),
                "density": dens.clone(),
                "pv_skipped": skip.clone() if self.stage2 else torch.zeros(heads),
            }
        return TuneResult(layers, first.heads, first.head_dim, self.evaluations, self.complete)
