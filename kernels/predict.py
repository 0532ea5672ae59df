"""Stage 1, part 2: the pooled attention map and the per-row block selection.

* :func:`_scores_kernel` computes ``S = pool_q @ pool_k^T * scale`` in fp32 in tiles (on a GPU as
  three TF32 products, "tf32x3", accurate to about fp32; plain fp32 in the interpreter).
* :func:`_select_kernel` handles one row ``i`` (a Q block) of one head: softmax over the candidate
  K blocks, TopCdf or TopK by bisection on the float bit patterns (no sort), the blocks that are
  always kept, and the result written as an index list (LUT) with its length. The LUT is sorted, and
  the blocks that need element masks (the key tail and, when causal, the diagonal) come last, so
  ``CNT_FULL`` entries can be processed without masking.

Selection of row ``i`` (see ``reference.predict_block_mask`` for the same in plain torch):
    candidates = visible & K block self-similar
    cdf : keep the largest p while their total mass <= tau   (at least the argmax)
    topk: keep the max(1, floor(topk * n_visible)) largest logits
    keep |= K block not self-similar | Q block not self-similar | keep_ranges | diagonal (causal)
    keep &= visible
"""

import triton
import triton.language as tl

from .gdc import pdl_start

NEG_INF = tl.constexpr(float("-inf"))


