"""Stage 1, part 1: one fused pass over Q and one over K, plus the V preparation.

* :func:`_colstats_kernel` reads K and V once in chunks of tokens and writes per-chunk column sums
  of K (for the token mean used to smooth K) and per-chunk column |max| of V (for the per-channel
  V scale). The consumers reduce the few chunk rows themselves, so no extra launch is needed.
* :func:`_qk_prep_kernel` handles one block of Q (``BLOCK_Q`` rows) or of K (``BLOCK_K`` rows):
  mean token (pool), self-similarity (mean pairwise cosine, computed as ``|sum_i x_i/|x_i||^2/n^2``)
  and INT8 quantization. Q gets one scale per token with ``sm_scale*log2(e)`` folded in (scales are
  floored at 1e-18 so that they stay positive); K is
  centred by its token mean and gets one scale per block.
* :func:`_v_prep_kernel` divides V by its per-channel scale ``amax/448`` and casts it to FP8 e4m3
  stored transposed (D, N) for the FP8 dot, or to fp16 stored (N, D).

A non-finite input value turns the scale of its group (Q token, K block, V channel) into NaN and the
block's self-similarity into NaN, so that it cannot disappear silently (see ``api.sparge_attn``).
All buffers written here are padded (tokens to whole blocks, channels to ``DP``) and fully written,
padding included, so the attention kernel loads them without masks.
"""

import triton
import triton.language as tl

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
def _abs_nonfinite_inf(x):
    """|x| with NaN and +-inf mapped to +inf (the marker for 'non-finite')."""
    a = tl.abs(x)
    return tl.where(a == a, a, INF)


