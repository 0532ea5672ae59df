"""Per-step sparsity statistics, gathered on the GPU and read back once per step.

During a model evaluation each sparse attention call hands its per-head statistics (device tensors:
``density`` = fraction of Q·Kᵀ blocks computed, ``pv_skipped`` = fraction of computed blocks whose
P·V was skipped) to a :class:`StepAccumulator`, which only keeps references: no host sync happens
per attention call. Dense calls are counted on the host by reason. When the step ends,
:meth:`StepAccumulator.flush` concatenates everything and copies it to the CPU in one transfer,
giving a :class:`StepStats`. A :class:`RunStats` keeps the steps of one sampling run.

``StepStats.as_dict()`` is plain JSON (numbers, strings, lists), ready to be sent to the browser.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch


@dataclass
class LayerStats:
    """Mean per-head statistics of one attention layer over the sparse calls of one step."""

    calls: int
    density: list[float]
    pv_skipped: list[float]


@dataclass
class StepStats:
    """What one model evaluation (one sampler step, usually) did.

    Attributes
    ----------
    index : int
        0-based evaluation index within the run.
    sigma : float or None
        Noise level of the evaluation.
    sparse_calls : int
        Attention calls that ran the sparse kernel.
    dense_calls : dict[str, int]
        Attention calls that stayed dense, by reason.
    layers : dict[str, LayerStats]
        Per layer (``"double.3"``, ``"single.10"``, or ``"call.7"`` when the model reports no
        block index): per-head density and P·V skip fraction.
    """

    index: int
    sigma: float | None
    sparse_calls: int
    dense_calls: dict[str, int]
    layers: dict[str, LayerStats] = field(default_factory=dict)

    @property
    def density(self) -> float | None:
        """Mean fraction of Q·Kᵀ blocks computed over the sparse calls (None without any)."""
        return self._mean("density")

    @property
    def pv_skipped(self) -> float | None:
        """Mean fraction of computed blocks whose P·V was skipped (None without sparse calls)."""
        return self._mean("pv_skipped")

    def _mean(self, name: str) -> float | None:
        total = sum(layer.calls * sum(getattr(layer, name)) / len(getattr(layer, name))
                    for layer in self.layers.values())
        calls = sum(layer.calls for layer in self.layers.values())
        return total / calls if calls else None

    def as_dict(self) -> dict:
        """JSON-ready form (for logs and the browser)."""
        return {
            "index": self.index,
            "sigma": self.sigma,
            "sparse_calls": self.sparse_calls,
            "dense_calls": dict(self.dense_calls),
            "density": self.density,
            "pv_skipped": self.pv_skipped,
            "layers": {k: {"calls": v.calls, "density": v.density, "pv_skipped": v.pv_skipped}
                       for k, v in self.layers.items()},
        }

    def summary_line(self) -> str:
        """One human line, e.g. ``step 3 (sigma 0.812): 40 sparse calls, density 0.52, ...``."""
        sigma = "" if self.sigma is None else f" (sigma {self.sigma:.4g})"
        parts = [f"{self.sparse_calls} sparse calls"]
        if self.density is not None:
            parts.append(f"density {self.density:.3f}, P·V skipped {self.pv_skipped:.3f}")
        if self.dense_calls:
            parts.append("dense: " + ", ".join(f"{n} × {r}" for r, n in sorted(self.dense_calls.items())))
        return f"step {self.index}{sigma}: " + "; ".join(parts)


class StepAccumulator:
    """Collects one step's statistics without synchronising with the GPU."""

    def __init__(self) -> None:
        self._clear()

    def _clear(self) -> None:
        self._keys: list[str] = []
        self._tensors: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._dense: Counter[str] = Counter()

    def __bool__(self) -> bool:
        return bool(self._keys or self._dense)

    def add_sparse(self, layer: str, density: torch.Tensor, pv_skipped: torch.Tensor) -> None:
        """Record a sparse call's per-head device tensors (kept by reference, no copy)."""
        if density.numel() != pv_skipped.numel():
            raise ValueError(f"density has {density.numel()} heads, pv_skipped {pv_skipped.numel()}")
        self._keys.append(layer)
        self._tensors.append((density, pv_skipped))

    def add_dense(self, reason: str) -> None:
        """Count a dense call (host-side)."""
        self._dense[reason] += 1

    def flush(self, index: int, sigma: float | None) -> StepStats:
        """Read everything back with a single device-to-host copy and start afresh."""
        layers: dict[str, LayerStats] = {}
        if self._tensors:
            flat = torch.cat([torch.cat((d.reshape(-1), p.reshape(-1))).float()
                              for d, p in self._tensors]).cpu().tolist()
            offset = 0
            sums: dict[str, list] = {}
            for key, (d, _) in zip(self._keys, self._tensors):
                h = d.numel()
                dens, pv = flat[offset:offset + h], flat[offset + h:offset + 2 * h]
                offset += 2 * h
                entry = sums.setdefault(key, [0, [0.0] * h, [0.0] * h])
                if len(entry[1]) != h:
                    raise ValueError(f"layer {key} reported {h} heads after {len(entry[1])}")
                entry[0] += 1
                entry[1] = [a + b for a, b in zip(entry[1], dens)]
                entry[2] = [a + b for a, b in zip(entry[2], pv)]
            layers = {k: LayerStats(n, [x / n for x in ds], [x / n for x in ps])
                      for k, (n, ds, ps) in sums.items()}
        step = StepStats(index, sigma, len(self._keys), dict(self._dense), layers)
        self._clear()
        return step


@dataclass
class RunStats:
    """The steps of one sampling run, plus totals."""

    steps: list[StepStats] = field(default_factory=list)

    def totals(self) -> dict:
        """Run totals: steps, sparse calls, dense calls by reason, mean density and P·V skip."""
        dense: Counter[str] = Counter()
        for s in self.steps:
            dense.update(s.dense_calls)
        weighted = [(s.sparse_calls, s.density, s.pv_skipped) for s in self.steps if s.density is not None]
        calls = sum(n for n, _, _ in weighted)
        return {
            "steps": len(self.steps),
            "sparse_calls": sum(s.sparse_calls for s in self.steps),
            "dense_calls": dict(dense),
            "density": sum(n * d for n, d, _ in weighted) / calls if calls else None,
            "pv_skipped": sum(n * p for n, _, p in weighted) / calls if calls else None,
        }

    def summary_line(self) -> str:
        """One human line for the end of a run."""
        t = self.totals()
        line = f"{t['steps']} steps, {t['sparse_calls']} sparse attention calls"
        if t["density"] is not None:
            line += f" (mean density {t['density']:.3f}, P·V skipped {t['pv_skipped']:.3f})"
        if t["dense_calls"]:
            line += "; dense: " + ", ".join(f"{n} × {r}" for r, n in sorted(t["dense_calls"].items()))
        return line
