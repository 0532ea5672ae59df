"""The attention kernel for Hopper (sm_90), written in Triton's Gluon language.

Same arithmetic as :mod:`.attention` (INT8 Q.K^T, exp2-domain online softmax in fp32, P in FP8 e4m3
scaled to [0, 448], FP8 P.V with V per-channel scaled, fp32 accumulation) in fewer instructions per
score, which is what limits this kernel (bench/NOTES.md #19, #37). Per K block ``it`` of the LUT::

    wait   P.V of block it - 1 (wgmma group);  softmax of S[it] -> m', l', P (fp8), alpha
    acc *= alpha (skipped by a warp whose rows all kept their maximum);  refill the slot of block
    it - 1 with block it - 1 + STAGES (TMA)
    issue  S[it + 1] = Q8 @ K8[it + 1]^T     (async wgmma group)
    issue  acc += P @ V8[it]                 (async wgmma group: P from registers)
    wait   for S[it + 1] only

* The softmax of a block whose keys are all visible (and whose scales keep |s| < 2^16) takes the row
  max on the integer scores and computes P = exp2(s * scale - m') with one I2FP + FFMA per score; the
  key tail and huge scales take the exact path (``_mul_rn`` first). 128-row programs: ~480 SASS
  instructions per 64-key block and warp on the common path, 743 before (NOTES #37).
* P goes from the Q.K^T accumulator layout to the register operand of the FP8 P.V wgmma without
  shuffles: the key index is relabelled (:func:`_as_operand`) and V is stored with its tokens in the
  same order (``quant.sm90_token_source``), so P.V is unchanged.
* P is converted and consumed in the same iteration (as a loop-carried value, or one leaving an ``if``,
  it would be unpacked and repacked byte by byte); S is converted with I2FP.
* ``SUM_MMA`` (FP8 P.V only; the launch code takes it in 64-row programs): the row sums of P are one more
  wgmma per block, P @ E with E a (BN, 8) all-ones tile in shared memory, into a zero accumulator each
  block and added to an fp32 running sum; this replaces the softmax's FADD tree and shuffles (~30
  instructions per block and thread), and l then sums the FP8-rounded P that P.V uses (NOTES #48).
* K and V tiles come through TMA into a ring of ``STAGES`` shared-memory slots, one mbarrier each.
  The LUT entries and K scales are loaded one or two iterations ahead (a warp stalls at the first
  use of a load, and one stalled warp holds the whole warpgroup at the next wgmma).

With ``PV16`` (``pv_dtype="fp16"``) P goes to the P.V wgmma as fp16 in the accumulator's own register
layout, and V is the fp16 (tokens, D) copy of the portable kernel: twice the V bytes and half the
tensor-core rate of FP8 for P.V, for ~3x less error (bench/NOTES.md, FP8 P.V accuracy).

Covered: head dims 64 and 128 (padded), FP8 or fp16 P.V, no causal mask, no stage-2 skip; the launch code
(``api._attend``) sends every other call to :func:`.attention._attn_kernel`. There is no Gluon
interpreter: the CPU tests compile this kernel for sm_90 and the GPU tests compare it with the
``tl`` kernel and the reference's emulation.
"""

from triton.experimental import gluon
from triton.runtime.jit import constexpr_function
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_init, warpgroup_mma_wait,
)

NEG_INF = gl.constexpr(float("-inf"))


@gluon.jit
def _mul_rn(a, b):
    """a * b rounded to fp32 (never contracted into a later FMA; see attention._scale)."""
    return gl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=gl.float32,
                                     is_pure=True, pack=1)


@gluon.jit
def _issue_kv(it, j, n_all, krow0, vrow0, k_desc, v_desc, k_s, v_s, bars,
              BN: gl.constexpr, DP: gl.constexpr, STAGES: gl.constexpr, PV16: gl.constexpr):
    """TMA loads of the K and V tiles of block ``j`` (the LUT's entry ``it``) into slot ``it % STAGES``.
    FP8 V is stored transposed (DP rows per head, tokens contiguous); fp16 V as (tokens, DP) like K."""
    ok = it < n_all
    slot = it % STAGES
    bar = bars.index(slot)
    mbarrier.expect(bar, (3 if PV16 else 2) * BN * DP, pred=ok)
    tma.async_copy_global_to_shared(k_desc, [krow0 + j * BN, 0], bar, k_s.index(slot), pred=ok)
    if PV16:
        tma.async_copy_global_to_shared(v_desc, [krow0 + j * BN, 0], bar, v_s.index(slot), pred=ok)
    else:
        tma.async_copy_global_to_shared(v_desc, [vrow0, j * BN], bar, v_s.index(slot), pred=ok)


