"""``sparge_attn`` as a torch custom op (``torch.ops.spargeattn.sparge_attn``).

``torch.compile`` cannot trace the Python that launches our Triton kernels; it sees this op
instead, an opaque node with a fake implementation that gives the output shapes. In eager mode
:func:`kernels.sparge_attn` calls the kernels directly (the dispatcher would add host time to
every call); while Dynamo traces, it routes here by itself, so user code needs no change.

The op returns ``(out, stats)``: ``stats`` is a float32 tensor of shape (4, H) holding density,
pv_skipped, blocks_computed and blocks_total per query head, or of shape (4, 0) when not asked for.
Per-head thresholds travel as optional tensors beside their float value.
"""

from typing import List, Optional, Tuple

import torch

from . import api

OP_NAME = "spargeattn::sparge_attn"
STAT_KEYS = api.STAT_KEYS


def _heads(q: torch.Tensor, layout: str):
    return q.shape[2] if layout == "NHD" else q.shape[1]


def _impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: str,
    scale: Optional[float],
    causal: bool,
    mode: str,
    cdf_threshold: float,
    cdf_per_head: Optional[torch.Tensor],
    sim_threshold: float,
    sim_per_head: Optional[torch.Tensor],
    pv_on: bool,
    pv_threshold: float,
    pv_per_head: Optional[torch.Tensor],
    topk: float,
    topk_per_head: Optional[torch.Tensor],
    keep_ranges: List[int],
    return_stats: bool,
    pv_dtype: str,
    rope: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    ranges = [(keep_ranges[i], keep_ranges[i + 1]) for i in range(0, len(keep_ranges) - 1, 2)]
    res = api._sparge_attn(
        q, k, v, layout=layout, scale=scale, causal=causal, mode=mode,
        cdf_threshold=cdf_threshold if cdf_per_head is None else cdf_per_head,
        sim_threshold=sim_threshold if sim_per_head is None else sim_per_head,
        pv_threshold=(pv_threshold if pv_per_head is None else pv_per_head) if pv_on else None,
        topk=topk if topk_per_head is None else topk_per_head,
        keep_ranges=ranges or None, return_stats=return_stats, pv_dtype=pv_dtype, out=None, rope=rope,
    )
    if not return_stats:
        return res, q.new_empty((4, 0), dtype=torch.float32)
    out, stats = res
    return out, torch.stack([stats[key].to(torch.float32) for key in STAT_KEYS])


def _fake(q, k, v, layout, scale, causal, mode, cdf_threshold, cdf_per_head, sim_threshold, sim_per_head, pv_on,
          pv_threshold, pv_per_head, topk, topk_per_head, keep_ranges, return_stats, pv_dtype, rope=None):
    heads = _heads(q, layout) if return_stats else 0
    return torch.empty_like(q), q.new_empty((4, heads), dtype=torch.float32)


try:
    sparge_attn_op = torch.library.custom_op(OP_NAME, mutates_args=())(_impl)
    sparge_attn_op.register_fake(_fake)
except RuntimeError:  # registered already by a copy of this package imported under another name
    sparge_attn_op = torch.ops.spargeattn.sparge_attn


def _split(value) -> Tuple[float, Optional[torch.Tensor]]:
    if isinstance(value, torch.Tensor):
        return 0.0, value
    return float(value), None


def call(q, k, v, *, layout, scale, causal, mode, cdf_threshold, sim_threshold, pv_threshold, topk, keep_ranges,
         return_stats, pv_dtype, out, rope=None):
    """:func:`kernels.sparge_attn` through the op (what it does while torch.compile traces)."""
    if sim_threshold is None:
        sim_threshold = 0.6 if mode == "cdf" else -0.1
    cdf = _split(cdf_threshold)
    sim = _split(sim_threshold)
    pv = _split(pv_threshold if pv_threshold is not None else 0.0)
    frac = _split(topk)
    ranges = [int(x) for pair in (keep_ranges or ()) for x in pair]
    res, stat = torch.ops.spargeattn.sparge_attn(
        q, k, v, layout, None if scale is None else float(scale), bool(causal), mode,
        cdf[0], cdf[1], sim[0], sim[1], pv_threshold is not None, pv[0], pv[1], frac[0], frac[1],
        ranges, bool(return_stats), pv_dtype, rope,
    )
    if out is not None:
        out.copy_(res)
        res = out
    if not return_stats:
        return res
    return res, {key: stat[i] for i, key in enumerate(STAT_KEYS)}


api._OP_CALL = call
