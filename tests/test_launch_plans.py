"""Launch plans (``kernels/launch.py``): the second call with a plan key replays the first call's
recorded launches on a fresh workspace. A replay must compute exactly what the normal path computes
on the same inputs, for every kind of argument a launch takes (inputs in both layouts, GQA, a
caller's ``out``, statistics, stage 2, kept token ranges, per-head thresholds on a GPU); calls whose
launches cannot be placed must keep the normal path.

In the interpreter (CPU) plans replay with tensor views of the workspace; on a GPU with raw pointers
through Triton's launcher (the Hopper kernel's TMA descriptors included)."""

import pytest
import torch

from conftest import random_seed as _seed
from sparge_pack.kernels import api as A
from sparge_pack.kernels import launch as L
from sparge_pack.kernels import reference as R
from sparge_pack.kernels import sparge_attn

ON_GPU = torch.cuda.is_available()
DEV = "cuda" if ON_GPU else "cpu"
N, NK, H, HK, D = (4608, 4096, 8, 4, 128) if ON_GPU else (300, 200, 4, 2, 64)


def _inputs(seed, layout, dtype=torch.bfloat16, n=N, nk=NK, h=H, hk=HK, d=D):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = R.local_qkv(1, h, max(n, nk), d, dtype=dtype, device=DEV, generator=gen, hk=hk)
    q, k, v = q[:, :, :n].contiguous(), k[:, :, :nk].contiguous(), v[:, :, :nk].contiguous()
    if layout == "NHD":
        q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    return q, k, v


def _normal(q, k, v, kw):
    """The same call through the normal path (plans bypassed)."""
    th = (kw.get("cdf_threshold", 0.98), kw.get("sim_threshold"), kw.get("topk", 0.5), kw.get("pv_threshold"))
    return A._run(q, k, v, kw.get("layout", "HND"), kw.get("scale"), kw.get("causal", False), kw.get("mode", "cdf"),
                  th, kw.get("keep_ranges"), True, kw.get("pv_dtype", "auto"), None)


def _key_count():
    return sum(p is not None for p in A._PLANS.values())