@gluon.jit
def _entry(lut, it, n_all, DENSE: gl.constexpr):
    """The LUT's entry ``it`` (0 past its end); with DENSE (every block kept, no LUT) block ``it`` itself."""
    if DENSE:
        return gl.where(it < n_all, it, 0)
    else:
        return gl.load(lut + it, mask=it < n_all, other=0)


@gluon.jit
def _cvt_fma(s, c, o):
    """float(s) * c + o with one rounding (I2FP + FFMA). In inline PTX so that the compiler cannot share the
    conversion with the exact path of :func:`_softmax` (hoisted above the branch, both the integer and the
    float scores would stay live: +24 registers, spills at 128 rows)."""
    return gl.inline_asm_elementwise("{ .reg .f32 t; cvt.rn.f32.s32 t, $1; fma.rn.f32 $0, t, $2, $3; }", "=r,r,r,r",
                                     [s, c, o], dtype=gl.float32, is_pure=True, pack=1)


@gluon.jit
def _softmax(s_int, cr, m_i, j, cols, Nk, p_offset, BN: gl.constexpr, FAST: gl.constexpr):
    """Scores of one block -> (m', P in fp32, alpha).

    ``cr`` = Q row scale * K block scale (log2 units). FAST (every key visible, |s * cr| < 2^16): the
    row max on the integer scores (3-input integer max), and P = exp2(s * cr - (m - p_offset)) with one
    FFMA per score. Otherwise the exact path: s * cr rounded first (``_mul_rn``), the key tail masked;
    at fp16-max inputs the FFMA's unrounded product would miss the rounded row max by up to 2^12 and P
    would overflow (NOTES #2, #36). Both paths give the same row max (rounding is monotonic, cr >= 0);
    below 2^16 the FFMA's single rounding moves the exponent by < 2^-8, P by < 0.3% before its FP8
    rounding (steps of 6-12%)."""
    if FAST:
        m_blk = _mul_rn(gl.max(s_int, 1).to(gl.float32), cr)
        m_new = gl.maximum(m_i, m_blk)
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(_cvt_fma(s_int, gl.expand_dims(cr, 1), gl.expand_dims(p_offset - m_new, 1)))
    else:
        s = _mul_rn(s_int.to(gl.float32), gl.expand_dims(cr, 1))
        s = gl.where(gl.expand_dims(j * BN + cols, 0) < Nk, s, NEG_INF)
        m_new = gl.maximum(m_i, gl.max(s, 1))
        m_use = gl.where(m_new == NEG_INF, 0.0, m_new)
        alpha = gl.exp2(m_i - m_use)
        p = gl.exp2(s - gl.expand_dims(m_use - p_offset, 1))
    return m_new, p, alpha


@gluon.jit
def _p_operand(p, p_layout: gl.constexpr, PV16: gl.constexpr):
    """P in the register operand layout of the P.V wgmma. Outside the branches of the softmax: a tensor of
    8-bit values that leaves an ``if`` is kept as single bytes (~100 PRMT per block, NOTES #19)."""
    if PV16:  # a 16-bit operand has the accumulator's register layout (the FA2 identity): nothing moves
        return gl.convert_layout(p.to(gl.float16), p_layout, assert_trivial=True)
    else:
        return _fp8x4(_as_operand(p, p_layout))


@constexpr_function
def _rescale_asm(pack: int) -> str:
    """PTX for :func:`_rescale`: ``pack`` accumulator values and their rows' alphas in, the products out
    (tied to the inputs). The warp skips the multiplications when no alpha of the rows of its group differs
    from 1 (``vote.any``); elements 0 and 2 of a group are the two rows a thread holds in the layout."""
    mul = " ".join(f"mul.f32 ${i}, ${i}, ${2 * pack + i};" for i in range(pack))
    return ("{ .reg .pred p; "
            f"setp.neu.f32 p, ${2 * pack}, 0f3F800000; setp.neu.or.f32 p, ${2 * pack + 2}, 0f3F800000, p; "
            "vote.sync.any.pred p, p, -1; @!p bra.uni SKIP${:uid}; " + mul + " SKIP${:uid}: }")


@constexpr_function
def _rescale_constraints(pack: int) -> str:
    return ",".join(["=r"] * pack + [str(i) for i in range(pack)] + ["r"] * pack)


