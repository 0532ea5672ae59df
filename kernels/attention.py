"""The block-sparse attention kernel: INT8 Q.K^T, online softmax in fp32 (exp2 domain), stage-2 P.V
skip, P.V in FP8 e4m3 (or fp16), fp32 accumulation.

One program computes ``BM`` query rows of one head (``BLOCK_Q // BM`` programs share a Q block and its
LUT row). It walks only the kept K blocks, first the ``CNT_FULL`` blocks that need no element mask,
then the rest (key tail, causal diagonal) with masks. Per K block ``j``::

    s   = int32(q8 @ k8_j^T) * (qs_row * ks_j)        # qs folds sm_scale*log2(e): s is in log2 units
    m'  = max(m, rowmax(s))
    skip P.V if max_rows(rowmax(s) - m) <= -pv_threshold           (stage 2, optional)
    p   = exp2(s - (m' - log2(448)))                   # P in [0, 448], the FP8 e4m3 range
    l   = l * exp2(m - m') + rowsum(p)
    acc = acc * exp2(m - m') + fp8(p) @ v8_j          # v8 = V / (amax_c/448), per channel c

and at the end ``out = acc / l * v_scale``. When a block is skipped nothing changes (its row maxima
are below the running maxima, so ``m' = m``) and the skip is counted. A block whose K scale is NaN
(non-finite K) is never skipped, so the NaN reaches every row, as it does in dense attention.
"""

import triton
import triton.language as tl
from triton.language.extra.cuda import libdevice

from .gdc import pdl_start
from .predict import _head_value
from .quant import _to_fp8

NEG_INF = tl.constexpr(float("-inf"))
MAGIC_I = tl.constexpr(0x4B400000)  # bit pattern of 12582912.0 = 1.5 * 2^23
MAGIC_F = tl.constexpr(12582912.0)


@triton.jit
def _load_block(j, offs_n, offs_d, k_base, ks_base, v_base, qs, N_PAD, BN: tl.constexpr, DP: tl.constexpr,
                FP8: tl.constexpr):
    """K tile, V tile (as [BN, DP]) and the per-row score multiplier c = q_scale * k_scale of block j."""
    kn = j * BN + offs_n
    k = tl.load(k_base + kn.to(tl.int64)[:, None] * DP + offs_d[None, :])
    if FP8:
        v = tl.load(v_base + offs_d[None, :].to(tl.int64) * N_PAD + kn[:, None])
    else:
        v = tl.load(v_base + kn.to(tl.int64)[:, None] * DP + offs_d[None, :])
    ks = tl.load(ks_base + j)
    return k, v, ks, qs * ks, kn


@triton.jit
def _scores(q, k):
    """Integer Q.K^T as fp32, without I2F (a quarter-rate instruction, as slow as the exp2):
    |qk| < 127^2 * 256 < 2^22, so adding 1.5 * 2^23 as an integer lands in the float's mantissa."""
    return (tl.dot(q, tl.trans(k)) + MAGIC_I).to(tl.float32, bitcast=True) - MAGIC_F


@triton.jit
def _scale(qk, c, INTERPRET: tl.constexpr):
    """s = qk * c rounded to fp32 (``mul.rn``: never contracted into a later FMA), so that the row
    maximum of s gives exactly exp2(0) even when |s| is so large that fp32 is coarser than 1."""
    if INTERPRET:
        return qk * c[:, None]
    else:
        return libdevice.mul_rn(qk, c[:, None])


@triton.jit
def _probs(s, m_use, p_offset, FP8: tl.constexpr, INTERPRET: tl.constexpr):
    """P = exp2(s - m + log2(448)) in fp32 (for the row sums) and cast for the P.V dot."""
    p = tl.exp2(s - (m_use - p_offset)[:, None])
    if FP8:
        pc = _to_fp8(p, INTERPRET)
    else:
        pc = p.to(tl.float16)
    return p, pc


