"""Stage 1, part 1: one fused pass over Q and one over K, plus the V preparation.

* :func:`_colstats_kernel` reads the sampled tokens of K and V (every ``config.stats_stride(N)``-th,
  ~512 of them) and writes per-chunk column sums of K (for the token mean used to smooth K) and
  per-chunk column |max| of V (for the per-channel V scale). The consumers reduce the few chunk rows
  themselves, so no extra launch is needed. It also zeroes the per-head overflow record of V.
* :func:`_qk_prep_kernel` handles one block of Q (``BLOCK_Q`` rows) or of K (``BLOCK_K`` rows):
  mean token (pool), self-similarity (mean pairwise cosine, computed as ``|sum_i x_i/|x_i||^2/n^2``)
  and INT8 quantization. Q gets one scale per token with ``sm_scale*log2(e)`` folded in (scales are
  floored at 1e-18 so that they stay positive); K is
  centred by its (sampled) token mean and gets one scale per block.
* :func:`_v_prep_kernel` divides V by its per-channel scale ``sampled_amax/V_SAMPLE_TARGET`` and casts
  it to FP8 e4m3 stored transposed (D, N) for the FP8 dot, or to fp16 stored (N, D). A block holding a
  value above ``V_FP8_MAX`` times that scale records its channel |max| (atomic max per head);
  :func:`_v_fix_kernel` then requantizes those heads with ``max(scale, amax/V_FP8_MAX)`` and exits at
  once for the others.

A non-finite input value turns the scale of its group (Q token, K block, V channel) into NaN and the
block's self-similarity into NaN, so that it cannot disappear silently (see ``api.sparge_attn``).
All buffers written here are padded (tokens to whole blocks, channels to ``DP``) and fully written,
padding included, so the attention kernel loads them without masks.
"""

import triton
import triton.language as tl

from .gdc import pdl_start

INF = tl.constexpr(float("inf"))
#: Floor of the stored Q/K scales: an all-zero group keeps a positive scale (and q_scale * k_scale
#: stays a normal fp32), so that the attention kernel's ``-inf * scale`` stays ``-inf`` for masked
#: keys. The group's int8 values are 0 anyway.
TINY = tl.constexpr(1e-18)


@triton.jit
def _load_tile(X, sb, sh, sn, sd, b, h, rows, cols, N, D, EVEN_D: tl.constexpr):
    """fp32 tile x[b, h, rows, cols] of a strided (B, H, N, D) tensor; zero outside N x D.

    With EVEN_D (D == the tile width) there is no column mask, so rows load as wide vectors."""
    base = X + b.to(tl.int64) * sb + h.to(tl.int64) * sh
    ptrs = base + rows.to(tl.int64)[:, None] * sn + cols[None, :] * sd
    if EVEN_D:
        mask = (rows[:, None] < N) & (cols[None, :] >= 0)
    else:
        mask = (rows[:, None] < N) & (cols[None, :] < D)
    return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32), mask