@gluon.jit
def _rescale(x, alpha_row, PACK: gl.constexpr):
    """x * alpha (one alpha per row), the multiplications skipped by every warp whose rows all keep their
    maximum (alpha == 1 exactly): after the first blocks of a row most blocks move no maximum, and the
    rescale is 128 of the ~740 instructions per thread and block at 128 rows (NOTES #37)."""
    return gl.inline_asm_elementwise(_rescale_asm(PACK), _rescale_constraints(PACK), [x, gl.expand_dims(alpha_row, 1)],
                                     dtype=gl.float32, is_pure=True, pack=PACK)


@gluon.jit
def _fp8x4(x):
    """fp32 -> FP8 e4m3 (round to nearest even, saturating), four values into one 32-bit register:
    the operand's register format, so nothing is unpacked and repacked between here and the wgmma."""
    return gl.inline_asm_elementwise(
        "{ .reg .b16 lo, hi; cvt.rn.satfinite.e4m3x2.f32 lo, $2, $1; cvt.rn.satfinite.e4m3x2.f32 hi, $4, $3; "
        "mov.b32 $0, {lo, hi}; }",
        "=r,r,r,r,r", [x], dtype=gl.float8e4nv, is_pure=True, pack=4)


@gluon.jit
def _as_operand(p, p_layout: gl.constexpr):
    """P (in the Q.K^T accumulator layout) in the layout of the register operand of the P.V wgmma, without
    moving data: within each 32 keys the accumulator gives a thread keys 8g+2t+e (g < 4, t = lane % 4,
    e < 2) and the operand wants keys 4t+i and 16+4t+i, so the registers are taken as they are and key c
    is relabelled k = c0 + 2*c3 + 4*c1 + 8*c2 + 16*c4 (c_i: the bits of c). V is stored with token c at
    position k (``quant.sm90_token_source``), so P.V is unchanged."""
    BM: gl.constexpr = p.shape[0]
    BN: gl.constexpr = p.shape[1]
    x = gl.reshape(p, [BM, BN // 32, 2, 2, 2, 2, 2])  # (row, c5, c4, c3, c2, c1, c0)
    x = gl.permute(x, [0, 1, 2, 4, 5, 3, 6])  # (row, c5, c4, c2, c1, c3, c0)
    x = gl.reshape(x, [BM, BN])
    return gl.convert_layout(x, p_layout, assert_trivial=True)


@gluon.jit
def _pdl_start(PDL: gl.constexpr):
    """``gdc.pdl_start`` for Gluon (a ``@gluon.jit`` kernel cannot call a ``@triton.jit`` function)."""
    if PDL:
        gl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)
        gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=gl.int32, is_pure=False,
                                  pack=1)