@triton.jit
def _scores_kernel(
    PQ, PK, S, H, G, NQB, NKB, scale,
    DP: tl.constexpr, TM: tl.constexpr, TN: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr = False,
):
    """S[bh, i, j] = pool_q[bh, i] . pool_k[b*HK + h//G, j] * scale for a TM x TN tile."""
    pdl_start(PDL)
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    bh = tl.program_id(2)
    hk_idx = (bh // H) * (H // G) + (bh % H) // G
    ri = pid_m * TM + tl.arange(0, TM)
    rj = pid_n * TN + tl.arange(0, TN)
    cols = tl.arange(0, DP)
    pq = tl.load(PQ + (bh.to(tl.int64) * NQB + ri[:, None]) * DP + cols[None, :], mask=ri[:, None] < NQB, other=0.0)
    pk = tl.load(PK + (hk_idx.to(tl.int64) * NKB + rj[:, None]) * DP + cols[None, :], mask=rj[:, None] < NKB, other=0.0)
    s = tl.dot(pq, tl.trans(pk), input_precision=PRECISION) * scale
    out = S + (bh.to(tl.int64) * NQB + ri[:, None]) * NKB + rj[None, :]
    tl.store(out, s, mask=(ri[:, None] < NQB) & (rj[None, :] < NKB))


@triton.jit
def _head_value(PTR, val, h, PER_HEAD: tl.constexpr):
    if PER_HEAD:
        return tl.load(PTR + h).to(tl.float32)
    else:
        return val


@triton.jit
def _in_ranges(start, length, r0a, r0b, r1a, r1b, r2a, r2b, r3a, r3b):
    """Blocks [start, start+length) overlapping any of four token ranges [a, b)."""
    end = start + length
    hit = (start < r0b) & (end > r0a)
    hit = hit | ((start < r1b) & (end > r1a))
    hit = hit | ((start < r2b) & (end > r2a))
    hit = hit | ((start < r3b) & (end > r3a))
    return hit


@triton.jit
def _orderable(x):
    """int32 key with the same order as the float32 ``x`` (-inf smallest, NaN not expected)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _select_kernel(
    S, QSIM, KSIM, MASK_IN, msb, msh, msi, msj,
    LUT, CNT, CNT_FULL, MASK_OUT,
    H, G, NQB, NKB, Nq, Nk,
    tau_ptr, tau_val, theta_ptr, theta_val, topk_ptr, topk_val,
    r0a, r0b, r1a, r1b, r2a, r2b, r3a, r3b,
    NKB_P2: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr,
    MODE: tl.constexpr,  # 0: from MASK_IN, 1: cdf, 2: topk
    CAUSAL: tl.constexpr, WRITE_MASK: tl.constexpr,
    TAU_PER_HEAD: tl.constexpr, THETA_PER_HEAD: tl.constexpr, TOPK_PER_HEAD: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pdl_start(PDL)
    i = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk_idx = b * (H // G) + h // G
    cols = tl.arange(0, NKB_P2)
    valid = cols < NKB
    visible = valid
    if CAUSAL:
        last_q = tl.minimum((i + 1) * BQ, Nq) - 1
        visible = visible & (cols * BK <= last_q)

    if MODE == 0:
        mrow = MASK_IN + b.to(tl.int64) * msb + h.to(tl.int64) * msh + i.to(tl.int64) * msi
        keep = tl.load(mrow + cols * msj, mask=valid, other=0) != 0
    else:
        theta = _head_value(theta_ptr, theta_val, h, THETA_PER_HEAD)
        ksim = tl.load(KSIM + hk_idx.to(tl.int64) * NKB + cols, mask=valid, other=0.0)
        k_forced = ~(ksim > theta)  # NaN (non-finite block) -> forced
        k_forced = k_forced | _in_ranges(cols * BK, BK, r0a, r0b, r1a, r1b, r2a, r2b, r3a, r3b)
        qsim = tl.load(QSIM + bh.to(tl.int64) * NQB + i)
        q_forced = ~(qsim > theta)
        q_forced = q_forced | _in_ranges(i * BQ, BQ, r0a, r0b, r1a, r1b, r2a, r2b, r3a, r3b)

        cand = visible & ~k_forced
        s = tl.load(S + (bh.to(tl.int64) * NQB + i) * NKB + cols, mask=valid, other=NEG_INF)
        s = tl.where(cand, s, NEG_INF)
        smax = tl.max(s, 0)
        if MODE == 1:
            tau = _head_value(tau_ptr, tau_val, h, TAU_PER_HEAD)
            p = tl.where(cand, tl.exp(s - tl.where(smax == NEG_INF, 0.0, smax)), 0.0)
            p = p / tl.maximum(tl.sum(p, 0), 1e-30)
            pbits = p.to(tl.int32, bitcast=True)
            # smallest t with mass(p >= t) <= tau, searched over the bit patterns of p >= 0
            lo = tl.full([], 0, tl.int32)
            hi = tl.full([], 0x7F800000, tl.int32)
            for _ in range(31):
                mid = lo + (hi - lo) // 2
                mass = tl.sum(tl.where(pbits >= mid, p, 0.0), 0)
                ok = mass <= tau
                hi = tl.where(ok, mid, hi)
                lo = tl.where(ok, lo, mid + 1)
            sel = cand & ((pbits >= hi) | (s == smax))
        else:
            frac = _head_value(topk_ptr, topk_val, h, TOPK_PER_HEAD)
            n_vis = tl.sum(visible.to(tl.int32), 0)
            n_keep = tl.maximum(tl.floor(frac * n_vis.to(tl.float32) + 1e-4).to(tl.int32), 1)
            key = tl.where(cand, _orderable(s), -2147483648).to(tl.int64)
            # largest t with count(key >= t) >= n_keep
            lo = tl.full([], -2147483648, tl.int64)
            hi = tl.full([], 2147483647, tl.int64)
            for _ in range(32):
                mid = lo + (hi - lo + 1) // 2
                cnt = tl.sum((key >= mid).to(tl.int32), 0)
                ok = cnt >= n_keep
                lo = tl.where(ok, mid, lo)
                hi = tl.where(ok, hi, mid - 1)
            sel = cand & (key >= lo)
        keep = tl.where(q_forced, True, sel | k_forced)  # (scalar | tensor breaks the interpreter)
        if CAUSAL:
            keep = keep | ((cols * BK < (i + 1) * BQ) & ((cols + 1) * BK > i * BQ))
    keep = keep & visible

    row = bh.to(tl.int64) * NQB + i
    if WRITE_MASK:
        tl.store(MASK_OUT + row * NKB + cols, keep, mask=valid)
    pos = tl.cumsum(keep.to(tl.int32), 0) - 1
    tl.store(LUT + row * NKB + pos, cols, mask=keep)
    need_mask = (cols * BK + BK > Nk)
    if CAUSAL:
        need_mask = need_mask | (cols * BK + BK - 1 > i * BQ)
    tl.store(CNT + row, tl.sum(keep.to(tl.int32), 0))
    tl.store(CNT_FULL + row, tl.sum((keep & ~need_mask).to(tl.int32), 0))


@triton.jit
def _stats_kernel(CNT, SKIP, OUT, B, H, NQB, NPROG, total, sub, HAS_SKIP: tl.constexpr, BLK: tl.constexpr,
                  PDL: tl.constexpr = False, DENSE: tl.constexpr = False):
    """Per query head ``h`` (one program each), from the LUT lengths ``CNT`` (B*H rows of NQB) and the
    per-program P.V skip counts ``SKIP`` (B*H rows of NPROG): OUT[0, h] density = computed / total,
    OUT[1, h] fraction of computed blocks whose P.V was skipped, OUT[2, h] blocks computed, OUT[3, h]
    blocks total (``total``: visible blocks of one head over the batch). DENSE: every block was computed
    (no LUT; ``CNT`` is not read)."""
    pdl_start(PDL)
    h = tl.program_id(0)
    offs = tl.arange(0, BLK)
    acc = tl.zeros([BLK], tl.int32)
    skipped = tl.zeros([BLK], tl.int32)
    for b in range(B):
        row = (b * H + h).to(tl.int64)
        if not DENSE:
            for start in range(0, NQB, BLK):
                acc += tl.load(CNT + row * NQB + start + offs, mask=start + offs < NQB, other=0)
        if HAS_SKIP:
            for start in range(0, NPROG, BLK):
                skipped += tl.load(SKIP + row * NPROG + start + offs, mask=start + offs < NPROG, other=0)
    if DENSE:
        computed = total + tl.sum(acc, 0).to(tl.float32)  # acc stays 0
    else:
        computed = tl.sum(acc, 0).to(tl.float32)
    tl.store(OUT + h, tl.math.div_rn(computed, total))
    if HAS_SKIP:
        frac = tl.math.div_rn(tl.math.div_rn(tl.sum(skipped, 0).to(tl.float32), sub), tl.maximum(computed, 1.0))
        tl.store(OUT + H + h, frac)
    else:
        tl.store(OUT + H + h, 0.0)
    tl.store(OUT + 2 * H + h, computed)
    tl.store(OUT + 3 * H + h, total)