@triton.jit
def _rope_table_kernel(
    F, fsb, fsh, fsn, T, BAD, tsb, tsh, bsb, bsh, HF, N, D,
    DP: tl.constexpr, RT: tl.constexpr, PDL: tl.constexpr = False,
):
    """The compact form of the rotations ``F`` (see :func:`_rope`) for the preparation: per token the cosines
    ``F[i, 0, 0]`` at ``T[r, i]`` and the sines ``F[i, 1, 0]`` at ``T[r, DP/2 + i]`` in fp16 (2 bytes per
    channel instead of F's 8, which every head would read again; fp16 rounds them by at most 2^-12, below
    the INT8 rounding that follows), and ``BAD[r]`` = 1 when some matrix of the token is not of the form
    [[cos, -sin], [sin, cos]] with entries in [-1, 1]; pieces holding such a token are rotated from ``F``
    itself. Program (i, j): tokens ``i*RT ..`` of (batch, head) ``j`` of F's broadcast shape (``HF`` heads)."""
    pdl_start(PDL)
    bh = tl.program_id(1)
    b = bh // HF
    h = bh % HF
    rows = tl.program_id(0) * RT + tl.arange(0, RT)
    c4 = tl.arange(0, 2 * DP)
    src = F + b.to(tl.int64) * fsb + h.to(tl.int64) * fsh + rows.to(tl.int64)[:, None] * fsn + c4[None, :]
    f = tl.load(src, mask=(rows[:, None] < N) & (c4[None, :] < 2 * D), other=0.0).to(tl.float32)
    ac, bd = tl.split(tl.reshape(f, [RT, DP // 2, 2, 2]))  # [..., r] with j = 0 and j = 1
    a, c = tl.split(ac)
    bb, d = tl.split(bd)
    ok = (a == d) & (bb == -c) & (tl.abs(a) <= 1.0) & (tl.abs(c) <= 1.0)
    bad = tl.max(tl.where(ok, 0, 1), 1)
    pair = tl.arange(0, DP // 2)
    dst = T + b.to(tl.int64) * tsb + h.to(tl.int64) * tsh + rows.to(tl.int64)[:, None] * DP + pair[None, :]
    tl.store(dst, a.to(tl.float16), mask=rows[:, None] < N)
    tl.store(dst + DP // 2, c.to(tl.float16), mask=rows[:, None] < N)
    tl.store(BAD + b.to(tl.int64) * bsb + h.to(tl.int64) * bsh + rows, bad.to(tl.int8), mask=rows < N)


@triton.jit
def _rope(x, F, fsb, fsh, fsn, T, BAD, tsb, tsh, bsb, bsh, b, h, rows, N, D, R: tl.constexpr, DP: tl.constexpr):
    """Rotary position embedding of the fp32 tile ``x`` ([R, DP], tokens ``rows``; from :func:`_load_tile`):
    ``out[2i+r] = F[i, r, 0] * x[2i] + F[i, r, 1] * x[2i+1]`` with ``F`` the token's (D/2, 2, 2) matrices
    (ComfyUI's ``pe`` / ``freqs_cis`` format; the token's 2*D values contiguous), any float dtype.

    The channel pairs are split off the tile in registers (no second load of x). The matrices come from the fp16 cos/sin table ``T`` of
    :func:`_rope_table_kernel`, or from ``F`` for a piece holding a token that ``BAD`` marks. Padded
    channels (c >= D) and tokens (>= N) come out 0."""
    xe, xo = tl.split(tl.reshape(x, [R, DP // 2, 2]))
    pair = tl.arange(0, DP // 2)
    m = (rows[:, None] < N) & (pair[None, :] < D // 2)
    bad = tl.load(BAD + b.to(tl.int64) * bsb + h.to(tl.int64) * bsh + rows, mask=rows < N, other=0)
    if tl.max(bad.to(tl.int32), 0) == 0:
        tbase = T + b.to(tl.int64) * tsb + h.to(tl.int64) * tsh + rows.to(tl.int64)[:, None] * DP + pair[None, :]
        cs = tl.load(tbase, mask=m, other=0.0).to(tl.float32)
        sn = tl.load(tbase + DP // 2, mask=m, other=0.0).to(tl.float32)
        oe = cs * xe - sn * xo
        oo = sn * xe + cs * xo
    else:
        fbase = F + b.to(tl.int64) * fsb + h.to(tl.int64) * fsh + rows.to(tl.int64)[:, None] * fsn + 4 * pair[None, :]
        oe = (tl.load(fbase, mask=m, other=0.0).to(tl.float32) * xe
              + tl.load(fbase + 1, mask=m, other=0.0).to(tl.float32) * xo)
        oo = (tl.load(fbase + 2, mask=m, other=0.0).to(tl.float32) * xe
              + tl.load(fbase + 3, mask=m, other=0.0).to(tl.float32) * xo)
    return tl.reshape(tl.join(oe, oo), [R, DP])


@triton.jit
def _max_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _amax(x, axis: tl.constexpr, INTERPRET: tl.constexpr):
    """max |x| along ``axis`` (all axes for None), +inf (the marker for 'non-finite') where a NaN or an inf
    took part. Compiled: one NaN-propagating max per element (FMNMX.NAN, |x| an operand modifier) and the
    NaN test on the reduced values; mapping NaN to inf per element first took three instructions per element
    (bench/NOTES.md #47). The interpreter (INTERPRET) runs a ``tl.reduce`` with a combine function element by
    element in Python, so there the same values come from the per-element mapping and its ``tl.max``."""
    if INTERPRET:
        a = tl.abs(x)
        return tl.max(tl.where(a == a, a, INF), axis)
    else:
        m = tl.reduce(tl.abs(x), axis, _max_nan)
        return tl.where(m == m, m, INF)


@triton.jit
def _colstats_kernel(
    K, ksb, ksh, ksn, ksd,
    V, vsb, vsh, vsn, vsd,
    KSUM, VMAX, VFIX,
    HK, N, D, STRIDE, NS, NCHUNK,
    F, fsb, fsh, fsn, T, BAD, tsb, tsh, bsb, bsh,
    DP: tl.constexpr, R: tl.constexpr, EVEN_D: tl.constexpr, ROPE: tl.constexpr = False, RS: tl.constexpr = 8,
    INTERPRET: tl.constexpr = False, PDL: tl.constexpr = False,
):
    """Per (b*HK + hk, chunk): column sums of K and column |max| of V over the chunk's ``R`` sampled
    tokens (sample i is token ``i*STRIDE``, i < NS). Chunk 0 zeroes ``VFIX[bh, :DP]``. With ROPE the
    sampled K rows are rotated first (:func:`_rope`, ``RS`` rows at a time), as the K blocks will be."""
    pdl_start(PDL)
    bh = tl.program_id(0)
    c = tl.program_id(1)
    b = bh // HK
    hk = bh % HK
    cols = tl.arange(0, DP)
    i = c * R + tl.arange(0, R)
    rows = tl.where(i < NS, i * STRIDE, N)  # N: masked off by _load_tile
    if ROPE:  # in pieces of RS rows (the rotation needs ~4 live values per element)
        ksum = tl.zeros([DP], dtype=tl.float32)
        for t in range(0, R // RS):
            j = c * R + t * RS + tl.arange(0, RS)
            rk = tl.where(j < NS, j * STRIDE, N)
            kx, _ = _load_tile(K, ksb, ksh, ksn, ksd, b, hk, rk, cols, N, D, EVEN_D)
            ksum += tl.sum(_rope(kx, F, fsb, fsh, fsn, T, BAD, tsb, tsh, bsb, bsh, b, hk, rk, N, D, RS, DP), 0)
    else:
        kx, _ = _load_tile(K, ksb, ksh, ksn, ksd, b, hk, rows, cols, N, D, EVEN_D)
        ksum = tl.sum(kx, 0)
    vx, _ = _load_tile(V, vsb, vsh, vsn, vsd, b, hk, rows, cols, N, D, EVEN_D)
    out = (bh.to(tl.int64) * NCHUNK + c) * DP + cols
    tl.store(KSUM + out, ksum)
    tl.store(VMAX + out, _amax(vx, 0, INTERPRET))
    if c == 0:
        tl.store(VFIX + bh.to(tl.int64) * DP + cols, tl.zeros([DP], dtype=tl.float32))


@triton.jit
def _chunk_parts(PARTS, bh, NCHUNK, cols, DP: tl.constexpr, NCHUNK_P2: tl.constexpr):
    """The ``[NCHUNK_P2, DP]`` per-chunk partials of head ``bh`` written by :func:`_colstats_kernel`
    (rows past ``NCHUNK`` are 0), for the consumer to reduce."""
    ch = tl.arange(0, NCHUNK_P2)
    return tl.load(PARTS + (bh.to(tl.int64) * NCHUNK + ch[:, None]) * DP + cols[None, :],
                   mask=ch[:, None] < NCHUNK, other=0.0)


@triton.jit
def _fp8_exact(x):
    """Round x to the nearest FP8 e4m3 value (ties to even, saturating at 448), in fp32 arithmetic.

    Used only under the Triton interpreter, whose float8e4nv cast mis-rounds values just below a
    power of two and flushes subnormals; the cast of an exactly representable value is right there.
    """
    a = tl.abs(x)
    e = ((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    spacing = tl.exp2((tl.maximum(e, -6) - 3).to(tl.float32))
    y = a / spacing
    r = tl.floor(y + 0.5)
    r = tl.where((r - y == 0.5) & (r % 2 == 1), r - 1, r)
    r = tl.minimum(r * spacing, 448.0)
    return tl.where(x < 0, -r, r)


@triton.jit
def _to_fp8(x, INTERPRET: tl.constexpr):
    if INTERPRET:
        x = _fp8_exact(x)
    return x.to(tl.float8e4nv)


@triton.jit
def _to_int8(y):
    """Round |y| <= 127 to the nearest integer (ties to even) and return int8, without the
    quarter-rate F2I/FRND instructions: adding 1.5 * 2^23 rounds y into the fp32 mantissa, whose low
    byte is then round(y) in two's complement (bits 0x4B400000 + round(y)). No clamp: |y| <= 127 holds
    for every finite group (y = x * 127 / amax); a non-finite group stores arbitrary values under its NaN
    scale, and one whose scale is subnormal (1/scale = inf) stores 0 (the low byte of inf and NaN)."""
    return (y + 12582912.0).to(tl.int32, bitcast=True).to(tl.int8)


@triton.jit
def _inv_scale(amax):
    """(amax/127, its reciprocal or 0 for an all-zero group): the INT8 scale and its multiplier."""
    scale = amax / 127.0
    return scale, tl.where(scale > 0, 1.0 / scale, 0.0)


@triton.jit
def _stored_scale(scale, amax, mult):
    """The scale as stored for the attention: times ``mult``, floored at TINY, NaN for a non-finite group."""
    return tl.where(amax == INF, float("nan"), tl.maximum(scale * mult, TINY))


@triton.jit
def _store_int8(X8, bh, N_PAD, DP: tl.constexpr, rows, cols, y):
    """Round the scaled rows ``y`` to INT8 and store them at ``X8[bh, rows, :DP]``."""
    tl.store(X8 + (bh.to(tl.int64) * N_PAD + rows[:, None]) * DP + cols[None, :], _to_int8(y))


@triton.jit
def _centred_tile(X, sb, sh, sn, sd, b, h, rows, cols, N, D, mean, CENTER: tl.constexpr, EVEN_D: tl.constexpr,
                  F, fsb, fsh, fsn, T, BAD, tsb, tsh, bsb, bsh, ROPE: tl.constexpr, R: tl.constexpr,
                  DP: tl.constexpr):
    x, valid = _load_tile(X, sb, sh, sn, sd, b, h, rows, cols, N, D, EVEN_D)
    if ROPE:
        x = _rope(x, F, fsb, fsh, fsn, T, BAD, tsb, tsh, bsb, bsh, b, h, rows, N, D, R, DP)
    if CENTER:
        x = tl.where(valid, x - mean[None, :], 0.0)
    return x


@triton.jit
def _qk_block(
    X, sb, sh, sn, sd,
    KSUM, X8, XS, POOL, SIM, blk, bh,
    HX, N, D, N_PAD, NB, mult, NCHUNK, NS,
    F, fsb, fsh, fsn, T, BAD, tsb, tsh, bsb, bsh,
    BLK: tl.constexpr, DP: tl.constexpr, NCHUNK_P2: tl.constexpr,
    CENTER: tl.constexpr, PER_TOKEN: tl.constexpr, EVEN_D: tl.constexpr, SUB: tl.constexpr, ROPE: tl.constexpr,
    INTERPRET: tl.constexpr, STATS: tl.constexpr = True,
):
    """Pool, self-similarity and INT8 quantization of block ``blk`` of head ``bh`` of X (Q or K).

    Writes ``X8[bh, rows, :DP]`` (int8, padded rows and channels are 0), the scale ``XS`` (per token
    ``[bh, N_PAD]`` if PER_TOKEN else per block ``[bh, NB]``, multiplied by ``mult``), ``POOL[bh, blk, :DP]``
    and ``SIM[bh, blk]``. With ROPE the rows are rotated (:func:`_rope`) as they are loaded, so
    everything here sees rotated tokens. With CENTER the mean of the ``NS`` sampled tokens (from the ``KSUM`` chunk sums)
    is subtracted first. Without STATS (calls that select nothing: nothing reads them) ``POOL`` and ``SIM`` are
    neither computed nor written: ~4 of the ~10 instructions per element of this issue-bound loop.

    The block is streamed in ``SUB``-row pieces (few registers per program, so many programs per SM
    overlap their loads with the arithmetic). A per-block scale (not PER_TOKEN) needs the block's
    |max| first: then the pieces are read a second time (from cache) to quantize them.
    """
    b = bh // HX
    h = bh % HX
    cols = tl.arange(0, DP)
    mean = tl.zeros([DP], dtype=tl.float32)
    if CENTER:
        mean = tl.sum(_chunk_parts(KSUM, bh, NCHUNK, cols, DP, NCHUNK_P2), 0) / NS
    n_valid = tl.minimum(N - blk * BLK, BLK).to(tl.float32)

    # Pool and self-similarity; any non-finite value makes the similarity NaN. INT8 with scale
    # amax/127, rounding to nearest (ties to even); a non-finite group stores arbitrary int8 values
    # and a NaN scale.
    xsum = tl.zeros([DP], dtype=tl.float32)
    sdir = tl.zeros([DP], dtype=tl.float32)
    amax_blk = tl.zeros([], dtype=tl.float32)
    for t in range(0, BLK // SUB):
        rows = blk * BLK + t * SUB + tl.arange(0, SUB)
        x = _centred_tile(X, sb, sh, sn, sd, b, h, rows, cols, N, D, mean, CENTER, EVEN_D,
                           F, fsb, fsh, fsn, T, BAD, tsb, tsh, bsb, bsh, ROPE, SUB, DP)
        amax = _amax(x, 1, INTERPRET)
        amax_blk = tl.maximum(amax_blk, tl.max(amax, 0))
        if STATS:
            xsum += tl.sum(x, 0)
            sumsq = tl.sum(x * x, 1)
            sdir += tl.sum(x * tl.rsqrt(tl.maximum(sumsq, 1e-30))[:, None], 0)
        if PER_TOKEN:
            scale, inv = _inv_scale(amax)
            _store_int8(X8, bh, N_PAD, DP, rows, cols, x * inv[:, None])
            tl.store(XS + bh.to(tl.int64) * N_PAD + rows, _stored_scale(scale, amax, mult))
        elif SUB == BLK:  # one piece: its |max| is the block's, no second read
            _, inv = _inv_scale(amax_blk)
            _store_int8(X8, bh, N_PAD, DP, rows, cols, x * inv)
    if STATS:
        sim = tl.sum(sdir * sdir, 0) / (n_valid * n_valid)
        sim = tl.where(amax_blk == INF, float("nan"), sim)
        tl.store(POOL + (bh.to(tl.int64) * NB + blk) * DP + cols, xsum / n_valid)
        tl.store(SIM + bh.to(tl.int64) * NB + blk, sim)
    if not PER_TOKEN:
        scale, inv = _inv_scale(amax_blk)
        if SUB < BLK:
            for t in range(0, BLK // SUB):
                rows = blk * BLK + t * SUB + tl.arange(0, SUB)
                x = _centred_tile(X, sb, sh, sn, sd, b, h, rows, cols, N, D, mean, CENTER, EVEN_D,
                           F, fsb, fsh, fsn, T, BAD, tsb, tsh, bsb, bsh, ROPE, SUB, DP)
                _store_int8(X8, bh, N_PAD, DP, rows, cols, x * inv)
        tl.store(XS + bh.to(tl.int64) * NB + blk, _stored_scale(scale, amax_blk, mult))


@triton.jit
def _qk_prep_kernel(
    Q, qsb, qsh, qsn, qsd, Q8, QS, POOL_Q, SIM_Q, H, NQ, NQ_PAD, NQB, q_mult,
    K, ksb, ksh, ksn, ksd, K8, KS, POOL_K, SIM_K, HK, NK, NK_PAD, NKB,
    KSUM, D, NCHUNK, NS, Q_PROGRAMS, K_PROGRAMS,
    V, vsb, vsh, vsn, vsd, VMAX, VFIX, V8, VS, vmax_target, v_limit,
    F, fsb, fsh, fsn, T, BAD, tsb, tsh, bsb, bsh,
    BQ: tl.constexpr, BK: tl.constexpr, DP: tl.constexpr, NCHUNK_P2: tl.constexpr, EVEN_D: tl.constexpr,
    SUB_Q: tl.constexpr, SUB_K: tl.constexpr, HAS_V: tl.constexpr = False, SUB_V: tl.constexpr = 32,
    FP8: tl.constexpr = True, INTERPRET: tl.constexpr = False, SM90_ORDER: tl.constexpr = False,
    ROPE: tl.constexpr = False, PDL: tl.constexpr = False, STATS: tl.constexpr = True,
):
    """One launch for the Q, K (and with HAS_V the V) blocks: programs ``0 .. Q_PROGRAMS-1`` take Q block
    ``pid % NQB`` of head ``pid // NQB`` (:func:`_qk_block`, one INT8 scale per token, ``q_mult`` folded
    in); the next ``K_PROGRAMS`` the K blocks in the same order (centred by the sampled token mean, one
    scale per block); the rest the V blocks (:func:`_v_prep_one`, in pieces of ``SUB_V`` rows).
    One launch instead of three: the later kinds fill the SMs while the last programs of the earlier run.
    With ROPE, Q and K are rotated by ``F`` (strides ``fsb``, ``fsh``, ``fsn`` per batch, head and token)
    as they are read; V is not. Without STATS no pool or self-similarity is computed (:func:`_qk_block`)."""
    pdl_start(PDL)
    pid = tl.program_id(0)
    if pid < Q_PROGRAMS:
        _qk_block(Q, qsb, qsh, qsn, qsd, KSUM, Q8, QS, POOL_Q, SIM_Q, pid % NQB, pid // NQB,
                  H, NQ, D, NQ_PAD, NQB, q_mult, NCHUNK, NS, F, fsb, fsh, fsn, T, BAD, tsb, tsh, bsb, bsh,
                  BQ, DP, NCHUNK_P2, False, True, EVEN_D, SUB_Q, ROPE, INTERPRET, STATS)
    elif pid < Q_PROGRAMS + K_PROGRAMS:
        pk = pid - Q_PROGRAMS
        _qk_block(K, ksb, ksh, ksn, ksd, KSUM, K8, KS, POOL_K, SIM_K, pk % NKB, pk // NKB,
                  HK, NK, D, NK_PAD, NKB, 1.0, NCHUNK, NS, F, fsb, fsh, fsn, T, BAD, tsb, tsh, bsb, bsh,
                  BK, DP, NCHUNK_P2, True, False, EVEN_D, SUB_K, ROPE, INTERPRET, STATS)
    else:
        if HAS_V:
            pv = pid - Q_PROGRAMS - K_PROGRAMS
            _v_prep_one(V, vsb, vsh, vsn, vsd, VMAX, VFIX, V8, VS, pv % NKB, pv // NKB,
                        HK, NK, D, NK_PAD, vmax_target, v_limit, NCHUNK,
                        BK, DP, NCHUNK_P2, FP8, INTERPRET, EVEN_D, SM90_ORDER, SUB_V)


@triton.jit
def sm90_token_source(p):
    """The token at position ``p`` of the FP8 V of the Hopper kernel (``attention_sm90._as_operand``),
    which stores token c of each 32 (bits c0..c4) at position c0 + 2*c3 + 4*c1 + 8*c2 + 16*c4: bits
    p0..p4 of a position are the token bits c0, c3, c1, c2, c4."""
    c = p & 31
    return (p - c) | (c & 1) | (((c >> 2) & 3) << 1) | (((c >> 1) & 1) << 3) | (c & 16)


@triton.jit
def _v_sample_amax(VMAX, bh, NCHUNK, cols, DP: tl.constexpr, NCHUNK_P2: tl.constexpr):
    """Per-channel |max| of the sampled tokens of head ``bh`` (+inf for a non-finite channel)."""
    return tl.max(_chunk_parts(VMAX, bh, NCHUNK, cols, DP, NCHUNK_P2), 0)


@triton.jit
def _v_block(
    V, sb, sh, sn, sd, VOUT, b, h, bh, blk, N, D, N_PAD, inv, lim, cols,
    BLK: tl.constexpr, DP: tl.constexpr, FP8: tl.constexpr, INTERPRET: tl.constexpr, EVEN_D: tl.constexpr,
    SM90_ORDER: tl.constexpr, SUB: tl.constexpr,
):
    """Scale block ``blk`` of V by ``inv`` per channel, cast and store it, in pieces of ``SUB`` rows (a
    multiple of 32 with SM90_ORDER). Returns 1 when every scaled value satisfies ``|x * inv| <= lim``
    (NaN never does), else 0.

    SM90_ORDER loads the block's rows in the permuted order (:func:`sm90_token_source`, which permutes
    within groups of 32) and stores them in plain order: the same bytes as permuting the store, without
    a 64-bit address per stored byte."""
    top = tl.zeros([], dtype=tl.float32)
    for t in range(0, BLK // SUB):
        p = t * SUB + tl.arange(0, SUB)
        if FP8 and SM90_ORDER:
            rows = blk * BLK + sm90_token_source(p)
        else:
            rows = blk * BLK + p
        x, _ = _load_tile(V, sb, sh, sn, sd, b, h, rows, cols, N, D, EVEN_D)
        xs = x * inv[None, :]
        # against a scalar limit: a per-channel one would take DP more registers per thread in the
        # layout of the transposed store (one token, all channels per thread)
        top = tl.maximum(top, _amax(xs, None, INTERPRET))
        xs = tl.where(xs == xs, xs, 0.0)
        if FP8:  # (DP, N_PAD) per head: 32-bit offsets inside the head (DP * N_PAD < 2^31)
            base = VOUT + bh.to(tl.int64) * DP * N_PAD + blk * BLK
            tl.store(base + cols[None, :] * N_PAD + p[:, None], _to_fp8(xs, INTERPRET))
        else:
            base = VOUT + (bh.to(tl.int64) * N_PAD + blk * BLK) * DP
            tl.store(base + p[:, None] * DP + cols[None, :], xs.to(tl.float16))
    return (top <= lim).to(tl.int32)  # NaN: top = inf


@triton.jit
def _v_inv(scale):
    """1/scale; 1e30 for a zero scale (a channel whose sampled tokens are all 0: any other nonzero value
    of it then fails the ``_v_block`` test), 0 for an infinite one (non-finite samples)."""
    return tl.where(scale > 0, tl.where(scale < INF, 1.0 / scale, 0.0), 1e30)


@triton.jit
def _v_prep_one(
    V, sb, sh, sn, sd, VMAX, VFIX, VOUT, VS, blk, bh,
    HK, N, D, N_PAD, vmax_target, v_limit, NCHUNK,
    BLK: tl.constexpr, DP: tl.constexpr, NCHUNK_P2: tl.constexpr,
    FP8: tl.constexpr, INTERPRET: tl.constexpr, EVEN_D: tl.constexpr, SM90_ORDER: tl.constexpr, SUB: tl.constexpr,
):
    """Scale block ``blk`` of V head ``bh`` by ``1/(sampled_amax_c/vmax_target)`` per channel and cast it.

    FP8: ``VOUT[bh, :DP, N_PAD]`` float8e4nv (transposed: tokens contiguous). Else ``VOUT[bh, N_PAD, :DP]``
    fp16. ``VS[bh, :DP]`` receives the per-channel scale (NaN for a channel holding a non-finite value).
    SM90_ORDER: the tokens of each block are stored in the order the Hopper kernel's P.V operand
    expects (:func:`sm90_token_source`). A channel whose |max| in this block exceeds ``v_limit`` times
    its scale (or is non-finite) records that |max| in ``VFIX[bh, c]`` (atomic max) for ``_v_fix_kernel``.
    """
    b = bh // HK
    h = bh % HK
    cols = tl.arange(0, DP)
    amax = _v_sample_amax(VMAX, bh, NCHUNK, cols, DP, NCHUNK_P2)
    scale = amax / vmax_target
    fits = _v_block(V, sb, sh, sn, sd, VOUT, b, h, bh, blk, N, D, N_PAD, _v_inv(scale), v_limit, cols,
                    BLK, DP, FP8, INTERPRET, EVEN_D, SM90_ORDER, SUB)
    if fits == 0:  # rare: some value over (NaN, or nonzero under a zero scale, count as over)
        bmax = tl.zeros([DP], dtype=tl.float32)
        for t in range(0, BLK // 16):  # in pieces: this branch sets the register budget of the kernel
            rows = blk * BLK + t * 16 + tl.arange(0, 16)
            x, _ = _load_tile(V, sb, sh, sn, sd, b, h, rows, cols, N, D, EVEN_D)
            bmax = tl.maximum(bmax, _amax(x, 0, INTERPRET))
        tl.atomic_max(VFIX + bh.to(tl.int64) * DP + cols, bmax, mask=~(bmax <= v_limit * scale), sem="relaxed")
    if blk == 0:
        tl.store(VS + bh.to(tl.int64) * DP + cols, tl.where(amax == INF, float("nan"), scale))


@triton.jit
def _v_prep_kernel(
    V, sb, sh, sn, sd,
    VMAX, VFIX, VOUT, VS,
    HK, N, D, N_PAD, vmax_target, v_limit, NCHUNK,
    BLK: tl.constexpr, DP: tl.constexpr, NCHUNK_P2: tl.constexpr,
    FP8: tl.constexpr, INTERPRET: tl.constexpr, EVEN_D: tl.constexpr, SM90_ORDER: tl.constexpr = False,
    PDL: tl.constexpr = False,
):
    """:func:`_v_prep_one` for block ``program_id(0)`` of head ``program_id(1)`` (calls with more V blocks
    than ``api.FUSE_V_MAX``; fewer go into :func:`_qk_prep_kernel`)."""
    pdl_start(PDL)
    _v_prep_one(V, sb, sh, sn, sd, VMAX, VFIX, VOUT, VS, tl.program_id(0), tl.program_id(1),
                HK, N, D, N_PAD, vmax_target, v_limit, NCHUNK,
                BLK, DP, NCHUNK_P2, FP8, INTERPRET, EVEN_D, SM90_ORDER, BLK)


@triton.jit
def _v_fix_kernel(
    V, sb, sh, sn, sd,
    VMAX, VFIX, VOUT, VS,
    HK, N, D, N_PAD, NB, vmax_target, v_limit, NCHUNK,
    BLK: tl.constexpr, DP: tl.constexpr, NCHUNK_P2: tl.constexpr,
    FP8: tl.constexpr, INTERPRET: tl.constexpr, EVEN_D: tl.constexpr, SM90_ORDER: tl.constexpr = False,
    PDL: tl.constexpr = False,
):
    """Heads whose V overflowed its sampled scale somewhere (``VFIX[bh] != 0``): requantize every block
    with the scale ``max(sampled_amax/vmax_target, VFIX/v_limit)`` (blocks ``program_id(1)``,
    ``+ num_programs(1)``, ...). Other heads' programs only read ``VFIX[bh]``."""
    pdl_start(PDL)
    bh = tl.program_id(0)
    g = tl.program_id(1)
    cols = tl.arange(0, DP)
    fix = tl.load(VFIX + bh.to(tl.int64) * DP + cols)
    if tl.max(fix, 0) > 0:
        b = bh // HK
        h = bh % HK
        amax = _v_sample_amax(VMAX, bh, NCHUNK, cols, DP, NCHUNK_P2)
        scale = tl.maximum(amax / vmax_target, fix / v_limit)
        inv = _v_inv(scale)
        for blk in range(g, NB, tl.num_programs(1)):
            _v_block(V, sb, sh, sn, sd, VOUT, b, h, bh, blk, N, D, N_PAD, inv, v_limit, cols,
                     BLK, DP, FP8, INTERPRET, EVEN_D, SM90_ORDER, BLK)
        if g == 0:
            bad = (amax == INF) | (fix == INF)
            tl.store(VS + bh.to(tl.int64) * DP + cols, tl.where(bad, float("nan"), scale))