@gluon.jit
def _attn_kernel_sm90(
    q_desc, k_desc, v_desc, QS, KS, VS, LUT, CNT, CNT_FULL,
    O, osb, osh, osn, osd,
    H, G, NQB, NKB, Nq, Nk, D, NQ_PAD, NK_PAD, p_offset,
    BQ: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr, DP: gl.constexpr,
    CLAMP: gl.constexpr, STAGES: gl.constexpr, NW: gl.constexpr, PDL: gl.constexpr = False,
    PV16: gl.constexpr = False, DENSE: gl.constexpr = False, SUM_MMA: gl.constexpr = False,
):
    qk_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1], instr_shape=[16, BN, 32])
    PV_K: gl.constexpr = 16 if PV16 else 32  # the k of one P.V wgmma: 32 bytes of P per row either way
    pv_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1], instr_shape=[16, DP, PV_K])
    p_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=pv_l, k_width=2 if PV16 else 4)
    row_l: gl.constexpr = gl.SliceLayout(1, qk_l)
    col_l: gl.constexpr = gl.SliceLayout(0, qk_l)
    orow_l: gl.constexpr = gl.SliceLayout(1, pv_l)
    # SUM_MMA: each block's row sums of P come from the tensor cores, as P @ E with E (BN, 8) all ones (every
    # column of the product is the row sum, so a thread reads its own column: no shuffles)
    # (FP8 P.V only: the launch code never asks for it with fp16 P.V, which measured slower)
    gl.static_assert(not (SUM_MMA and PV16), "SUM_MMA is implemented for FP8 P.V only")
    sum_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1], instr_shape=[16, 8, 32])
    ps_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=sum_l, k_width=4)
    out_l: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [NW, 1], [1, 0])
    # |s * cr| <= 127^2 * DP * cr_max < 2^16: the FFMA path is within 2^-8 of the exact one (see _softmax)
    FAST_CR: gl.constexpr = 65536.0 / (127.0 * 127.0 * DP)

    _pdl_start(PDL)
    pid_m = gl.program_id(0)
    bh = gl.program_id(1)
    SUB: gl.constexpr = BQ // BM
    i = pid_m // SUB
    b = bh // H
    h = bh % H
    bhk = b * (H // G) + h // G
    bh64 = bh.to(gl.int64)
    row = bh64 * NQB + i
    if DENSE:  # every K block in order (LUT, CNT and CNT_FULL are not read): only the last has a key tail
        n_all = NKB + pid_m * 0  # a tensor even where Triton made NKB a constant (1)
        n_full = Nk // BN + pid_m * 0
    else:
        n_all = gl.load(CNT + row)
        n_full = gl.load(CNT_FULL + row)
    lut = LUT + row * NKB
    ks_base = KS + bhk.to(gl.int64) * NKB
    krow0 = bhk * NK_PAD
    vrow0 = bhk * DP

    q_s = gl.allocate_shared_memory(gl.int8, [BM, DP], q_desc.layout)
    k_s = gl.allocate_shared_memory(gl.int8, [STAGES, BN, DP], k_desc.layout)
    if PV16:
        v_s = gl.allocate_shared_memory(gl.float16, [STAGES, BN, DP], v_desc.layout)
    else:
        v_s = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, DP, BN], v_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    qbar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(qbar, count=1)
    for s in gl.static_range(STAGES):
        mbarrier.init(bars.index(s), count=1)
    if SUM_MMA:
        # E as its bit pattern (1.0 = 0x38 in e4m3), 16 contiguous bytes per thread. Not as float constants
        # converted to FP8: ptxas (Triton 3.6's) merged a foreign register into the upper half of the packed
        # e4m3 pair of a uniform value, and the tile was garbage (NOTES #48)
        e_bl: gl.constexpr = gl.BlockedLayout([1, 16], [8, 4], [NW, 1], [1, 0])
        e_bits = gl.full([8, BN], 0x38, gl.int8, e_bl)
        ones_s = gl.allocate_shared_memory(gl.float8e4nv, [8, BN],
                                           gl.NVMMASharedLayout.get_default_for([8, BN], gl.float8e4nv),
                                           e_bits.to(gl.float8e4nv, bitcast=True))
        fence_async_shared()

    mbarrier.expect(qbar, BM * DP)
    tma.async_copy_global_to_shared(q_desc, [bh * NQ_PAD + pid_m * BM, 0], qbar, q_s)
    for s in gl.static_range(STAGES):
        _issue_kv(s, _entry(lut, s, n_all, DENSE), n_all, krow0, vrow0, k_desc, v_desc, k_s, v_s,
                  bars, BN, DP, STAGES, PV16)
    # LUT entries are read an iteration before they are needed: j_tma for the next refill, j_nxt / c_nxt
    # (and j_nxt2) for the softmax
    j_tma = _entry(lut, STAGES, n_all, DENSE)

    qs = gl.load(QS + bh64 * NQ_PAD + pid_m * BM + gl.arange(0, BM, layout=row_l))
    qs_max = gl.max(qs, 0)
    cols = gl.arange(0, BN, layout=col_l)
    zero_s = gl.zeros([BM, BN], gl.int32, qk_l)
    m_i = gl.full([BM], NEG_INF, gl.float32, row_l)
    l_i = gl.zeros([BM], gl.float32, row_l)
    acc = gl.zeros([BM, DP], gl.float32, pv_l)
    # SUM_MMA: the running row sums, 8 equal columns in the product's layout, and the zero operand of the
    # block sums (use_acc=False: a fresh sum per block. Accumulated across blocks inside the FP8 wgmma, whose
    # adder keeps ~13 bits below the accumulator's exponent, the small late terms of a growing positive sum were
    # truncated away: relL1 0.63 at 32K keys; NOTES #48)
    l_run = gl.zeros([BM, 8], gl.float32, sum_l)
    l_zero = gl.zeros([BM, 8], gl.float32, sum_l)
    mbarrier.wait(qbar, 0)

    if n_all > 0:
        mbarrier.wait(bars.index(0), 0)
        s_tok = warpgroup_mma(q_s, k_s.index(0).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        s_int = warpgroup_mma_wait(0, deps=(s_tok,))
        acc_tok = warpgroup_mma_init(acc)
        if SUM_MMA:
            l_tok = warpgroup_mma_init(l_zero)
        j = _entry(lut, 0, n_all, DENSE)
        c_k = gl.load(ks_base + j)
        j_nxt = _entry(lut, 1, n_all, DENSE)
        c_nxt = gl.load(ks_base + j_nxt)
        j_nxt2 = _entry(lut, 2, n_all, DENSE)
        for it in range(0, n_all):
            slot = it % STAGES
            nxt = (it + 1) % STAGES
            # The P.V of block it - 1 reads its P operand from registers until it completes: it must be done
            # before the softmax writes new P registers (overlapping them gave NaN: bench/NOTES.md #19).
            if SUM_MMA:
                acc, l_blk = warpgroup_mma_wait(0, deps=(acc_tok, l_tok))
                l_run = l_run + l_blk  # block it - 1, in the scale of block it - 1's maximum
            else:
                acc = warpgroup_mma_wait(0, deps=(acc_tok,))
            cr = qs * c_k
            if (it < n_full) & (c_k * qs_max <= FAST_CR):
                m_i, p, alpha = _softmax(s_int, cr, m_i, j, cols, Nk, p_offset, BN, True)
            else:
                m_i, p, alpha = _softmax(s_int, cr, m_i, j, cols, Nk, p_offset, BN, False)
            p_op = _p_operand(p, p_l, PV16)
            acc = _rescale(acc, gl.convert_layout(alpha, orow_l), DP // 2)
            if SUM_MMA:
                l_run = l_run * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, sum_l)), 1)
            else:
                l_i = l_i * alpha + gl.sum(p, 1)
            if it > 0:
                gl.thread_barrier()  # every warp is done with block it - 1's slot before TMA refills it
                _issue_kv(it - 1 + STAGES, j_tma, n_all, krow0, vrow0, k_desc, v_desc, k_s, v_s, bars, BN, DP, STAGES,
                          PV16)
                j_tma = _entry(lut, it + STAGES, n_all, DENSE)
            # Q.K^T of block it + 1 (past the last block: stale data, result unused), then P.V of block it
            mbarrier.wait(bars.index(nxt), ((it + 1) // STAGES) & 1, pred=it + 1 < n_all)
            s_tok = warpgroup_mma(q_s, k_s.index(nxt).permute((1, 0)), zero_s, use_acc=False, is_async=True)
            if PV16:
                acc_tok = warpgroup_mma(p_op, v_s.index(slot), acc, is_async=True)
            else:
                acc_tok = warpgroup_mma(p_op, v_s.index(slot).permute((1, 0)), acc, is_async=True)
            if SUM_MMA:
                l_tok = warpgroup_mma(gl.convert_layout(p_op, ps_l, assert_trivial=True), ones_s.permute((1, 0)),
                                      l_zero, use_acc=False, is_async=True)
                s_int = warpgroup_mma_wait(2, deps=(s_tok,))
            else:
                s_int = warpgroup_mma_wait(1, deps=(s_tok,))
            # no load here depends on a load of the same iteration (a warp stalls on the first use)
            j = j_nxt
            c_k = c_nxt
            c_nxt = gl.load(ks_base + j_nxt2)
            j_nxt = j_nxt2
            j_nxt2 = _entry(lut, it + 3, n_all, DENSE)
        if SUM_MMA:
            acc, l_blk = warpgroup_mma_wait(0, deps=(acc_tok, l_tok))
            l_i = gl.convert_layout(gl.max(l_run + l_blk, 1), row_l)
        else:
            acc = warpgroup_mma_wait(0, deps=(acc_tok,))

    mbarrier.invalidate(qbar)
    for s in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(s))

    acc = gl.convert_layout(acc, out_l)
    l_o = gl.convert_layout(l_i, gl.SliceLayout(1, out_l))
    offs_m = pid_m * BM + gl.arange(0, BM, layout=gl.SliceLayout(1, out_l))
    offs_d = gl.arange(0, DP, layout=gl.SliceLayout(0, out_l))
    vs = gl.load(VS + bhk.to(gl.int64) * DP + offs_d)
    l_safe = gl.where(l_o > 0, l_o, 1.0)
    out = acc / gl.expand_dims(l_safe, 1) * gl.expand_dims(vs, 0)
    if CLAMP:
        out = gl.where(gl.abs(out) > 65504.0, gl.where(out > 0, 65504.0, -65504.0), out)
    optr = (O + b.to(gl.int64) * osb + h.to(gl.int64) * osh + gl.expand_dims(offs_m.to(gl.int64) * osn, 1)
            + gl.expand_dims(offs_d * osd, 0))
    mask = gl.expand_dims(offs_m < Nq, 1) & gl.expand_dims(offs_d < D, 0)
    gl.store(optr, out.to(O.dtype.element_ty), mask=mask)
