"""The Triton kernels against the plain-torch reference (``kernels/reference.py``).

Without a GPU everything runs in the Triton interpreter at small shapes; on a GPU the same tests
run at real sizes. Inputs are fresh random draws on every run (the seed is in each failure message);
outputs are poisoned with NaN before each call.

Error bounds (relative L1 against fp32/fp64 dense attention, gaussian inputs, everything kept):
FP16 P.V <= 0.015; FP8 P.V <= 0.042. FP8 measures 0.036-0.040, the reference's 0.038; the issue's
FP8 target of 0.03 is NOT met: two independent e4m3 roundings (P and V, 3 mantissa bits each)
cost ~0.035 on their own (see bench/NOTES.md), so 0.03 needs a second P.V product or FP16.
"""

import contextlib
import math
import random

import pytest
import torch

from conftest import random_seed as _seed
from sparge_pack.kernels import BLOCK_K, BLOCK_Q, block_sparse_attn, predict_block_mask, sparge_attn
from sparge_pack.kernels import default_pv_dtype
from sparge_pack.kernels.api import walk_options
from sparge_pack.kernels import reference as R

ON_GPU = torch.cuda.is_available()
DEV = "cuda" if ON_GPU else "cpu"
PV_PATHS = ["fp8", "fp16"] if (not ON_GPU or default_pv_dtype(DEV) == "fp8") else ["fp16"]
BOUND = {"fp16": 0.015, "fp8": 0.042}
# kernel vs the reference's emulation of the same rounding: only output-dtype rounding and rare
# FP8 rounding flips differ.
EMU_TOL = {torch.float32: 2e-3, torch.float16: 3e-3, torch.bfloat16: 8e-3}

if ON_GPU:
    LENGTHS = [1, 17, 300, 4608, 17776]
    HEAD_DIMS = [64, 72, 128]
    HEADS = 4
else:
    LENGTHS = [1, 17, 128, 300, 1000]
    HEAD_DIMS = [64, 72, 128]
    HEADS = 2


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(shape, gen, dtype=torch.float16):
    return torch.randn(*shape, generator=gen).to(device=DEV, dtype=dtype)


def _nan_like(x):
    return torch.full_like(x, float("nan"))


def _rel(out, ref):
    return R.metrics(out, ref)["rel_l1"]


def _local(b, h, n, d, gen, dtype=torch.float16, hk=None):
    return R.local_qkv(b, h, n, d, dtype=dtype, device=DEV, generator=gen, hk=hk)


@contextlib.contextmanager
def _attn_config(**kw):
    """Force launch choices of the attention (``api.ATTN_CONFIG_OVERRIDE``) inside the block."""
    from sparge_pack.kernels import api as A

    A.ATTN_CONFIG_OVERRIDE.update(kw)
    try:
        yield
    finally:
        A.ATTN_CONFIG_OVERRIDE.clear()


# --------------------------------------------------------------------------------------------- stage 1


def _check_mask(mask, q, k, seed, mode, **kw):
    """Kernel mask == reference mask, ties aside.

    cdf: the kernel mask lies between the reference masks at tau -+ 1e-4 (cumulative sums in another
    order), except in rows whose last kept and first dropped pooled probabilities differ by < 1e-5
    relative (mirror-symmetric K blocks of the local inputs: seed 314689874 on the H100 has two at
    0.04907857 with a relative gap of 5e-7, which the kernel's tf32x3 scores order the other way).
    topk: rows whose n-th and (n+1)-th pooled logits differ by < 1e-4 are not compared.
    """
    tag = f"seed={seed} mode={mode} {kw}"
    if mode == "cdf":
        tau = kw.pop("cdf_threshold")
        lo = R.predict_block_mask(q, k, mode="cdf", cdf_threshold=(tau - 1e-4).clamp(0, 1) if isinstance(tau, torch.Tensor) else max(tau - 1e-4, 0.0), **kw)
        hi = R.predict_block_mask(q, k, mode="cdf", cdf_threshold=(tau + 1e-4).clamp(0, 1) if isinstance(tau, torch.Tensor) else min(tau + 1e-4, 1.0), **kw)
        pm = R.pooled_map(q, k, causal=kw.get("causal", False), sim_threshold=kw["sim_threshold"],
                          keep_ranges=kw.get("keep_ranges"))
        p = torch.sort(pm["probs"].double(), -1, descending=True).values
        t = torch.as_tensor(tau, dtype=p.dtype, device=p.device).expand(p.shape[1])[None, :, None, None]
        n = (p.cumsum(-1) <= t).sum(-1).clamp(min=1)
        nkb = p.shape[-1]
        a = torch.gather(p, -1, (n - 1)[..., None])[..., 0]
        b = torch.gather(p, -1, n.clamp(max=nkb - 1)[..., None])[..., 0]
        tie = (n < pm["cand"].sum(-1)) & ((a - b).abs() < 1e-5 * a)
        assert not bool(((lo & ~mask).any(-1) & ~tie).any()), f"kernel drops blocks the reference keeps: {tag}"
        assert not bool(((mask & ~hi).any(-1) & ~tie).any()), f"kernel keeps blocks the reference drops: {tag}"
        return
    ref = R.predict_block_mask(q, k, mode="topk", **kw)
    pm = R.pooled_map(q, k, causal=kw.get("causal", False), sim_threshold=kw["sim_threshold"],
                      keep_ranges=kw.get("keep_ranges"))
    s = pm["logits"]
    frac = torch.as_tensor(kw["topk"], dtype=s.dtype, device=s.device).expand(s.shape[1])[None, :, None]
    n = torch.clamp(torch.floor(frac * pm["visible"].sum(-1)[None, None].to(s.dtype) + 1e-4), min=1).long()
    srt = torch.sort(s, -1, descending=True).values
    nkb = s.shape[-1]
    a = torch.gather(srt, -1, (n - 1).clamp(max=nkb - 1)[..., None])[..., 0]
    b = torch.gather(srt, -1, n.clamp(max=nkb - 1)[..., None])[..., 0]
    tie = (n < nkb) & torch.isfinite(b) & ((a - b).abs() < 1e-4 * (1 + a.abs()))
    differ = (mask != ref).any(-1)
    assert not bool((differ & ~tie).any()), f"masks differ outside near-ties: {tag}"