CASES = [
    dict(layout="HND", mode="topk", topk=0.5, sim_threshold=-1.0),
    dict(layout="NHD", mode="cdf", cdf_threshold=0.9, pv_threshold=6.0),
    dict(layout="HND", mode="topk", topk=0.3, keep_ranges=[(0, 40), (100, 130)], pv_dtype="fp16"),
    dict(layout="NHD", mode="cdf", cdf_threshold=0.95, scale=0.1, causal=True),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_replay_matches_normal_path(case):
    kw = CASES[case]
    seed = _seed()
    A._PLANS.clear()
    q, k, v = _inputs(seed, kw["layout"])
    out1, st1 = sparge_attn(q, k, v, return_stats=True, **kw)  # recorded
    assert _key_count() == 1, f"the first call left no plan: {A._PLANS}"
    ref1, rst1 = _normal(q, k, v, kw)
    assert torch.equal(out1, ref1)
    q, k, v = _inputs(seed + 1, kw["layout"])  # fresh inputs, the same key
    out = torch.full_like(q, float("nan"))
    out2, st2 = sparge_attn(q, k, v, return_stats=True, out=out, **kw)  # recorded (out is in the key)
    assert out2 is out
    ref2, rst2 = _normal(q, k, v, kw)
    assert not torch.isnan(out2).any(), f"replay left elements unwritten, seed={seed}"
    assert torch.equal(out2, ref2), f"replay differs from the normal path, seed={seed}"
    for key in A.STAT_KEYS:
        assert torch.equal(st2[key], rst2[key]), f"{key}: {st2[key]} vs {rst2[key]}, seed={seed}"
    assert not torch.equal(out2, out1)  # the replay did read the new inputs
    assert _key_count() == 2  # a caller's out is part of the key (its strides are launch arguments)
    replays = L.Plan.replays
    out3 = sparge_attn(q, k, v, return_stats=True, **kw)[0]  # replay of the first plan, on new inputs
    assert L.Plan.replays == replays + 1
    assert torch.equal(out3, ref2)
    assert _key_count() == 2
    out4 = torch.full_like(q, float("nan"))
    out5, st5 = sparge_attn(q, k, v, return_stats=True, out=out4, **kw)  # replay of the second plan
    assert L.Plan.replays == replays + 2 and out5 is out4 and torch.equal(out4, ref2)
    assert all(torch.equal(st5[key], rst2[key]) for key in A.STAT_KEYS)


def test_replay_gqa_and_uneven_lengths_and_no_stats():
    seed = _seed()
    A._PLANS.clear()
    kw = dict(mode="topk", topk=0.5)
    for i in range(3):
        q, k, v = _inputs(seed + i, "HND", dtype=torch.float16, n=N // 2 + 7, nk=NK - 5, h=2 * H, hk=HK)
        out = sparge_attn(q, k, v, **kw)
        ref = _normal(q, k, v, kw)[0]
        assert torch.equal(out, ref), f"call {i}, seed={seed}"
    assert _key_count() == 1


def test_key_separates_options_and_knobs():
    seed = _seed()
    A._PLANS.clear()
    q, k, v = _inputs(seed, "HND")
    a = sparge_attn(q, k, v, mode="topk", topk=0.5)
    b = sparge_attn(q, k, v, mode="topk", topk=0.25)
    assert _key_count() == 2 and not torch.equal(a, b)
    assert torch.equal(sparge_attn(q, k, v, mode="topk", topk=0.25), b)
    A.PREP_WARPS["v"] *= 2  # a benchmark knob: a new key, the same result
    try:
        assert torch.equal(sparge_attn(q, k, v, mode="topk", topk=0.25), b)
        assert _key_count() == 3
    finally:
        A.PREP_WARPS["v"] //= 2


def test_calls_without_a_plan():
    seed = _seed()
    A._PLANS.clear()
    q, k, v = _inputs(seed, "HND")
    # a one-element threshold tensor and (on the CPU) per-head tensors: no key, the normal path
    sparge_attn(q, k, v, mode="topk", topk=torch.tensor(0.5))
    sparge_attn(q, k, v, mode="topk", topk=torch.full((H,), 0.5, device="cpu"))
    assert _key_count() == 0
    # B*H*Nq*Nk above 2^36: no key (its GPU time hides the host time; a replay would hold the score map,
    # > 32 MiB, through the attention)
    big = torch.empty(1, 1, 270000, 64, dtype=torch.bfloat16, device=DEV)
    assert A._plan_key(big, big, big, None, "HND", None, False, "topk", (0.98, None, 0.5, None), None, False,
                       "auto") is None
    assert A._plan_key(big[:, :, :250000], big, big, None, "HND", None, False, "topk", (0.98, None, 0.5, None),
                       None, False, "auto") is not None
    # the same tensor as k and v: the recording cannot tell them apart, so no plan for that key
    out = sparge_attn(q, k, k, mode="topk", topk=0.5)
    assert torch.equal(out, _normal(q, k, k, dict(mode="topk", topk=0.5))[0])
    assert list(A._PLANS.values()) == [None]


def test_recorder_refuses_unknown_tensors():
    a, b = torch.empty(64), torch.empty(64)
    with L.Recorder([a, None]) as rec:
        buf = L.new_buffer((16,), torch.float32, "cpu")
    rec.launches.append((None, (1,), (a, buf[4:], 3), {}, None, ()))
    assert rec.plan() is not None  # an input and a view inside a recorded buffer are placed
    rec.launches.append((None, (1,), (b,), {}, None, ()))
    assert rec.plan() is None  # a tensor that is neither
    with L.Recorder([a, a]) as rec2:
        pass
    assert rec2.plan() is None  # two inputs at one address


@pytest.mark.skipif(not ON_GPU, reason="per-head threshold tensors are planned on a GPU only")
def test_replay_per_head_thresholds_on_gpu():
    seed = _seed()
    A._PLANS.clear()
    topk = torch.linspace(0.2, 0.9, H, device=DEV)
    pv = torch.full((H,), 8.0, device=DEV)
    pv[0] = float("inf")
    kw = dict(mode="topk", topk=topk, pv_threshold=pv, sim_threshold=torch.full((H,), -0.1, device=DEV))
    for i in range(3):
        q, k, v = _inputs(seed + i, "HND")
        topk.copy_(torch.rand(H, device=DEV) * 0.8 + 0.1)  # new values, same tensor: read at launch time
        out, st = sparge_attn(q, k, v, return_stats=True, **kw)
        ref, rst = _normal(q, k, v, kw)
        assert torch.equal(out, ref) and torch.equal(st["density"], rst["density"]), f"call {i}, seed={seed}"
    assert _key_count() == 1
    assert isinstance(next(iter(A._PLANS.values())), L.Plan)


@pytest.mark.skipif(not ON_GPU, reason="host-sync check needs a CUDA GPU")
def test_replay_makes_no_host_sync():
    A._PLANS.clear()
    q, k, v = _inputs(_seed(), "NHD")
    kw = dict(layout="NHD", mode="cdf", cdf_threshold=0.9, pv_threshold=8.0, keep_ranges=[(0, 256)], return_stats=True)
    sparge_attn(q, k, v, **kw)  # recorded (compilation, first allocations)
    replays = L.Plan.replays
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            sparge_attn(q, k, v, **kw)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert L.Plan.replays == replays + 3


@pytest.mark.skipif(not ON_GPU, reason="allocations are measured on a GPU")
def test_a_plan_keeps_no_buffer_of_the_recorded_call():
    A._PLANS.clear()
    q, k, v = _inputs(_seed(), "HND")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    out = sparge_attn(q, k, v, mode="topk", topk=0.5)  # recorded
    del out
    torch.cuda.synchronize()
    assert _key_count() == 1
    assert torch.cuda.memory_allocated() == before  # the workspace and every recorded buffer were freed


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("pv", ["auto", "fp16"])
def test_replay_reuses_arguments_only_for_the_same_addresses(pv, direct, monkeypatch):
    """A replay on the addresses of the replay before reuses its argument lists (GPU); any other
    address rebuilds them. Alternating between two input sets, each call must match the normal path,
    and an in-place change of an input must show (the arguments are addresses, not copies). With
    ``Plan.direct`` (GPU) the kept lists are the C launch function's, TMA descriptors encoded once: every
    launch of the Triton 3.6 launcher must take that path, so it is what this test checks."""
    monkeypatch.setattr(L.Plan, "direct", direct)
    seed = _seed()
    A._PLANS.clear()
    kw = dict(mode="topk", topk=0.5, sim_threshold=-1.0, pv_dtype=pv)
    x = _inputs(seed, "HND")
    y = _inputs(seed + 1, "HND")
    sparge_attn(*x, **kw)  # recorded
    plan = next(iter(A._PLANS.values()))
    assert isinstance(plan, L.Plan)
    if ON_GPU and direct:
        assert all(r.direct is not None for r in plan.launches), [str(r.fn) for r in plan.launches if r.direct is None]
    for i, (q, k, v) in enumerate([x, x, y, y, x]):
        if i == 4:
            v.mul_(-1.0)  # same addresses as the call before the last two, new values
        out = sparge_attn(q, k, v, **kw)
        ref = _normal(q, k, v, kw)[0]
        assert torch.equal(out, ref), f"call {i}, seed={seed}"
        if ON_GPU:
            assert plan._last is not None and plan._last[0][:3] == (q.data_ptr(), k.data_ptr(), v.data_ptr())