@triton.jit
def _colstats_kernel(
    K, ksb, ksh, ksn, ksd,
    V, vsb, vsh, vsn, vsd,
    KSUM, VMAX,
    HK, N, D, rows_per_chunk, NCHUNK,
    DP: tl.constexpr, R: tl.constexpr, EVEN_D: tl.constexpr,
):
    """Per (b*HK + hk, chunk): column sums of K and column |max| of V over the chunk's tokens."""
    bh = tl.program_id(0)
    c = tl.program_id(1)
    b = bh // HK
    hk = bh % HK
    cols = tl.arange(0, DP)
    ksum = tl.zeros([DP], dtype=tl.float32)
    vmax = tl.zeros([DP], dtype=tl.float32)
    for t in range(0, rows_per_chunk // R):
        rows = c * rows_per_chunk + t * R + tl.arange(0, R)
        kx, _ = _load_tile(K, ksb, ksh, ksn, ksd, b, hk, rows, cols, N, D, EVEN_D)
        vx, _ = _load_tile(V, vsb, vsh, vsn, vsd, b, hk, rows, cols, N, D, EVEN_D)
        ksum += tl.sum(kx, 0)
        vmax = tl.maximum(vmax, tl.max(_abs_nonfinite_inf(vx), 0))
    out = (bh.to(tl.int64) * NCHUNK + c) * DP + cols
    tl.store(KSUM + out, ksum)
    tl.store(VMAX + out, vmax)


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
    quarter-rate F2I/FRND instructions: adding 1.5 * 2^23 rounds y into the fp32 mantissa."""
    k = (y + 12582912.0).to(tl.int32, bitcast=True) - 0x4B400000
    return tl.minimum(tl.maximum(k, -127), 127).to(tl.int8)


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
def _centred_tile(X, sb, sh, sn, sd, b, h, rows, cols, N, D, mean, CENTER: tl.constexpr, EVEN_D: tl.constexpr):
    x, valid = _load_tile(X, sb, sh, sn, sd, b, h, rows, cols, N, D, EVEN_D)
    if CENTER:
        x = tl.where(valid, x - mean[None, :], 0.0)
    return x


@triton.jit
def _qk_prep_kernel(
    X, sb, sh, sn, sd,
    KSUM, X8, XS, POOL, SIM,
    HX, N, D, N_PAD, NB, mult, NCHUNK,
    BLK: tl.constexpr, DP: tl.constexpr, NCHUNK_P2: tl.constexpr,
    CENTER: tl.constexpr, PER_TOKEN: tl.constexpr, EVEN_D: tl.constexpr, SUB: tl.constexpr,
):
    """Pool, self-similarity and INT8 quantization of block ``program_id(0)`` of head ``program_id(1)``.

    Writes ``X8[bh, rows, :DP]`` (int8, padded rows and channels are 0), the scale ``XS`` (per token
    ``[bh, N_PAD]`` if PER_TOKEN else per block ``[bh, NB]``, multiplied by ``mult``), ``POOL[bh, blk, :DP]``
    and ``SIM[bh, blk]``. With CENTER the token mean (from the ``KSUM`` chunk sums) is subtracted first.

    The block is streamed in ``SUB``-row pieces (few registers per program, so many programs per SM
    overlap their loads with the arithmetic). A per-block scale (not PER_TOKEN) needs the block's
    |max| first: then the pieces are read a second time (from cache) to quantize them.
    """
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HX
    h = bh % HX
    cols = tl.arange(0, DP)
    mean = tl.zeros([DP], dtype=tl.float32)
    if CENTER:
        ch = tl.arange(0, NCHUNK_P2)
        parts = tl.load(
            KSUM + (bh.to(tl.int64) * NCHUNK + ch[:, None]) * DP + cols[None, :],
            mask=ch[:, None] < NCHUNK, other=0.0,
        )
        mean = tl.sum(parts, 0) / N
    n_valid = tl.minimum(N - blk * BLK, BLK).to(tl.float32)

    # Pool and self-similarity; any non-finite value makes the similarity NaN. INT8 with scale
    # amax/127, rounding to nearest (ties to even); a non-finite group stores arbitrary int8 values
    # and a NaN scale.
    xsum = tl.zeros([DP], dtype=tl.float32)
    sdir = tl.zeros([DP], dtype=tl.float32)
    amax_blk = tl.zeros([], dtype=tl.float32)
    for t in range(0, BLK // SUB):
        rows = blk * BLK + t * SUB + tl.arange(0, SUB)
        x = _centred_tile(X, sb, sh, sn, sd, b, h, rows, cols, N, D, mean, CENTER, EVEN_D)
        a = _abs_nonfinite_inf(x)
        amax = tl.max(a, 1)
        amax_blk = tl.maximum(amax_blk, tl.max(amax, 0))
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
    sim = tl.sum(sdir * sdir, 0) / (n_valid * n_valid)
    sim = tl.where(amax_blk == INF, float("nan"), sim)
    tl.store(POOL + (bh.to(tl.int64) * NB + blk) * DP + cols, xsum / n_valid)
    tl.store(SIM + bh.to(tl.int64) * NB + blk, sim)
    if not PER_TOKEN:
        scale, inv = _inv_scale(amax_blk)
        if SUB < BLK:
            for t in range(0, BLK // SUB):
                rows = blk * BLK + t * SUB + tl.arange(0, SUB)
                x = _centred_tile(X, sb, sh, sn, sd, b, h, rows, cols, N, D, mean, CENTER, EVEN_D)
                _store_int8(X8, bh, N_PAD, DP, rows, cols, x * inv)
        tl.store(XS + bh.to(tl.int64) * NB + blk, _stored_scale(scale, amax_blk, mult))


@triton.jit
def sm90_token_order(n):
    """Where token ``n`` sits in the FP8 V of the Hopper kernel (``attention_sm90._as_operand``): token c
    of each 32 (bits c0..c4) at position c0 + 2*c3 + 4*c1 + 8*c2 + 16*c4."""
    c = n & 31
    return (n - c) | (c & 1) | (((c >> 3) & 1) << 1) | (((c >> 1) & 3) << 2) | (c & 16)


@triton.jit
def _v_prep_kernel(
    V, sb, sh, sn, sd,
    VMAX, VOUT, VS,
    HK, N, D, N_PAD, vmax_target, NCHUNK,
    BLK: tl.constexpr, DP: tl.constexpr, NCHUNK_P2: tl.constexpr,
    FP8: tl.constexpr, INTERPRET: tl.constexpr, EVEN_D: tl.constexpr, SM90_ORDER: tl.constexpr = False,
):
    """Scale block ``program_id(0)`` of V by ``1/(amax_c/vmax_target)`` per channel and cast it.

    FP8: ``VOUT[bh, :DP, N_PAD]`` float8e4nv (transposed: tokens contiguous). Else ``VOUT[bh, N_PAD, :DP]``
    fp16. ``VS[bh, :DP]`` receives the per-channel scale (NaN for a channel holding a non-finite value).
    SM90_ORDER: the tokens of each block are stored in the order the Hopper kernel's P.V operand
    expects (:func:`sm90_token_order`).
    """
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HK
    h = bh % HK
    rows = blk * BLK + tl.arange(0, BLK)
    cols = tl.arange(0, DP)
    x, _ = _load_tile(V, sb, sh, sn, sd, b, h, rows, cols, N, D, EVEN_D)
    ch = tl.arange(0, NCHUNK_P2)
    parts = tl.load(
        VMAX + (bh.to(tl.int64) * NCHUNK + ch[:, None]) * DP + cols[None, :],
        mask=ch[:, None] < NCHUNK, other=0.0,
    )
    amax = tl.max(parts, 0)
    scale = amax / vmax_target
    inv = tl.where(scale > 0, 1.0 / scale, 0.0)
    xs = x * inv[None, :]
    xs = tl.where(xs == xs, xs, 0.0)
    if blk == 0:
        tl.store(VS + bh.to(tl.int64) * DP + cols, tl.where(amax == INF, float("nan"), scale))
    if FP8:
        pos = sm90_token_order(rows) if SM90_ORDER else rows
        ptrs = VOUT + (bh.to(tl.int64) * DP + cols[None, :]) * N_PAD + pos[:, None]
        tl.store(ptrs, _to_fp8(xs, INTERPRET))
    else:
        ptrs = VOUT + (bh.to(tl.int64) * N_PAD + rows[:, None]) * DP + cols[None, :]
        tl.store(ptrs, xs.to(tl.float16))