@pytest.mark.parametrize("mode", ["cdf", "topk"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("keep", [False, True])
@pytest.mark.parametrize("gqa", [False, True])
def test_mask_matches_reference(mode, causal, per_head, keep, gqa):
    seed = _seed()
    gen = _gen(seed)
    n = 1000 if not ON_GPU else 8192
    h = 4
    q, k, _ = _local(1, h, n, 64, gen, hk=2 if gqa else None)
    if per_head:
        theta = torch.tensor([-1.0, 0.2, 0.5, 0.8])
        extra = {"cdf_threshold": torch.tensor([0.5, 0.9, 0.97, 0.6])} if mode == "cdf" else {"topk": torch.tensor([0.1, 0.3, 0.5, 0.9])}
    else:
        theta = 0.3
        extra = {"cdf_threshold": 0.9} if mode == "cdf" else {"topk": 0.3}
    kw = dict(causal=causal, sim_threshold=theta, keep_ranges=[(0, 77), (500, 520)] if keep else None, **extra)
    mask = predict_block_mask(q, k, mode=mode, **{kk: (vv.to(DEV) if isinstance(vv, torch.Tensor) else vv) for kk, vv in kw.items()})
    assert mask.shape == (1, h, math.ceil(n / BLOCK_Q), math.ceil(n / BLOCK_K)) and mask.dtype == torch.bool
    ref_kw = {kk: (vv.to(DEV) if isinstance(vv, torch.Tensor) else vv) for kk, vv in kw.items()}
    _check_mask(mask, q, k, seed, mode, **ref_kw)
    # the selection actually selects: neither empty nor everything
    assert 0.0 < mask.float().mean().item() < 1.0, f"seed={seed}"


def test_mask_rules():
    """At least one block per row; forced rows/columns; causal invisible blocks never kept."""
    seed = _seed()
    gen = _gen(seed)
    q, k, _ = _local(1, 2, 900, 64, gen)
    m = predict_block_mask(q, k, mode="cdf", cdf_threshold=0.0, sim_threshold=-1.0)
    assert bool((m.sum(-1) >= 1).all()) and int(m.sum(-1).max()) == 1, f"seed={seed}"
    m = predict_block_mask(q, k, mode="topk", topk=0.0, sim_threshold=-1.0, keep_ranges=[(130, 131)])
    assert bool(m[:, :, 1, :].all()) and bool(m[:, :, :, 2].all()), f"keep_ranges rows/cols, seed={seed}"
    m = predict_block_mask(q, k, mode="topk", topk=1.0, sim_threshold=-1.0, causal=True)
    vis = R.causal_block_mask(m.shape[2], m.shape[3], 900, m.device)
    assert torch.equal(m[0, 0], vis) and torch.equal(m[0, 1], vis)
    # theta = 1.0: nothing is self-similar -> dense
    m = predict_block_mask(q, k, mode="topk", topk=0.1, sim_threshold=1.0)
    assert bool(m.all())


# ------------------------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("pv", PV_PATHS)
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("n", LENGTHS)
def test_full_density_accuracy(pv, d, n):
    """Everything kept: error vs dense fp32/fp64 attention within the P.V path's bound."""
    seed = _seed()
    gen = _gen(seed)
    q, k, v = (_randn((1, HEADS, n, d), gen) for _ in range(3))
    out = _nan_like(q)
    _, stats = sparge_attn(q, k, v, mode="topk", topk=1.0, sim_threshold=-1.0, pv_dtype=pv, return_stats=True, out=out)
    assert bool(torch.isfinite(out).all()), f"unwritten/non-finite output, seed={seed}"
    assert torch.allclose(stats["density"], torch.ones_like(stats["density"]))
    ref = R.dense_attention(q, k, v)
    err = _rel(out, ref)
    assert err <= BOUND[pv], f"{pv} n={n} d={d}: relL1 {err:.4f} > {BOUND[pv]} (seed={seed})"


@pytest.mark.parametrize("pv", PV_PATHS)
@pytest.mark.parametrize("mode", ["cdf", "topk"])
@pytest.mark.parametrize("causal", [False, True])
def test_sparse_matches_reference(pv, mode, causal):
    """With a predicted sparse mask: vs the reference's exact masked attention within the same bound,
    and vs its emulation of the kernel's rounding almost exactly."""
    seed = _seed()
    gen = _gen(seed)
    n = 1000 if not ON_GPU else 32760
    q, k, v = _local(1, 2, n, 128, gen)
    kw = dict(cdf_threshold=0.9, sim_threshold=0.3) if mode == "cdf" else dict(topk=0.5, sim_threshold=-0.1)
    mask = predict_block_mask(q, k, mode=mode, causal=causal, **kw)
    out = _nan_like(q)
    _, stats = sparge_attn(q, k, v, mode=mode, causal=causal, pv_dtype=pv, out=out, return_stats=True, **kw)
    assert bool(torch.isfinite(out).all()), f"seed={seed}"
    vis = R.causal_block_mask(mask.shape[2], mask.shape[3], n, mask.device) if causal else torch.ones_like(mask[0, 0])
    density = mask.float().sum((0, 2, 3)) / vis.sum()
    assert torch.allclose(stats["density"], density.to(stats["density"].device)), f"seed={seed}"
    assert float(density.min()) < 0.9, f"mask not sparse, seed={seed}"
    exact, _ = R.block_sparse_attention(q, k, v, mask, causal=causal)
    emu, _ = R.block_sparse_attention(q, k, v, mask, causal=causal, quant=pv,
                                    **walk_options(q.shape[-1], n, 2, pv_dtype=pv, causal=causal))
    assert _rel(out, exact) <= BOUND[pv], f"seed={seed}"
    assert _rel(out, emu) <= EMU_TOL[q.dtype], f"vs emulation {_rel(out, emu):.2e}, seed={seed}"


@pytest.mark.parametrize("pv", PV_PATHS)
@pytest.mark.parametrize("kernel,n,thr", [("auto", 1000, None), ("tl", 300, 4.0), ("auto", 64, None), ("tl", 17, None)])
def test_keep_all_skips_selection(pv, kernel, n, thr, monkeypatch):
    """Top-k 1 without causal mask launches no selection (the kernels walk every K block without a LUT)
    and gives, to the bit, the output of the same call with an all-true block mask (the LUT path), with
    density 1 and the same P.V skip count. On an sm_90 GPU "auto" runs the Hopper kernel (in 64-row FP8
    programs with 4 K/V stages for the call without LUT, 3 with it: ``api._sm90_config``)."""
    from sparge_pack.kernels import api as A

    seed = _seed()
    gen = _gen(seed)
    if ON_GPU:
        n *= 9
    q, k, v = _local(1, 2, n, 128, gen, dtype=torch.bfloat16)
    q, k = q * 1.5, k * 1.5  # some P.V skips with thr
    nqb, nkb = -(-n // BLOCK_Q), -(-n // BLOCK_K)
    with _attn_config(kernel=kernel):
        base = _nan_like(q)
        _, want = block_sparse_attn(q, k, v, torch.ones(1, 1, nqb, nkb, dtype=torch.bool), pv_dtype=pv,
                                    pv_threshold=thr, return_stats=True, out=base)

        def no_select(*args, **kwargs):
            raise AssertionError("the selection ran for a call that keeps every block")

        monkeypatch.setattr(A, "_select", no_select)
        out = _nan_like(q)
        _, stats = sparge_attn(q, k, v, mode="topk", topk=1.0, pv_dtype=pv, pv_threshold=thr, return_stats=True,
                               out=out)
    tag = f"seed={seed} pv={pv} kernel={kernel} n={n} thr={thr}"
    assert bool(torch.isfinite(out).all()), tag
    assert torch.equal(out, base), f"relL1 {_rel(out, base):.2e} {tag}"
    for key in ("density", "pv_skipped", "blocks_computed", "blocks_total"):
        assert torch.equal(stats[key], want[key]), f"{key}: {stats[key]} vs {want[key]} {tag}"
    assert torch.equal(stats["density"], torch.ones_like(stats["density"])), tag
    if thr is not None and n >= 1000:
        assert float(stats["pv_skipped"].max()) > 0, f"no P.V skip: the skip count is not compared ({tag})"
    # causal calls, per-head top-k and top-k < 1 still select
    with pytest.raises(AssertionError, match="the selection ran"):
        sparge_attn(q, k, v, mode="topk", topk=1.0, causal=True, pv_dtype=pv)
    with pytest.raises(AssertionError, match="the selection ran"):
        sparge_attn(q, k, v, mode="topk", topk=torch.ones(2, device=DEV), pv_dtype=pv)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="topk must lie in"):  # still checked where nothing is selected
        sparge_attn(q, k, v, mode="topk", topk=1.5, pv_dtype=pv)
    with pytest.raises(ValueError, match="sim_threshold has 3 values"):
        sparge_attn(q, k, v, mode="topk", topk=1.0, sim_threshold=torch.zeros(3), pv_dtype=pv)
    with pytest.raises(ValueError, match="keep_ranges must be non-negative"):
        sparge_attn(q, k, v, mode="topk", topk=1.0, keep_ranges=[(-1, 5)], pv_dtype=pv)


@pytest.mark.parametrize("pv", ["fp8", "fp16"])
def test_emulation_row_sums(pv):
    """The emulation's two denominators, against a direct computation on one Q block and one K block (with
    a key tail): fp32 P summed (the portable kernel, 128-row Hopper programs) or the rounded P that P.V
    takes (``sum_rounded_p``: the Hopper kernel's 64-row FP8 programs, ``sum_mma``)."""
    seed = _seed()
    gen = _gen(seed)
    q, k, v = (_randn((1, 1, n, 64), gen, torch.float32) for n in (100, 40, 40))
    qq, kq, vq = R.quantize_like_kernel(q, k, v, pv)
    s = qq @ kq.transpose(-1, -2) * (64**-0.5 * math.log2(math.e))
    p = torch.exp2(s - s.amax(-1, keepdim=True) + R.P_SCALE_LOG2)
    pr = p.to(torch.float8_e4m3fn).float() if pv == "fp8" else p.half().float()
    mask = torch.ones(1, 1, 1, 1, dtype=torch.bool)
    emu = {}
    for rounded, denom in ((False, p), (True, pr)):
        emu[rounded], _ = R.block_sparse_attention(q, k, v, mask, quant=pv, sum_rounded_p=rounded)
        want = (pr @ vq) / denom.sum(-1, keepdim=True)
        assert _rel(emu[rounded], want) < 1e-5, f"sum_rounded_p={rounded} {_rel(emu[rounded], want):.2e} seed={seed}"
    gap = _rel(emu[False], emu[True])
    assert gap > 1e-5, f"the option changed nothing ({gap:.2e}), seed={seed}"


@pytest.mark.parametrize("block_m,pair", [(64, False), (64, True), (128, False), (128, True)])
@pytest.mark.parametrize("causal", [False, True])
def test_walk_configs(block_m, pair, causal):
    """Every walk of the LUT the launch code can choose (64- or 128-row programs, single or paired
    K blocks), forced at one shape: the output matches the reference's emulation of that walk."""
    seed = _seed()
    gen = _gen(seed)
    n = 1000 if not ON_GPU else 8192
    q, k, v = _local(1, 2, n, 128, gen)
    pv = PV_PATHS[0]
    mask = predict_block_mask(q, k, mode="topk", topk=0.6, sim_threshold=-1.0, causal=causal)
    out = _nan_like(q)
    with _attn_config(block_m=block_m, pair=pair, kernel="tl"):
        block_sparse_attn(q, k, v, mask, causal=causal, pv_dtype=pv, out=out)
    emu, _ = R.block_sparse_attention(q, k, v, mask, causal=causal, quant=pv, rows_per_decision=block_m, pair=pair)
    assert bool(torch.isfinite(out).all()), f"seed={seed}"
    assert _rel(out, emu) <= EMU_TOL[q.dtype], f"vs emulation {_rel(out, emu):.2e}, seed={seed}"


def test_sm90_v_token_order():
    """V as the Hopper kernel reads it: the same FP8 values as the portable layout, with token c of each
    32 at position c0 + 2*c3 + 4*c1 + 8*c2 + 16*c4 (c_i: the bits of c), the kernel's relabelling of P
    (kernels/attention_sm90.py, _as_operand); and the same bytes whether V is prepared in the Q/K launch
    or in its own."""
    from sparge_pack.kernels import api as A

    q, k, v = _local(1, 2, 300, 64, _gen(_seed()))
    g = A._check(q, k, v, "HND")
    plain = A._prep_qk(q, k, v, g, g.d**-0.5, "fp8", sm90=False)
    moved = A._prep_qk(q, k, v, g, g.d**-0.5, "fp8", sm90=True)
    assert (plain["v_order"], moved["v_order"]) == ("tokens", "sm90")
    n = torch.arange(plain["v8"].shape[-1], device=plain["v8"].device)
    c = n % 32
    pos = n - c + (c & 1) + ((c >> 3) & 1) * 2 + ((c >> 1) & 3) * 4 + (c & 16)
    assert not torch.equal(pos, n) and torch.equal(pos.sort().values, n)
    assert torch.equal(moved["v8"][..., pos].view(torch.uint8), plain["v8"].view(torch.uint8))
    assert torch.equal(moved["vs"], plain["vs"])
    # V blocks in the Q/K launch (FUSE_V_MAX, taken here) or a launch of their own: the same bytes
    saved, A.FUSE_V_MAX = A.FUSE_V_MAX, 0
    try:
        for sm90 in (False, True):
            alone = A._prep_qk(q, k, v, g, g.d**-0.5, "fp8", sm90=sm90)
            fused = moved if sm90 else plain
            assert torch.equal(alone["v8"].view(torch.uint8), fused["v8"].view(torch.uint8)), f"sm90={sm90}"
            assert torch.equal(alone["vs"], fused["vs"])
    finally:
        A.FUSE_V_MAX = saved


def test_prep_without_stats(monkeypatch):
    """Calls that select nothing (top-k 1, a caller's block mask) prepare Q, K and V without the pooled blocks
    and self-similarities: the same INT8/FP8 bytes and scales as the preparation with them, no ``pool_*`` or
    ``sim_*`` buffers; a call with a selection still computes them."""
    from sparge_pack.kernels import api as A

    seed = _seed()
    q, k, v = _local(1, 2, 300, 128, _gen(seed), dtype=torch.bfloat16)
    q = q + 0.5 * torch.randn(128, generator=_gen(seed + 1)).to(q)  # a common offset, as real Q and K have
    k = k - 0.7 * torch.randn(128, generator=_gen(seed + 2)).to(k)
    g = A._check(q, k, v, "HND")
    for pv in PV_PATHS:
        full = A._prep_qk(q, k, v, g, g.d**-0.5, pv, sm90=False)
        bare = A._prep_qk(q, k, v, g, g.d**-0.5, pv, sm90=False, stats=False)
        assert {"pool_q", "sim_q", "pool_k", "sim_k"} <= set(full), pv
        assert set(full) - set(bare) == {"pool_q", "sim_q", "pool_k", "sim_k"}, pv
        for name in ("q8", "qs", "k8", "ks", "v8", "vs"):
            a, b = full[name], bare[name]
            if a.dtype.itemsize == 1:
                a, b = a.view(torch.uint8), b.view(torch.uint8)
            assert torch.equal(a, b), f"{name} pv={pv} seed={seed}"
        assert bool(torch.isfinite(full["sim_k"]).all()) and bool(full["pool_q"].abs().sum() > 0), f"seed={seed}"

    seen = []
    prep = A._prep_qk

    def spy(*args, **kwargs):
        seen.append(kwargs.get("stats", True))
        return prep(*args, **kwargs)

    monkeypatch.setattr(A, "_prep_qk", spy)
    monkeypatch.setattr(A, "_PLANS", {})
    mask = torch.ones(1, 1, g.nqb, g.nkb, dtype=torch.bool)
    outs = {}
    for name, call in (("topk 1", lambda o: sparge_attn(q, k, v, mode="topk", topk=1.0, out=o)),
                       ("mask", lambda o: block_sparse_attn(q, k, v, mask, out=o)),
                       ("topk 0.5", lambda o: sparge_attn(q, k, v, mode="topk", topk=0.5, out=o))):
        outs[name] = call(_nan_like(q))
        assert bool(torch.isfinite(outs[name]).all()), f"{name} seed={seed}"
    assert seen == [False, False, True]
    assert torch.equal(outs["topk 1"], outs["mask"]), f"seed={seed}"


@pytest.mark.parametrize("pv", PV_PATHS)
@pytest.mark.parametrize("thr", [3.0, 8.0, "per-head"])
def test_stage2_skip(pv, thr):
    """The P.V skip: same decisions and output as the reference's emulation, the right counter, and
    an output change within the bound implied by the skipped probabilities."""
    seed = _seed()
    gen = _gen(seed)
    n = 1000 if not ON_GPU else 16384
    q, k, v = _local(1, 2, n, 64, gen)
    q, k = q * 1.5, k * 1.5  # sharper attention: far blocks become skippable
    if thr == "per-head":  # head 0 skips at 4, head 1 never
        thr = torch.tensor([4.0, float("inf")], device=DEV)
    mask = predict_block_mask(q, k, mode="topk", topk=0.6, sim_threshold=-1.0)
    # the same block-by-block walk with a threshold nothing reaches: differs only by the skips
    base = block_sparse_attn(q, k, v, mask, pv_dtype=pv, pv_threshold=1e9)
    out = _nan_like(q)
    _, stats = block_sparse_attn(q, k, v, mask, pv_dtype=pv, pv_threshold=thr, return_stats=True, out=out)
    emu, skipped = R.block_sparse_attention(q, k, v, mask, quant=pv, pv_threshold=thr,
                                            **walk_options(q.shape[-1], n, 2, pv_dtype=pv, pv_threshold=thr))
    assert bool(torch.isfinite(out).all()), f"seed={seed}"
    computed = mask.float().sum((0, 2, 3))
    want = skipped.sum((0, 2)) / computed
    assert float(want.max()) > 0.02, f"nothing skipped: the test would be vacuous (seed={seed})"
    got = stats["pv_skipped"].to(want.device, want.dtype)
    assert bool(((got - want).abs() * computed <= 1.0 + 1e-6).all()), f"pv_skipped {got} vs {want}, seed={seed}"
    assert _rel(out, emu) <= EMU_TOL[q.dtype], f"seed={seed}"
    # each skipped block holds probabilities < 2^-thr of the running (<= final) row max; l >= 1 in
    # those units, so a row moves by at most 2*eps/(1-eps)*max|v| with eps = skipped*BLOCK_K*2^-thr.
    lam = torch.as_tensor(thr, dtype=torch.float64).reshape(-1).expand(2).to(skipped.device)[None, :, None]
    if isinstance(thr, torch.Tensor):
        assert float(stats["pv_skipped"][1]) == 0.0 and float(want[1]) == 0.0, f"head 1 must never skip, seed={seed}"
    eps = skipped.repeat_interleave(BLOCK_Q, dim=2)[:, :, :n] * BLOCK_K * torch.exp2(-lam)  # (B,H,N)
    bound = 2 * eps / (1 - eps).clamp_min(1e-6) * v.abs().amax().float() + 2e-3
    moved = (out.float() - base.float()).abs().amax(-1)
    assert bool((moved <= bound.to(moved.device, moved.dtype)).all()), f"seed={seed}"


def test_layouts_gqa_fp32_causal():
    seed = _seed()
    gen = _gen(seed)
    n, d = (700, 64) if not ON_GPU else (4608, 128)
    q, k, v = _local(2, 4, n, d, gen, hk=2)
    kw = dict(mode="topk", topk=0.5)
    hnd = sparge_attn(q, k, v, **kw)
    # NHD view of the same numbers gives the same numbers
    nhd = sparge_attn(q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous(),
                      layout="NHD", **kw)
    assert nhd.shape == (2, n, 4, d)
    assert torch.equal(nhd.transpose(1, 2), hnd), f"seed={seed}"
    # GQA == K/V repeated per query head
    rep = sparge_attn(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), **kw)
    assert torch.equal(rep, hnd), f"seed={seed}"
    # fp32 in -> fp32 out, accurate
    q32, k32, v32 = (_randn((1, 2, n, d), gen, torch.float32) for _ in range(3))
    o32 = sparge_attn(q32, k32, v32, mode="topk", topk=1.0, sim_threshold=-1, pv_dtype="fp16")
    assert o32.dtype == torch.float32 and _rel(o32, R.dense_attention(q32, k32, v32)) <= BOUND["fp16"]
    # causal, Nq != Nk, top-left aligned like SDPA's is_causal
    kc, vc = k32[:, :, : n // 2 + 5], v32[:, :, : n // 2 + 5]
    oc = sparge_attn(q32, kc, vc, causal=True, mode="topk", topk=1.0, sim_threshold=-1, pv_dtype="fp16")
    sd = torch.nn.functional.scaled_dot_product_attention(q32, kc, vc, is_causal=True)
    assert _rel(oc, sd) <= BOUND["fp16"], f"seed={seed}"


def test_odd_head_dims_and_scale():
    """Dims other than 64/128 are padded; a custom scale is honoured."""
    seed = _seed()
    gen = _gen(seed)
    for d in (16, 40, 96, 160, 256):
        q, k, v = (_randn((1, 2, 200, d), gen, torch.float32) for _ in range(3))
        for scale in (None, 0.05):
            out = _nan_like(q)
            sparge_attn(q, k, v, scale=scale, mode="topk", topk=1.0, sim_threshold=-1, pv_dtype="fp16", out=out)
            ref = R.dense_attention(q, k, v, scale=scale)
            assert _rel(out, ref) <= BOUND["fp16"], f"d={d} scale={scale} seed={seed}"


# ------------------------------------------------------------------------------- sampled statistics


@pytest.mark.parametrize("pv", PV_PATHS)
def test_sampled_statistics_and_v_overflow(pv):
    """Above 2 * STATS_SAMPLES tokens the K mean and the V scale come from every stats_stride(N)-th token.
    A V value 100x above the sampled ones, at a token the sample skips, must not saturate: the fix kernel
    requantizes that head with the channel's true |max|. A NaN at a skipped token still makes its
    channel NaN. Prepared buffers vs the reference's key_mean / v_scale, output vs its emulation."""
    from sparge_pack.kernels import api as A
    from sparge_pack.kernels.config import STATS_SAMPLES, V_SAMPLE_TARGET, stats_stride

    seed = _seed()
    gen = _gen(seed)
    n, d = (1100, 64) if not ON_GPU else (32760, 128)
    stride = stats_stride(n)
    assert stride > 1 and n >= 2 * STATS_SAMPLES
    q, k, v = _local(1, 2, n, d, gen, dtype=torch.float32)
    t = int(torch.randint(n // stride, (1,), generator=gen)) * stride + 1  # skipped by the sample
    c = int(torch.randint(d, (1,), generator=gen))
    v[0, 1, t, c] = 100 * float(v[0, 1, :, c].abs().max())
    k = k + torch.randn(1, 2, 1, d, generator=gen).to(DEV) * 3  # an offset for the smoothing to remove

    g = A._check(q, k, v, "HND")
    buf = A._prep_qk(q, k, v, g, g.d**-0.5, pv, sm90=False)
    vs = buf["vs"].view(1, 2, 1, -1)[..., :d].double()
    want = R.v_scale(v.double())
    assert torch.allclose(vs, want, rtol=1e-6, atol=0), f"V scale vs reference, seed={seed}"
    sampled_only = R.sampled(v.double()).abs().amax(2, keepdim=True) / V_SAMPLE_TARGET
    assert float(vs[0, 1, 0, c]) > 4 * float(sampled_only[0, 1, 0, c]), f"the overflow was not fixed, seed={seed}"
    assert torch.allclose(vs[0, 0], sampled_only[0, 0], rtol=1e-6), f"an untouched head changed, seed={seed}"
    pool_k, _ = R.block_stats(k.double() - R.key_mean(k.double()), BLOCK_K)
    got = buf["pool_k"].view(1, 2, -1, g.dp)[..., :d].double()
    assert torch.allclose(got, pool_k, atol=1e-4), f"K pooled around the sampled mean, seed={seed}"

    mask = torch.ones(1, 2, g.nqb, g.nkb, dtype=torch.bool, device=DEV)
    out = _nan_like(q)
    block_sparse_attn(q, k, v, mask, pv_dtype=pv, out=out)
    emu, _ = R.block_sparse_attention(q, k, v, mask, quant=pv, **walk_options(d, n, 2, pv_dtype=pv))
    assert bool(torch.isfinite(out).all()), f"seed={seed}"
    assert _rel(out, emu) <= EMU_TOL[torch.float32], f"vs emulation {_rel(out, emu):.2e}, seed={seed}"
    assert _rel(out, R.dense_attention(q, k, v)) <= BOUND[pv], f"seed={seed}"
    # sparge_attn with a selection (top-k 0.5) and without one (top-k 1): the same fixed V as block_sparse_attn
    kw = dict(mode="topk", sim_threshold=-1.0, pv_dtype=pv)
    assert torch.equal(sparge_attn(q, k, v, topk=1.0, **kw), out), f"top-k 1, seed={seed}"
    part = predict_block_mask(q, k, mode="topk", topk=0.5, sim_threshold=-1.0)
    want = block_sparse_attn(q, k, v, part, pv_dtype=pv)
    assert bool(torch.isfinite(want).all()), f"seed={seed}"
    assert torch.equal(sparge_attn(q, k, v, topk=0.5, **kw), want), f"top-k 0.5, seed={seed}"

    v[0, 0, t, (c + 1) % d] = float("nan")
    out = _nan_like(q)
    block_sparse_attn(q, k, v, mask, pv_dtype=pv, out=out)
    rule = torch.zeros_like(out, dtype=torch.bool)
    rule[0, 0, :, (c + 1) % d] = True
    assert torch.equal(~torch.isfinite(out), rule), f"NaN at a skipped token, seed={seed}"
    out = sparge_attn(q, k, v, topk=0.5, **kw)
    assert torch.equal(~torch.isfinite(out), rule), f"NaN at a skipped token, top-k 0.5, seed={seed}"


# ------------------------------------------------------------------------------------ randomized sweep


def _case(rng: random.Random):
    g = rng.choice([1, 1, 2, 3])
    hk = rng.choice([1, 2])
    nq = rng.choice([1, 2, 17, 63, 64, 65, 127, 128, 129, 200, 255, 256, 300, 400, 517])
    nk = nq if rng.random() < 0.6 else rng.choice([1, 5, 64, 100, 128, 190, 333, 450])
    return dict(
        b=rng.choice([1, 2]), hk=hk, h=hk * g, nq=nq, nk=nk,
        d=rng.choice([16, 40, 64, 64, 72, 96, 128, 128, 160, 256]),
        dtype=rng.choice([torch.float16, torch.bfloat16, torch.float32]),
        layout=rng.choice(["HND", "NHD"]),
        mode=rng.choice(["cdf", "topk", "mask"]),
        causal=rng.random() < 0.3,
        pv=rng.choice(PV_PATHS),
        pv_threshold=rng.choice([None, None, 3.0, 8.0]),
        local=rng.random() < 0.5,
        keep=rng.random() < 0.3,
    )


SWEEP = 220


@pytest.mark.parametrize("idx", range(SWEEP))
def test_random_sweep(idx):
    seed = _seed()
    rng = random.Random(seed)
    c = _case(rng)
    gen = _gen(seed)
    if c["local"] and c["nq"] == c["nk"]:
        q, k, v = R.local_qkv(c["b"], c["h"], c["nq"], c["d"], generator=gen, hk=c["hk"], device=DEV, dtype=c["dtype"])
    else:
        q = _randn((c["b"], c["h"], c["nq"], c["d"]), gen, c["dtype"])
        k = _randn((c["b"], c["hk"], c["nk"], c["d"]), gen, c["dtype"])
        v = _randn((c["b"], c["hk"], c["nk"], c["d"]), gen, c["dtype"])
    lay = c["layout"]
    conv = (lambda x: x.transpose(1, 2).contiguous()) if lay == "NHD" else (lambda x: x)
    nqb, nkb = math.ceil(c["nq"] / BLOCK_Q), math.ceil(c["nk"] / BLOCK_K)
    keep = [(rng.randrange(c["nk"]), c["nk"])] if c["keep"] else None
    if c["mode"] == "mask":
        mask = torch.rand(c["b"], c["h"], nqb, nkb, generator=gen) < rng.choice([0.2, 0.6, 1.0])
        mask = mask.to(DEV)
    else:
        kw = dict(cdf_threshold=rng.choice([0.5, 0.9, 0.99]), topk=rng.choice([0.1, 0.5, 0.9]),
                  sim_threshold=rng.choice([-1.0, 0.0, 0.5]), keep_ranges=keep)
        mask = predict_block_mask(conv(q), conv(k), layout=lay, mode=c["mode"], causal=c["causal"], **kw)
    out = _nan_like(conv(q))
    args = (conv(q), conv(k), conv(v))
    common = dict(layout=lay, causal=c["causal"], pv_threshold=c["pv_threshold"], pv_dtype=c["pv"], out=out,
                  return_stats=True)
    if c["mode"] == "mask":
        _, stats = block_sparse_attn(*args, mask, **common)
    else:
        _, stats = sparge_attn(*args, mode=c["mode"], **kw, **common)
    tag = f"seed={seed} case={c}"
    assert out.dtype == c["dtype"] and out.shape == args[0].shape, tag
    o = out.transpose(1, 2) if lay == "NHD" else out
    emu, skipped = R.block_sparse_attention(q, k, v, mask, causal=c["causal"], quant=c["pv"],
                                             pv_threshold=c["pv_threshold"],
                                             **walk_options(c["d"], c["nq"], c["b"] * c["h"], pv_dtype=c["pv"],
                                                            causal=c["causal"], pv_threshold=c["pv_threshold"]))
    # a row with no visible key in its kept blocks is zero (only possible with a user mask)
    assert not bool(torch.isnan(o).any()), f"unwritten output: {tag}"
    err = _rel(o, emu) if emu.abs().sum() > 0 else float(o.abs().max())
    tol = EMU_TOL[c["dtype"]]
    rows = c["b"] * c["h"] * c["nq"]
    if c["pv"] == "fp8" and rows < 64:
        # P near its row's maximum sits in e4m3's coarsest steps (32 apart in [256, 448]); one rounding
        # flip there (a last-bit difference in the score is enough) moves that row's output by up to ~3%.
        # Many rows average such flips out; one or two rows (seed 3201559000: 8.1e-3) do not.
        tol *= math.sqrt(64 / rows)
    assert err <= tol, f"relL1 vs emulation {err:.2e} (bound {tol:.2e}): {tag}"
    vis = R.causal_block_mask(nqb, nkb, c["nq"], mask.device) if c["causal"] else torch.ones(nqb, nkb, dtype=torch.bool, device=mask.device)
    density = (mask & vis).float().sum((0, 2, 3)) / (c["b"] * vis.sum())
    assert torch.allclose(stats["density"].cpu(), density.cpu().float(), atol=1e-6), tag
    if c["pv_threshold"] is not None:
        computed = (mask & vis).float().sum((0, 2, 3))
        want = skipped.sum((0, 2)) / computed.clamp_min(1)
        got = stats["pv_skipped"].to(want.device, want.dtype)
        assert bool(((got - want).abs() * computed <= 1.0 + 1e-6).all()), tag


# --------------------------------------------------------------------------------- non-finite inputs


@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("pv", PV_PATHS)
def test_nonfinite_inputs(where, value, pv):
    """Every element SDPA makes non-finite is non-finite here too; beyond that exactly the documented
    rule: Q token -> its row; K token -> all rows of that (batch, KV head); V (token, c) -> channel c."""
    seed = _seed()
    gen = _gen(seed)
    n, d = 300, 64
    q, k, v = (_randn((1, 2, n, d), gen, torch.float32) for _ in range(3))
    t, c, h = int(torch.randint(n, (1,), generator=gen)), int(torch.randint(d, (1,), generator=gen)), 1
    {"q": q, "k": k, "v": v}[where][0, h, t, c] = value
    out = _nan_like(q)
    sparge_attn(q, k, v, mode="topk", topk=0.3, pv_dtype=pv, out=out)
    sd = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    bad_ref = ~torch.isfinite(sd)
    bad = ~torch.isfinite(out)
    assert bool(bad_ref.any()), "SDPA should be non-finite somewhere"
    assert not bool((bad_ref & ~bad).any()), f"silently finite where SDPA is not (seed={seed})"
    rule = torch.zeros_like(bad)
    if where == "q":
        rule[0, h, t, :] = True
    elif where == "k":
        rule[0, h] = True
    else:
        rule[0, h, :, c] = True
    assert torch.equal(bad, rule), f"non-finite set differs from the documented rule (seed={seed})"


def test_large_magnitude_inputs():
    """|x| up to the fp16 maximum: no overflow, and quantization is scale-invariant."""
    seed = _seed()
    gen = _gen(seed)
    n, d = 500, 64
    q, k, v = (torch.randn(1, 2, n, d, generator=gen).clamp(-3.99, 3.99).to(DEV) for _ in range(3))
    big = 2.0**14  # 3.99 * 2^14 = 65372 < 65504
    for pv in PV_PATHS:
        small = sparge_attn(q, k, v, mode="topk", topk=0.5, pv_dtype=pv)
        large = sparge_attn(q * big, k / big, v * big, mode="topk", topk=0.5, pv_dtype=pv)
        assert bool(torch.isfinite(large).all())
        assert torch.allclose(large / big, small, rtol=1e-5, atol=1e-6), f"{pv} seed={seed}"
        # fp16 at its maximum magnitude
        h16 = [(x * big).half() for x in (q, k, v)]
        o16 = sparge_attn(*h16, mode="topk", topk=1.0, sim_threshold=-1, pv_dtype=pv)
        assert bool(torch.isfinite(o16).all()), f"overflow at fp16 max, {pv} seed={seed}"
        emu, _ = R.block_sparse_attention(*h16, torch.ones(1, 2, 4, 8, dtype=torch.bool, device=DEV), quant=pv,
                                          **walk_options(d, n, 2, pv_dtype=pv))
        assert _rel(o16, emu) <= EMU_TOL[torch.float16], f"{pv} seed={seed}"


# ------------------------------------------------------------------------------------------ GPU only


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU: B*H*N*D > 2^31 elements is too large for the interpreter")
def test_int64_indexing():
    """B*H*N*D > 2^31: index arithmetic must be 64-bit."""
    b, h, n, d = 1, 132, 131072, 128
    assert b * h * n * d > 2**31
    seed = _seed()
    gen = torch.Generator(device=DEV).manual_seed(seed)  # drawn on the GPU: 2.2 G elements per tensor
    q, k, v = (torch.randn(b, h, n, d, device=DEV, dtype=torch.bfloat16, generator=gen) for _ in range(3))
    out = _nan_like(q)
    sparge_attn(q, k, v, mode="topk", topk=0.02, sim_threshold=-1.0, out=out)
    assert bool(torch.isfinite(out).all()), f"seed={seed}"
    hs = [0, h - 1]
    mask = predict_block_mask(q[:, hs], k[:, hs], mode="topk", topk=0.02, sim_threshold=-1.0)
    exact, _ = R.block_sparse_attention(q[:, hs, -4096:], k[:, hs], v[:, hs], mask[:, :, -32:])
    assert _rel(out[:, hs, -4096:], exact) <= BOUND[default_pv_dtype(DEV)], f"seed={seed}"
    del q, k, v, out


def _is_sm90():
    return ON_GPU and torch.cuda.get_device_capability() == (9, 0)


@pytest.mark.skipif(not _is_sm90(), reason="the Gluon kernel (kernels/attention_sm90.py) runs on sm_90 GPUs only")
@pytest.mark.parametrize("d,n", [(128, 8192 + 37), (64, 4608), (128, 300)])
@pytest.mark.parametrize("cfg", [dict(block_m=64, num_warps=4, num_stages=3), dict(block_m=128, num_warps=8, num_stages=2),
                                 dict(block_m=128, num_warps=4, num_stages=3),
                                 dict(block_m=64, num_warps=4, num_stages=3, sum_mma=False),
                                 dict(block_m=64, num_warps=4, num_stages=4)])
@pytest.mark.parametrize("pv", ["fp8", "fp16"])
def test_sm90_kernel(d, n, cfg, pv):
    """The Hopper kernel, forced, in several launch configs and both P.V types: matches the reference's
    emulation of a single-block walk (with the row sums of rounded P where ``sum_mma`` makes the kernel take
    them so) as tightly as the portable kernel does, and agrees with the portable kernel."""
    seed = _seed()
    gen = _gen(seed)
    q, k, v = _local(1, 2, n, d, gen, dtype=torch.bfloat16)
    mask = predict_block_mask(q, k, mode="topk", topk=0.6, sim_threshold=-1.0)
    mask[0, 1, 0] = False  # an empty LUT row: zeros
    outs = {}
    for kernel in ("sm90", "tl"):
        outs[kernel] = _nan_like(q)
        with _attn_config(**cfg, kernel=kernel):
            block_sparse_attn(q, k, v, mask, pv_dtype=pv, out=outs[kernel])
            if kernel == "sm90":
                walk = walk_options(d, n, 2, pv_dtype=pv)
    out = outs["sm90"]
    tag = f"seed={seed} cfg={cfg} pv={pv} walk={walk}"
    assert walk["rows_per_decision"] == cfg["block_m"], tag
    assert walk["sum_rounded_p"] == (pv == "fp8" and cfg["block_m"] == 64 and cfg.get("sum_mma", True)), tag
    assert bool(torch.isfinite(out).all()), tag
    assert bool((out[0, 1, :BLOCK_Q] == 0).all()), tag
    emu, _ = R.block_sparse_attention(q, k, v, mask, quant=pv, pair=False, sum_rounded_p=walk["sum_rounded_p"])
    assert _rel(out, emu) <= EMU_TOL[q.dtype], f"vs emulation {_rel(out, emu):.2e} {tag}"
    exact, _ = R.block_sparse_attention(q, k, v, mask)
    assert _rel(out, exact) <= BOUND[pv], f"vs exact {_rel(out, exact):.2e} {tag}"
    assert _rel(out, outs["tl"]) <= 2 * EMU_TOL[q.dtype], tag


# ---------------------------------------------------------------------------------------- interface


def test_bad_input_errors():
    q = torch.randn(1, 2, 64, 64, device=DEV)
    with pytest.raises(ValueError, match="layout"):
        sparge_attn(q, q, q, layout="BHND")
    with pytest.raises(TypeError, match="dtype"):
        sparge_attn(q.double(), q.double(), q.double())
    with pytest.raises(ValueError, match="head dim"):
        big = torch.randn(1, 1, 8, 300, device=DEV)
        sparge_attn(big, big, big)
    with pytest.raises(ValueError, match="multiple"):
        sparge_attn(torch.randn(1, 3, 64, 64, device=DEV), q, q)
    with pytest.raises(ValueError, match="cdf_threshold"):
        sparge_attn(q, q, q, cdf_threshold=1.5)
    with pytest.raises(ValueError, match="one value per query head"):
        sparge_attn(q, q, q, topk=torch.tensor([0.1, 0.2, 0.3]), mode="topk")
    with pytest.raises(ValueError, match="mode"):
        sparge_attn(q, q, q, mode="random")
    with pytest.raises(ValueError, match="pv_threshold"):
        sparge_attn(q, q, q, pv_threshold=-1.0)
    with pytest.raises(ValueError, match="keep_ranges"):
        sparge_attn(q, q, q, keep_ranges=[(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)])
    with pytest.raises(ValueError, match="BLOCK_Q"):
        block_sparse_attn(q, q, q, torch.ones(1, 2, 3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="out must match"):
        sparge_attn(q, q, q, out=torch.empty(1, 2, 64, 32, device=DEV))


def test_kernel_choice_errors():
    """SPARGEATTN_KERNEL / ATTN_CONFIG_OVERRIDE["kernel"]: an unknown value, or forcing the Hopper kernel
    onto a call it does not cover (causal here, on any machine), is a clear error, raised before any launch."""
    q = torch.randn(1, 2, 300, 64, device=DEV)
    for kernel, match in (("bogus", "'auto', 'tl' or 'sm90'"), ("sm90", "cannot run this call.*SPARGEATTN_KERNEL=auto")):
        with _attn_config(kernel=kernel), pytest.raises(ValueError, match=match):
            sparge_attn(q, q, q, causal=True)


@pytest.mark.parametrize("nk", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_few_key_tokens(nk, dtype):
    """One or two key tokens (a 64-key block that is nearly all padding), an odd head dim (masked
    columns), both P.V types, with and without stage 2: every output element written and finite and
    equal to exact attention within the quantization bound. On the H100 the fused V preparation left
    padded V positions unwritten for Nk = 1 with 16-bit inputs (NaN after P = 0 multiplied them)."""
    seed = _seed()
    gen = _gen(seed)
    q = _randn((2, 2, 130, 40), gen, dtype)
    k = _randn((2, 2, nk, 40), gen, dtype)
    v = _randn((2, 2, nk, 40), gen, dtype)
    exact = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
    for pv in PV_PATHS:
        for thr in (None, 8.0):
            out = _nan_like(q)
            sparge_attn(q, k, v, pv_dtype=pv, pv_threshold=thr, out=out)
            tag = f"nk={nk} {dtype} pv={pv} thr={thr} seed={seed}"
            assert bool(torch.isfinite(out).all()), tag
            assert _rel(out, exact) <= BOUND[pv], f"{_rel(out, exact):.3e} {tag}"


def test_empty_mask_rows_are_zero():
    """A user mask row with nothing kept is written as zeros, never left uninitialised."""
    q = torch.randn(1, 1, 300, 64, device=DEV)
    mask = torch.ones(1, 1, 3, 5, dtype=torch.bool)
    mask[0, 0, 1] = False
    out = _nan_like(q)
    block_sparse_attn(q, q, q, mask, out=out)
    assert bool((out[0, 0, 128:256] == 0).all()) and bool(torch.isfinite(out).all())
