"""SpargeAttn in plain torch: the specification the Triton kernels are tested against.

Everything here is written for clarity, not speed, and computes in ``float64`` on the CPU and
``float32`` on a GPU (``_work_dtype``). Tests and benchmarks use the same functions:

* :func:`block_stats` - per-block mean (pool) and self-similarity (mean pairwise cosine).
* :func:`predict_block_mask` - the stage-1 block mask (TopCdf / TopK, self-similarity judge,
  causal, ``keep_ranges``), identical in meaning to :func:`kernels.predict_block_mask`.
* :func:`quantize_like_kernel` - the INT8 / FP8 / FP16 rounding the kernel applies.
* :func:`block_sparse_attention` - masked attention; exact (``quant=None``) or an emulation of the
  kernel's online loop with its quantization and the stage-2 P.V skip.
* :func:`dense_attention` - plain attention in high precision (the "truth").
* :func:`metrics` - relative L1, cosine similarity and RMSE.
* :func:`apply_rope` - the rotary embedding that ``sparge_attn(..., rope=)`` applies to q and k.

Tensors here are always ``HND`` = (B, H, N, D); :func:`to_hnd` converts.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

from .config import BLOCK_K, BLOCK_Q, P_SCALE_LOG2, V_FP8_MAX, V_SAMPLE_TARGET, stats_stride

LOG2E = 1.4426950408889634

__all__ = [
    "to_hnd",
    "apply_rope",
    "block_stats",
    "predict_block_mask",
    "pooled_map",
    "causal_block_mask",
    "token_mask",
    "quantize_like_kernel",
    "key_mean",
    "v_scale",
    "block_sparse_attention",
    "dense_attention",
    "metrics",
    "local_qkv",
]


def _work_dtype(device: torch.device) -> torch.dtype:
    return torch.float64 if device.type == "cpu" else torch.float32


def to_hnd(x: torch.Tensor, layout: str) -> torch.Tensor:
    """Return ``x`` as (B, H, N, D) in the working precision."""
    if layout == "NHD":
        x = x.transpose(1, 2)
    elif layout != "HND":
        raise ValueError(f"layout must be 'HND' or 'NHD', got {layout!r}")
    return x.to(_work_dtype(x.device))


def apply_rope(x: torch.Tensor, rope: torch.Tensor, layout: str = "HND") -> torch.Tensor:
    """``x`` (B, H, N, D) or (B, N, H, D) rotated by ``rope`` (B or 1, H or 1, N' >= N, D/2, 2, 2) in the same
    layout: ``x'[2i+r] = F[i, r, 0] * x[2i] + F[i, r, 1] * x[2i+1]``, ComfyUI's formula, in the working
    precision (returned in it, in ``layout``)."""
    n = x.shape[2 if layout == "HND" else 1]
    f = rope[:, :, :n] if layout == "HND" else rope[:, :n]
    w = _work_dtype(x.device)
    pairs = x.to(w).reshape(*x.shape[:-1], -1, 1, 2)
    f = f.to(w)
    return (f[..., 0] * pairs[..., 0] + f[..., 1] * pairs[..., 1]).reshape(x.shape)


def _per_head(value, h: int, like: torch.Tensor) -> torch.Tensor:
    """A threshold (float or length-H tensor) as a length-H tensor in the working precision."""
    t = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    return t.expand(h).clone() if t.dim() == 0 else t.reshape(h)


def _blocks(x: torch.Tensor, blk: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad the token axis to a multiple of ``blk``; return (B, H, nb, blk, D) and the valid-row mask."""
    n = x.shape[2]
    nb = -(-n // blk)
    pad = nb * blk - n
    xp = torch.nn.functional.pad(x, (0, 0, 0, pad))
    valid = torch.arange(nb * blk, device=x.device) < n
    return xp.reshape(x.shape[0], x.shape[1], nb, blk, x.shape[3]), valid.reshape(nb, blk)


def block_stats(x: torch.Tensor, blk: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-block mean token and self-similarity.

    Parameters
    ----------
    x : (B, H, N, D) tensor
    blk : block length in tokens

    Returns
    -------
    pool : (B, H, nb, D) mean of the valid tokens of each block
    sim : (B, H, nb) mean pairwise cosine similarity of the valid tokens, diagonal included,
        ``|sum_i x_i/|x_i||^2 / n^2``; NaN for a block holding a non-finite value (such a block is
        then "not self-similar" and always computed).
    """
    xb, valid = _blocks(x, blk)
    cnt = valid.sum(-1).to(x.dtype)  # (nb,)
    vmask = valid[None, None, :, :, None].to(x.dtype)
    pool = (xb * vmask).sum(-2) / cnt[None, None, :, None]
    sumsq = (xb * xb).sum(-1, keepdim=True)
    xn = xb * torch.rsqrt(torch.clamp(sumsq, min=1e-30)) * vmask
    s = xn.sum(-2)
    sim = (s * s).sum(-1) / (cnt * cnt)[None, None, :]
    finite = torch.isfinite(xb).all(-1).all(-1)
    sim = torch.where(finite, sim, torch.full_like(sim, float("nan")))
    return pool, sim


def causal_block_mask(nq: int, nk: int, n_q: int, device=None) -> torch.Tensor:
    """(nqb, nkb) bool: block (i, j) holds at least one causally visible pair.

    Causal attention here is top-left aligned, as in ``torch.nn.functional.scaled_dot_product_attention``:
    query ``m`` sees keys ``n <= m``.
    """
    i = torch.arange(nq, device=device)[:, None]
    j = torch.arange(nk, device=device)[None, :]
    last_q = torch.clamp((i + 1) * BLOCK_Q, max=n_q) - 1
    return j * BLOCK_K <= last_q


def _diagonal_blocks(nq: int, nk: int, device=None) -> torch.Tensor:
    """(nqb, nkb) bool: K block j overlaps the token range of Q block i (always kept when causal)."""
    i = torch.arange(nq, device=device)[:, None]
    j = torch.arange(nk, device=device)[None, :]
    return (j * BLOCK_K < (i + 1) * BLOCK_Q) & ((j + 1) * BLOCK_K > i * BLOCK_Q)


def _range_blocks(nb: int, blk: int, ranges: Sequence[Tuple[int, int]], device=None) -> torch.Tensor:
    start = torch.arange(nb, device=device) * blk
    hit = torch.zeros(nb, dtype=torch.bool, device=device)
    for a, b in ranges:
        hit |= (start < b) & (start + blk > a)
    return hit


def predict_block_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    layout: str = "HND",
    scale: Optional[float] = None,
    causal: bool = False,
    mode: str = "cdf",
    cdf_threshold=0.98,
    sim_threshold=None,
    topk=0.5,
    keep_ranges: Optional[Sequence[Tuple[int, int]]] = None,
) -> torch.Tensor:
    """Stage-1 block mask, the reference for :func:`kernels.predict_block_mask` (same arguments).

    Steps, per batch, head and Q block ``i`` (all in the working precision):

    1. K is centred by the mean of its sampled tokens (:func:`key_mean`, per batch and KV head); Q and
       centred K are pooled per block and each block's self-similarity is measured (:func:`block_stats`).
    2. ``S[i, j] = pool_q[i] . pool_k[j] * scale``; columns of K blocks that are not self-similar
       (``sim <= sim_threshold`` or NaN) and causally invisible blocks are set to ``-inf``; softmax.
    3. ``mode="cdf"``: keep the largest entries while their cumulative mass stays ``<= cdf_threshold``;
       ``mode="topk"``: keep the ``max(1, floor(topk * n_visible + 1e-4))`` largest logits, where
       ``n_visible`` counts the causally visible K blocks of the row. At least one block is kept.
    4. Always kept: K blocks that are not self-similar, every block of a Q block that is not
       self-similar, rows and columns of blocks that overlap ``keep_ranges``, and (causal) the blocks
       on the diagonal. Causally invisible blocks are never kept.
    """
    if sim_threshold is None:
        sim_threshold = 0.6 if mode == "cdf" else -0.1
    pm = pooled_map(q, k, layout=layout, scale=scale, causal=causal, sim_threshold=sim_threshold,
                    keep_ranges=keep_ranges)
    s, p, cand, visible = pm["logits"], pm["probs"], pm["cand"], pm["visible"]
    h, nkb, dev = s.shape[1], s.shape[3], s.device
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(nkb, device=dev).expand_as(order).contiguous())
    if mode == "cdf":
        cdf = torch.cumsum(torch.gather(p, -1, order), dim=-1)
        tau = _per_head(cdf_threshold, h, p)[None, :, None, None]
        n_keep = (cdf <= tau).sum(-1, keepdim=True)
    elif mode == "topk":
        frac = _per_head(topk, h, p)[None, :, None, None]
        n_vis = visible.sum(-1)[None, None, :, None].to(frac.dtype)
        n_keep = torch.floor(frac * n_vis + 1e-4).to(torch.long)  # 0.9f * 10 -> 9
    else:
        raise ValueError(f"mode must be 'cdf' or 'topk', got {mode!r}")
    n_keep = torch.clamp(n_keep, min=1)
    keep = (rank < n_keep) & cand
    keep = keep | pm["k_forced"][:, :, None, :] | pm["q_forced"][:, :, :, None]
    if causal:
        keep = keep | _diagonal_blocks(s.shape[2], nkb, dev)[None, None]
    return keep & visible[None, None]


def pooled_map(q, k, *, layout="HND", scale=None, causal=False, sim_threshold=0.6, keep_ranges=None) -> dict:
    """The pooled attention map of stage 1, before selection (see :func:`predict_block_mask`).

    Returns a dict: ``logits`` (B, H, nqb, nkb) with non-candidates at -inf, ``probs`` (their
    softmax, 0 off the candidates), ``cand`` (visible and K block self-similar), ``visible``
    (nqb, nkb), ``q_forced`` (B, H, nqb) and ``k_forced`` (B, H, nkb).
    """
    qh, kh = to_hnd(q, layout), to_hnd(k, layout)
    b, h, nq_tok, d = qh.shape
    hk, nk_tok = kh.shape[1], kh.shape[2]
    if h % hk:
        raise ValueError(f"query heads ({h}) must be a multiple of key heads ({hk})")
    g = h // hk
    scale = d**-0.5 if scale is None else float(scale)
    nqb, nkb = -(-nq_tok // BLOCK_Q), -(-nk_tok // BLOCK_K)
    dev = qh.device

    km = key_mean(kh)
    pool_q, sim_q = block_stats(qh, BLOCK_Q)
    pool_k, sim_k = block_stats(kh - km, BLOCK_K)
    pool_k = pool_k.repeat_interleave(g, dim=1)
    sim_k = sim_k.repeat_interleave(g, dim=1)

    theta = _per_head(sim_threshold, h, qh)[None, :, None]
    q_forced = ~(sim_q > theta)  # (B, H, nqb); NaN -> forced
    k_forced = ~(sim_k > theta)  # (B, H, nkb)
    if keep_ranges:
        q_forced = q_forced | _range_blocks(nqb, BLOCK_Q, keep_ranges, dev)
        k_forced = k_forced | _range_blocks(nkb, BLOCK_K, keep_ranges, dev)

    visible = torch.ones(nqb, nkb, dtype=torch.bool, device=dev)
    if causal:
        visible = causal_block_mask(nqb, nkb, nq_tok, dev)

    s = pool_q @ pool_k.transpose(-1, -2) * scale  # (B, H, nqb, nkb)
    cand = visible[None, None] & ~k_forced[:, :, None, :]
    s = torch.where(cand, s, torch.full_like(s, -math.inf))
    has_cand = cand.any(-1, keepdim=True)
    p = torch.softmax(torch.where(has_cand, s, torch.zeros_like(s)), dim=-1)
    p = torch.where(cand, p, torch.zeros_like(p))
    return {"logits": s, "probs": p, "cand": cand, "visible": visible, "q_forced": q_forced, "k_forced": k_forced}


def token_mask(block_mask: torch.Tensor, nq: int, nk: int, causal: bool) -> torch.Tensor:
    """Expand a (B, H, nqb, nkb) block mask to a (B, H, nq, nk) token mask (causal applied)."""
    m = block_mask.repeat_interleave(BLOCK_Q, dim=2)[:, :, :nq]
    m = m.repeat_interleave(BLOCK_K, dim=3)[:, :, :, :nk]
    if causal:
        m = m & torch.ones(nq, nk, dtype=torch.bool, device=m.device).tril()
    return m


def sampled(x: torch.Tensor) -> torch.Tensor:
    """The tokens (dim 2 of an HND tensor) the kernel's statistics read: every ``stats_stride(N)``-th."""
    return x[:, :, :: stats_stride(x.shape[2])]


def key_mean(kh: torch.Tensor) -> torch.Tensor:
    """(B, Hk, 1, D) smoothing vector of K: the mean of its sampled tokens."""
    return sampled(kh).mean(dim=2, keepdim=True)


def v_scale(vh: torch.Tensor) -> torch.Tensor:
    """(B, Hk, 1, D) per-channel V scale: ``max(sampled_amax / V_SAMPLE_TARGET, amax / V_FP8_MAX)``,
    NaN for a channel holding a non-finite value."""
    vs = torch.maximum(_amax(sampled(vh), 2) / V_SAMPLE_TARGET, _amax(vh, 2) / V_FP8_MAX)
    return torch.where(torch.isfinite(vs), vs, torch.full_like(vs, float("nan")))


def _int8(x: torch.Tensor, amax: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Symmetric INT8 rounding (to nearest, ties to even) with scale ``amax/127`` (NaN scale for
    non-finite groups)."""
    scale = amax / 127.0
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    xq = torch.clamp(torch.round(x * inv), -127, 127)
    scale = torch.where(torch.isfinite(amax), scale, torch.full_like(scale, float("nan")))
    return xq, scale


def _amax(x: torch.Tensor, dims) -> torch.Tensor:
    a = x.abs()
    a = torch.where(torch.isfinite(a), a, torch.full_like(a, math.inf))
    return a.amax(dim=dims, keepdim=True)


def quantize_like_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pv: str):
    """Round (HND, working-precision) Q, K, V the way the kernel does.

    Q: INT8, one scale per token. K: centred by its sampled token mean (:func:`key_mean`), INT8, one
    scale per ``BLOCK_K`` tokens. V: ``pv="fp8"`` -> FP8 e4m3 with one scale per channel
    (:func:`v_scale`); ``pv="fp16"`` -> fp16 with the same per-channel scale. Returns dequantized
    tensors ``(q, k, v)`` in the working precision.
    A non-finite value makes its group's scale NaN (token of Q, block of K, channel of V).
    """
    q8, qs = _int8(q, _amax(q, -1))
    kc = k - key_mean(k)
    kb, valid = _blocks(kc, BLOCK_K)
    k8, ks = _int8(kb, _amax(kb, (-1, -2)))
    kq = (k8 * ks).reshape(kb.shape[0], kb.shape[1], -1, kb.shape[-1])[:, :, : k.shape[2]]
    vs = v_scale(v)
    inv = torch.where(vs > 0, 1.0 / vs, torch.zeros_like(vs))
    vn = v * inv
    if pv == "fp8":
        vn = vn.to(torch.float32).to(torch.float8_e4m3fn).to(v.dtype)
    elif pv == "fp16":
        vn = vn.to(torch.float16).to(v.dtype)
    else:
        raise ValueError(f"pv must be 'fp8' or 'fp16', got {pv!r}")
    return q8 * qs, kq, vn * vs


def dense_attention(q, k, v, *, layout="HND", scale=None, causal=False) -> torch.Tensor:
    """Plain softmax attention in the working precision, HND output (GQA by head repetition)."""
    qh, kh, vh = (to_hnd(t, layout) for t in (q, k, v))
    return _masked_exact(qh, kh, vh, None, scale, causal)


def _masked_exact(qh, kh, vh, tok_mask_fn, scale, causal, chunk: int = 4096):
    b, h, nq, d = qh.shape
    g = h // kh.shape[1]
    scale = d**-0.5 if scale is None else float(scale)
    out = torch.empty(b, h, nq, vh.shape[-1], dtype=qh.dtype, device=qh.device)
    tril = None
    for hi in range(h):
        kk, vv = kh[:, hi // g], vh[:, hi // g]
        for r0 in range(0, nq, chunk):
            r1 = min(nq, r0 + chunk)
            s = qh[:, hi, r0:r1] @ kk.transpose(-1, -2) * scale
            allowed = torch.ones_like(s, dtype=torch.bool)
            if causal:
                rows = torch.arange(r0, r1, device=s.device)[:, None]
                tril = torch.arange(kk.shape[1], device=s.device)[None, :] <= rows
                allowed = allowed & tril
            if tok_mask_fn is not None:
                allowed = allowed & tok_mask_fn(hi, r0, r1)
            s = torch.where(allowed, s, torch.full_like(s, -math.inf))
            mx = s.amax(-1, keepdim=True)
            mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
            p = torch.exp(s - mx)
            l = p.sum(-1, keepdim=True)
            o = (p @ vv) / torch.where(l > 0, l, torch.ones_like(l))
            out[:, hi, r0:r1] = o
    return out


def block_sparse_attention(
    q,
    k,
    v,
    block_mask: torch.Tensor,
    *,
    layout: str = "HND",
    scale: Optional[float] = None,
    causal: bool = False,
    pv_threshold: Optional[float] = None,
    quant: Optional[str] = None,
    rows_per_decision: int = BLOCK_Q,
    pair: bool = True,
    sum_rounded_p: bool = False,
):
    """Attention restricted to the kept blocks of ``block_mask``; HND output.

    Parameters
    ----------
    block_mask : (B, H, ceil(Nq/BLOCK_Q), ceil(Nk/BLOCK_K)) bool
    pv_threshold : stage-2 threshold in log2 units, a float or one per head (None: off). A group of
        ``rows_per_decision`` query rows skips P.V of a K block when every row's block maximum is at
        least ``pv_threshold`` below its running maximum.
    quant : None for exact arithmetic; ``"fp8"`` / ``"fp16"`` to emulate the kernel, which walks each
        row's kept blocks in ascending order (the blocks that need no element mask first, two at a
        time when ``pair`` and stage 2 is off; then the rest one by one) with the online softmax in
        log2 units and rounds Q/K (INT8), P and V like the kernel.
    sum_rounded_p : the row sums (the softmax's denominator) add P as rounded for P.V (``quant``'s
        format) instead of P in fp32, as the Hopper kernel's 64-row FP8 programs do (their sums come
        from the tensor cores: ``api._sm90_config``'s ``sum_mma``).

    Returns
    -------
    out : (B, H, Nq, Dv) tensor
    skipped : (B, H, nqb) number of (row group, K block) P.V products skipped, in units of K blocks
        averaged over the row groups of a Q block (0 when ``pv_threshold`` is None).

    Rows whose kept blocks hold no visible key return zeros.
    """
    qh, kh, vh = (to_hnd(t, layout) for t in (q, k, v))
    b, h, nq, d = qh.shape
    nk = kh.shape[2]
    scale = d**-0.5 if scale is None else float(scale)
    g = h // kh.shape[1]
    nqb, nkb = block_mask.shape[2], block_mask.shape[3]
    dev = qh.device
    block_mask = block_mask.to(dev).expand(b, h, nqb, nkb)
    if causal:
        block_mask = block_mask & causal_block_mask(nqb, nkb, nq, dev)
    if quant is None and pv_threshold is None:
        tm = token_mask(block_mask, nq, nk, causal=False)
        out = _masked_exact(qh, kh, vh, lambda hi, r0, r1: tm[:, hi, r0:r1], scale, causal)
        return out, torch.zeros(b, h, nqb, dtype=qh.dtype, device=dev)
    if quant is not None:
        qh, kh, vh = quantize_like_kernel(qh, kh, vh, quant)
    c = scale * LOG2E
    qb, qvalid = _blocks(qh, BLOCK_Q)  # (B, H, nqb, BQ, D)
    kb, _ = _blocks(kh.repeat_interleave(g, dim=1), BLOCK_K)  # (B, H, nkb, BK, D)
    vb, _ = _blocks(vh.repeat_interleave(g, dim=1), BLOCK_K)
    rows = torch.arange(nqb, device=dev)[:, None] * BLOCK_Q + torch.arange(BLOCK_Q, device=dev)  # (nqb, BQ)

    # The LUT: each row's kept blocks in ascending order; the first n_full need no element mask.
    cols = torch.arange(nkb, device=dev)
    need_mask = (cols * BLOCK_K + BLOCK_K > nk)[None, :].expand(nqb, nkb)
    if causal:
        need_mask = need_mask | (cols[None, :] * BLOCK_K + BLOCK_K - 1 > torch.arange(nqb, device=dev)[:, None] * BLOCK_Q)
    key = torch.where(block_mask, cols.expand_as(block_mask), torch.full_like(block_mask, nkb, dtype=torch.long))
    lut = torch.sort(key, dim=-1).values  # (B, H, nqb, nkb); padding = nkb
    cnt = block_mask.sum(-1)
    n_full = (block_mask & ~need_mask[None, None]).sum(-1)

    m = torch.full(qb.shape[:-1], -math.inf, dtype=qh.dtype, device=dev)
    l = torch.zeros_like(m)
    acc = torch.zeros(*qb.shape[:-1], vh.shape[-1], dtype=qh.dtype, device=dev)
    groups = BLOCK_Q // rows_per_decision
    skipped = torch.zeros(b, h, nqb, groups, dtype=qh.dtype, device=dev)
    bi = torch.arange(b, device=dev)[:, None, None]
    hi = torch.arange(h, device=dev)[None, :, None]

    def gather(t):
        """K, V blocks and key indices of LUT column t for every row: (B, H, nqb, BK, ...)."""
        j = lut[..., t].clamp(max=nkb - 1)
        kidx = j[..., None] * BLOCK_K + torch.arange(BLOCK_K, device=dev)
        return kb[bi, hi, j], vb[bi, hi, j], kidx

    def round_p(p):
        if quant == "fp8":
            return p.to(torch.float32).to(torch.float8_e4m3fn).to(p.dtype)
        if quant == "fp16":
            return p.to(torch.float16).to(p.dtype)
        return p

    def psum(p):
        """A block's row sums of P (fp32 P, or the rounded P that P.V takes)."""
        return (round_p(p) if sum_rounded_p else p).sum(-1)

    def scores(kk, kidx, masked):
        s = torch.einsum("bhird,bhikd->bhirk", qb, kk) * c
        if masked:
            vis = kidx[..., None, :] < nk
            if causal:
                vis = vis & (kidx[..., None, :] <= rows[None, None, :, :, None])
            s = torch.where(vis, s, torch.full_like(s, -math.inf))
        return s

    def safe(mx):
        return torch.where(torch.isinf(mx) & (mx < 0), torch.zeros_like(mx), mx)

    start = torch.zeros_like(cnt)
    if pair and pv_threshold is None:
        npairs = n_full // 2
        for t in range(int(npairs.max()) if npairs.numel() else 0):
            act = (t < npairs)[..., None]  # (B, H, nqb, 1)
            k0, v0, i0 = gather(2 * t)
            k1, v1, i1 = gather(2 * t + 1)
            s0, s1 = scores(k0, i0, False), scores(k1, i1, False)
            m_new = torch.maximum(m, torch.maximum(s0.amax(-1), s1.amax(-1)))
            mu = safe(m_new)
            alpha = torch.exp2(m - mu)
            p0 = torch.exp2(s0 - mu[..., None] + P_SCALE_LOG2)
            p1 = torch.exp2(s1 - mu[..., None] + P_SCALE_LOG2)
            l_new = l * alpha + psum(p0) + psum(p1)
            acc_new = (acc * alpha[..., None] + torch.einsum("bhirk,bhikd->bhird", round_p(p0), v0)
                       + torch.einsum("bhirk,bhikd->bhird", round_p(p1), v1))
            l, m = torch.where(act, l_new, l), torch.where(act, m_new, m)
            acc = torch.where(act[..., None], acc_new, acc)
        start = 2 * npairs
    for t in range(int(cnt.max()) if cnt.numel() else 0):
        act = ((t >= start) & (t < cnt))[..., None]
        kk, vv, kidx = gather(t)
        s = scores(kk, kidx, True)
        m_loc = s.amax(-1)
        m_new = torch.maximum(m, m_loc)
        upd = act.expand_as(m)
        if pv_threshold is not None:
            # A row with nothing visible in this block never objects to the skip; a row that has
            # seen nothing yet (m = -inf) always objects.
            diff = torch.where(torch.isinf(m_loc) & (m_loc < 0), torch.full_like(m, -math.inf), m_loc - m)
            diff = torch.where(qvalid[None, None], diff, torch.full_like(m, -math.inf))
            dg = diff.reshape(b, h, nqb, groups, rows_per_decision).amax(-1)
            thr = torch.as_tensor(pv_threshold, dtype=dg.dtype, device=dev).reshape(-1)
            thr = thr.expand(h) if thr.numel() == 1 else thr
            skip = (dg <= -thr[None, :, None, None]) & act
            skipped += skip.to(skipped.dtype)
            upd = upd & ~skip.repeat_interleave(rows_per_decision, dim=-1)
        mu = safe(m_new)
        p = torch.exp2(s - mu[..., None] + P_SCALE_LOG2)
        alpha = torch.exp2(m - mu)
        l_new = l * alpha + psum(p)
        acc_new = acc * alpha[..., None] + torch.einsum("bhirk,bhikd->bhird", round_p(p), vv)
        l = torch.where(upd, l_new, l)
        acc = torch.where(upd[..., None], acc_new, acc)
        m = torch.where(upd, m_new, m)
    out = acc / torch.where(l > 0, l, torch.ones_like(l))[..., None]
    out = out.reshape(b, h, nqb * BLOCK_Q, -1)[:, :, :nq]
    return out, skipped.mean(-1)


def metrics(out: torch.Tensor, ref: torch.Tensor) -> dict:
    """Relative L1 (sum|o-r| / sum|r|), cosine similarity and RMSE, as Python floats."""
    o = out.detach().to(torch.float64).flatten()
    r = ref.detach().to(torch.float64).flatten()
    rel_l1 = ((o - r).abs().sum() / r.abs().sum().clamp_min(1e-30)).item()
    cos = torch.nn.functional.cosine_similarity(o, r, dim=0, eps=1e-30).item()
    rmse = torch.sqrt(torch.mean((o - r) ** 2)).item()
    return {"rel_l1": rel_l1, "cos": cos, "rmse": rmse}


def local_qkv(
    b: int,
    h: int,
    n: int,
    d: int,
    *,
    grid: Optional[Tuple[int, int, int]] = None,
    sharpness: float = 10.0,
    noise: float = 0.3,
    dtype: torch.dtype = torch.float32,
    device=None,
    generator: Optional[torch.Generator] = None,
    hk: Optional[int] = None,
):
    """Synthetic Q, K, V (HND) with local, diffusion-like attention.

    Tokens sit on a 1-D line or, with ``grid=(T, H, W)`` (``T*H*W == n``), on a row-major 3-D grid.
    Q and K are random Fourier features of the position, so ``q_i . k_j / sqrt(d)`` falls off like
    a Gaussian of the distance with a peak of about ``sharpness``; each head gets its own reach
    (from 2% to 30% of the extent), plus gaussian ``noise``. V is standard normal. With ``hk`` the
    K/V have ``hk`` heads (GQA).
    """
    hk = h if hk is None else hk
    dev = torch.device("cpu") if device is None else torch.device(device)
    # Small draws (frequencies, phases) come from ``generator`` on the CPU; the large noise tensors
    # too when a generator is given (reproducible), else they are drawn directly on ``device``.
    big_dev = torch.device("cpu") if generator is not None else dev

    def noise_draw(*shape):
        return torch.randn(*shape, generator=generator, device=big_dev).to(dev)

    if grid is None:
        pos = torch.arange(n, dtype=torch.float32, device=dev)[:, None]
        extent = float(n)
    else:
        t, gh, gw = grid
        if t * gh * gw != n:
            raise ValueError(f"grid {grid} has {t * gh * gw} tokens, not {n}")
        tt, yy, xx = torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij")
        pos = torch.stack([tt, yy, xx], -1).reshape(n, 3).to(device=dev, dtype=torch.float32)
        extent = float(max(grid))
    half = d // 2
    amp = math.sqrt(sharpness * math.sqrt(d))
    reach = extent * torch.logspace(math.log10(0.02), math.log10(0.3), max(h, 1))
    f = torch.zeros(b, h, n, d, device=dev, dtype=torch.float32)
    for hi in range(h):
        w = (torch.randn(half, pos.shape[1], generator=generator) / reach[hi]).to(dev)
        phase = (torch.rand(half, generator=generator) * 2 * math.pi).to(dev)
        arg = pos @ w.T + phase
        f[:, hi, :, : 2 * half] = torch.cat([torch.cos(arg), torch.sin(arg)], -1) * (amp / math.sqrt(half))
    q = f + noise * noise_draw(b, h, n, d)
    g = h // hk
    k = f[:, ::g] + noise * noise_draw(b, hk, n, d)
    del f
    v = noise_draw(b, hk, n, d)
    return tuple(x.to(device=dev, dtype=dtype).contiguous() for x in (q, k, v))