@triton.jit
def _block(
    acc, l_i, m_i, n_skip, q, qs, j, offs_m, offs_n, offs_d, row_valid,
    k_base, ks_base, v_base, Nk, N_PAD, pv_thr, p_offset,
    BN: tl.constexpr, DP: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
    PV_SKIP: tl.constexpr, FP8: tl.constexpr, INTERPRET: tl.constexpr,
):
    """One K block: scores, online softmax update, stage-2 decision, P.V."""
    k, v, ks, c, kn = _load_block(j, offs_n, offs_d, k_base, ks_base, v_base, qs, N_PAD, BN, DP, FP8)
    s = _scale(_scores(q, k), c, INTERPRET)
    if MASKED:
        vis = kn[None, :] < Nk
        if CAUSAL:
            vis = vis & (kn[None, :] <= offs_m[:, None])
        s = tl.where(vis, s, NEG_INF)
    m_loc = tl.max(s, 1)
    m_new = tl.maximum(m_i, m_loc)
    if PV_SKIP:
        diff = tl.where(m_loc == NEG_INF, NEG_INF, m_loc - m_i)
        diff = tl.where(row_valid, diff, NEG_INF)
        skip = (tl.max(diff, 0) <= -pv_thr) & (ks == ks)
    else:
        skip = False
    if skip:
        n_skip += 1
    else:
        m_use = tl.where(m_new == NEG_INF, 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p, pc = _probs(s, m_use, p_offset, FP8, INTERPRET)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(pc, v, acc * alpha[:, None])
        m_i = m_new
    return acc, l_i, m_i, n_skip


@triton.jit
def _pair(
    acc, l_i, m_i, q, qs, j0, j1, offs_n, offs_d, k_base, ks_base, v_base, N_PAD, p_offset,
    BN: tl.constexpr, DP: tl.constexpr, FP8: tl.constexpr, INTERPRET: tl.constexpr,
):
    """Two unmasked K blocks with one max / rescale step (halves the accumulator rescaling)."""
    k0, v0, ks0, c0, _ = _load_block(j0, offs_n, offs_d, k_base, ks_base, v_base, qs, N_PAD, BN, DP, FP8)
    k1, v1, ks1, c1, _ = _load_block(j1, offs_n, offs_d, k_base, ks_base, v_base, qs, N_PAD, BN, DP, FP8)
    s0 = _scale(_scores(q, k0), c0, INTERPRET)
    s1 = _scale(_scores(q, k1), c1, INTERPRET)
    m_new = tl.maximum(m_i, tl.maximum(tl.max(s0, 1), tl.max(s1, 1)))
    m_use = tl.where(m_new == NEG_INF, 0.0, m_new)
    alpha = tl.exp2(m_i - m_use)
    p0, pc0 = _probs(s0, m_use, p_offset, FP8, INTERPRET)
    p1, pc1 = _probs(s1, m_use, p_offset, FP8, INTERPRET)
    l_i = l_i * alpha + tl.sum(p0, 1) + tl.sum(p1, 1)
    acc = tl.dot(pc0, v0, acc * alpha[:, None])
    acc = tl.dot(pc1, v1, acc)
    return acc, l_i, m_new


@triton.jit
def _entry(lut, it, DENSE: tl.constexpr):
    """The LUT's entry ``it``; with DENSE (every block kept, no LUT) block ``it`` itself."""
    if DENSE:
        return it
    else:
        return tl.load(lut + it)


@triton.jit
def _attn_kernel(
    Q8, QS, K8, KS, V8, VS, LUT, CNT, CNT_FULL, SKIP,
    O, osb, osh, osn, osd,
    H, G, NQB, NKB, Nq, Nk, D, NQ_PAD, NK_PAD, pv_ptr, pv_val, p_offset,
    BQ: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, DP: tl.constexpr,
    CAUSAL: tl.constexpr, PV_SKIP: tl.constexpr, PV_PER_HEAD: tl.constexpr, FP8: tl.constexpr,
    INTERPRET: tl.constexpr, PAIR: tl.constexpr, CLAMP: tl.constexpr, PDL: tl.constexpr = False,
    DENSE: tl.constexpr = False,
):
    pdl_start(PDL)
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    SUB: tl.constexpr = BQ // BM
    i = pid_m // SUB
    b = bh // H
    h = bh % H
    bhk = (b * (H // G) + h // G).to(tl.int64)
    bh64 = bh.to(tl.int64)
    pv_thr = _head_value(pv_ptr, pv_val, h, PV_PER_HEAD)

    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, DP)
    row_valid = offs_m < Nq
    q = tl.load(Q8 + (bh64 * NQ_PAD + offs_m[:, None]) * DP + offs_d[None, :])
    qs = tl.load(QS + bh64 * NQ_PAD + offs_m)
    row = bh64 * NQB + i
    if DENSE:  # every K block in order (LUT, CNT and CNT_FULL are not read): only the last has a key tail
        n_all = NKB
        n_full = Nk // BN
    else:
        n_all = tl.load(CNT + row)
        n_full = tl.load(CNT_FULL + row)
    lut = LUT + row * NKB
    k_base = K8 + bhk * NK_PAD * DP
    ks_base = KS + bhk * NKB
    v_base = V8 + bhk * NK_PAD * DP

    m_i = tl.full([BM], NEG_INF, dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    acc = tl.zeros([BM, DP], dtype=tl.float32)
    n_skip = tl.zeros([], dtype=tl.int32)
    first = 0
    if PAIR and not PV_SKIP:  # stage 2 decides per block, so it walks single blocks
        for it in range(0, n_full // 2):
            j0 = _entry(lut, 2 * it, DENSE)
            j1 = _entry(lut, 2 * it + 1, DENSE)
            acc, l_i, m_i = _pair(acc, l_i, m_i, q, qs, j0, j1, offs_n, offs_d, k_base, ks_base, v_base,
                                  NK_PAD, p_offset, BN, DP, FP8, INTERPRET)
        first = n_full - n_full % 2
    for it in range(first, n_full):
        j = _entry(lut, it, DENSE)
        acc, l_i, m_i, n_skip = _block(
            acc, l_i, m_i, n_skip, q, qs, j, offs_m, offs_n, offs_d, row_valid,
            k_base, ks_base, v_base, Nk, NK_PAD, pv_thr, p_offset,
            BN, DP, False, CAUSAL, PV_SKIP, FP8, INTERPRET,
        )
    for it in range(n_full, n_all):
        j = _entry(lut, it, DENSE)
        acc, l_i, m_i, n_skip = _block(
            acc, l_i, m_i, n_skip, q, qs, j, offs_m, offs_n, offs_d, row_valid,
            k_base, ks_base, v_base, Nk, NK_PAD, pv_thr, p_offset,
            BN, DP, True, CAUSAL, PV_SKIP, FP8, INTERPRET,
        )
    if PV_SKIP:
        tl.store(SKIP + bh64 * (NQB * SUB) + pid_m, n_skip)

    vs = tl.load(VS + bhk * DP + offs_d)
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None] * vs[None, :]
    if CLAMP:
        # fp16 output: P's FP8/fp16 rounding can lift |out| a few % above max|v| (<= 65504); saturate
        # instead of overflowing to inf. NaN fails the comparison and stays NaN.
        out = tl.where(tl.abs(out) > 65504.0, tl.where(out > 0, 65504.0, -65504.0), out)
    optr = O + b.to(tl.int64) * osb + h.to(tl.int64) * osh + offs_m.to(tl.int64)[:, None] * osn + offs_d[None, :] * osd
    tl.store(optr, out.to(O.dtype.element_ty), mask=row_valid[:, None] & (offs_d[None, :] < D))
