"""The override's pure logic, without ComfyUI: eligibility and reasons, chaining, stats, layouts.

A fake kernel (exact SDPA that records its arguments) is injected through ``KernelAPI``; the real
kernel and the real ComfyUI are exercised by tests/test_comfy_*.py.
"""

import copy
import logging

import pytest
import torch
import torch.nn.functional as F

from sparge_pack.kernels.reference import apply_rope
from sparge_pack.nodes import override as ov
from sparge_pack.nodes.adapters import TEXT_FIRST, VIDEO
from sparge_pack.nodes.hilbert import sequence_permutation


class FakeKernel:
    """Exact attention with the kernel's signature; records every call."""

    def __init__(self, head_dims=tuple(range(1, 257)), reason=None):
        self.calls = []
        self.reason = reason
        self.api = ov.KernelAPI(self.attn, lambda device: self.reason, head_dims)

    def attn(self, q, k, v, *, layout, scale, keep_ranges, return_stats, **options):
        self.calls.append(dict(q=q, layout=layout, scale=scale, keep_ranges=keep_ranges, **options))
        t = (lambda x: x) if layout == "HND" else (lambda x: x.transpose(1, 2))
        out = t(F.scaled_dot_product_attention(t(q), t(k), t(v), scale=scale))
        h = q.shape[1] if layout == "HND" else q.shape[2]
        return out, {"density": torch.full((h,), 0.25 * len(self.calls)), "pv_skipped": torch.zeros(h)}


def dense_backend(calls):
    """Stands in for ComfyUI's default backend ``func``: exact attention, records its kwargs."""

    def func(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False,
             **kwargs):
        calls.append(kwargs)
        if not skip_reshape:
            b, n, hd = q.shape
            q, k, v = (t.view(b, t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out if skip_output_reshape else out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)

    return func


def make(family=VIDEO, kernel=None, **cfg):
    cfg.setdefault("min_tokens", 0)
    state = ov.SpargeState(ov.SpargeConfig(**cfg), family, kernel.api if kernel else None)
    state.begin_run()
    state.begin_step(0.5)
    return state


def call(state, q, k, v, heads, previous=None, func_calls=None, **kw):
    func_calls = [] if func_calls is None else func_calls
    options = kw.pop("transformer_options", {})
    o = {"transformer_options": options, "_inside_attn_wrapper": True}
    return ov.SpargeOverride(state, previous)(dense_backend(func_calls), q, k, v, heads, **kw, **o)


def qkv(b=1, h=2, n=40, d=16, layout="NHD", nk=None):
    nk = n if nk is None else nk
    shape = lambda m: (b, h, m, d) if layout == "HND" else (b, m, h * d)  # noqa: E731
    return torch.randn(shape(n)), torch.randn(shape(nk)), torch.randn(shape(nk))


def reasons(state):
    return state._step._dense


@pytest.mark.parametrize("case,kwargs,category", [
    ("mask", dict(mask=torch.zeros(1, 1, 40)), ov.MASK),
    ("low precision", dict(low_precision_attention=False), ov.LOW_PRECISION),
    ("gqa", dict(enable_gqa=True), ov.GQA),
])
def test_call_level_reasons(case, kwargs, category):
    k = FakeKernel()
    state = make(kernel=k)
    q, kk, v = qkv()
    call(state, q, kk, v, 2, **kwargs)
    assert reasons(state) == {category: 1} and not k.calls


def test_cross_attention_stays_dense_with_its_reason():
    k = FakeKernel()
    state = make(kernel=k)
    q, kk, v = qkv(nk=512)
    out = call(state, q, kk, v, 2)
    assert reasons(state) == {ov.CROSS: 1} and not k.calls
    assert out.shape == q.shape


def test_sigma_window_dense_blocks_and_min_tokens():
    k = FakeKernel()
    state = make(kernel=k, sigma_start=0.9, sigma_end=0.6, dense_blocks=frozenset({0}), min_tokens=41)
    q, kk, v = qkv()
    call(state, q, kk, v, 2, transformer_options={"block_index": 3})
    assert reasons(state) == {ov.WINDOW: 1}
    state.begin_step(0.7)
    call(state, q, kk, v, 2, transformer_options={"block_index": 0, "block_type": "double"})
    call(state, q, kk, v, 2, transformer_options={"block_index": 3})
    assert reasons(state) == {ov.DENSE_BLOCK: 1, ov.MIN_TOKENS: 1}
    assert not k.calls


def test_head_dim_dtype_and_layout_reasons():
    state = make(kernel=FakeKernel(head_dims=(64, 128)))
    call(state, *qkv(d=16), 2)
    assert reasons(state) == {ov.HEAD_DIM: 1}
    state = make(kernel=FakeKernel())
    call(state, *(t.double() for t in qkv()), 2)
    assert reasons(state) == {ov.DTYPE: 1}
    state = make(family="unknown", kernel=FakeKernel())
    state.set_latent((1, 4, 8))  # 32 image tokens of 40: where the text is is unknown
    call(state, *qkv(), 2)
    assert reasons(state) == {ov.LAYOUT: 1}


def test_not_cuda_with_the_real_kernel_module(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    state = make()
    func_calls = []
    q, k, v = qkv()
    out = call(state, q, k, v, 2, func_calls=func_calls)
    assert reasons(state) == {ov.NOT_CUDA: 1}
    assert torch.equal(out, dense_backend([])(q, k, v, 2))


def test_kernel_unavailable_on_a_cuda_device_is_its_own_category():
    state = make(kernel=FakeKernel(reason="GPU sm_75 is older than sm_80"))
    why = state._device_reason(torch.device("cuda", 0))
    assert why.category == ov.KERNEL and "sm_80" in why.detail


@pytest.mark.parametrize("skip_reshape,skip_output_reshape", [(False, False), (True, False), (True, True),
                                                              (False, True)])
def test_sparse_path_layouts(skip_reshape, skip_output_reshape):
    k = FakeKernel()
    state = make(kernel=k, mode="cdf", cdf_threshold=0.9)
    q, kk, v = qkv(layout="HND" if skip_reshape else "NHD")
    ref = dense_backend([])(q, kk, v, 2, skip_reshape=skip_reshape, skip_output_reshape=skip_output_reshape)
    out = call(state, q, kk, v, 2, skip_reshape=skip_reshape, skip_output_reshape=skip_output_reshape, scale=None)
    torch.testing.assert_close(out, ref)
    (c,) = k.calls
    assert c["layout"] == ("HND" if skip_reshape else "NHD") and c["mode"] == "cdf" and c["cdf_threshold"] == 0.9
    assert c["pv_threshold"] is None and not reasons(state)


@pytest.mark.parametrize("skip_output_reshape", [False, True])
def test_the_real_kernel_writes_the_output_in_the_callers_token_order(skip_output_reshape):
    """(B, H, N, D) inputs whose output goes back as (B, N, H*D) (Flux, HunyuanVideo): the kernel writes
    token-major memory, so the final reshape is a view, not a copy; the values are the kernel's own."""
    from sparge_pack.kernels import sparge_attn

    state = make(mode="topk", topk=0.5)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    q, kk, v = (t.to(dev, torch.bfloat16) for t in qkv(h=2, n=300, d=64, layout="HND"))
    out = call(state, q, kk, v, 2, skip_reshape=True, skip_output_reshape=skip_output_reshape)
    ref = sparge_attn(q, kk, v, layout="HND", **state.config.kernel_options())
    assert not reasons(state)
    if skip_output_reshape:
        assert torch.equal(out, ref)
    else:
        assert out.shape == (1, 300, 128) and out._base is not None  # a view of what the kernel wrote
        assert torch.equal(out, ref.transpose(1, 2).reshape(1, 300, 128))


def test_text_tokens_are_protected_for_joint_attention():
    k = FakeKernel()
    state = make(family=TEXT_FIRST, kernel=k)
    state.set_latent((1, 4, 8))  # 32 image tokens after 8 text tokens
    call(state, *qkv(layout="HND"), 2, skip_reshape=True)
    assert k.calls[-1]["keep_ranges"] == [(0, 8)]
    state = make(family=TEXT_FIRST, kernel=k, protect_text=False)
    state.set_latent((1, 4, 8))
    call(state, *qkv(layout="HND"), 2, skip_reshape=True)
    assert k.calls[-1]["keep_ranges"] is None


def test_hilbert_order_permutes_the_grid_and_restores_the_output():
    k = FakeKernel()
    state = make(family=TEXT_FIRST, kernel=k, token_order="hilbert")
    state.set_latent((2, 4, 4))  # 32 grid tokens after 8 text tokens
    q, kk, v = qkv(layout="HND")
    out = call(state, q, kk, v, 2, skip_reshape=True, skip_output_reshape=True)
    torch.testing.assert_close(out, dense_backend([])(q, kk, v, 2, skip_reshape=True, skip_output_reshape=True))
    perm, _ = sequence_permutation((2, 4, 4), 8, 40, torch.device("cpu"))
    assert torch.equal(k.calls[0]["q"], q.index_select(2, perm)) and not torch.equal(perm, torch.arange(40))


def test_dense_calls_chain_to_the_previous_override_with_all_kwargs():
    seen = []

    def previous(func, *args, **kwargs):
        seen.append(kwargs)
        return func(*args, **kwargs)

    func_calls = []
    state = make(kernel=FakeKernel())
    q, k, v = qkv(nk=12)
    call(state, q, k, v, 2, previous=previous, func_calls=func_calls, transformer_options={"x": 1}, scale=0.3)
    assert seen[0]["_inside_attn_wrapper"] is True and seen[0]["transformer_options"] == {"x": 1}
    assert seen[0]["scale"] == 0.3 and len(func_calls) == 1


def test_an_override_chained_below_ours_is_not_counted_twice():
    k = FakeKernel()
    state = make(kernel=k)
    inner = ov.SpargeOverride(state, None)
    later = []

    def later_node(func, *args, **kwargs):  # installed after us, chains to us
        later.append(1)
        return inner(func, *args, **kwargs)

    options = {"optimized_attention_override": later_node}
    ov.install(state, options)
    top = options["optimized_attention_override"]
    assert isinstance(top, ov.SpargeOverride) and top.previous is later_node
    q, kk, v = qkv(nk=12)
    top(dense_backend([]), q, kk, v, 2, transformer_options={}, _inside_attn_wrapper=True)
    assert later == [1] and reasons(state) == {ov.CROSS: 1}
    top(dense_backend([]), *qkv(), 2, transformer_options={}, _inside_attn_wrapper=True)
    assert len(k.calls) == 1 and later == [1]


def test_install_is_idempotent_and_deepcopy_keeps_the_state():
    state = make()
    options = {}
    ov.install(state, options)
    first = options["optimized_attention_override"]
    ov.install(state, options)
    assert options["optimized_attention_override"] is first and first.previous is None
    copied = copy.deepcopy({"transformer_options": options})
    assert copied["transformer_options"]["optimized_attention_override"] is first
    other = make()
    ov.install(other, options)
    assert options["optimized_attention_override"].previous is first


def test_statistics_per_step_and_run(caplog):
    k = FakeKernel()
    state = make(kernel=k, verbose=True)
    steps = []
    state.step_listeners.append(steps.append)
    q, kk, v = qkv()
    with caplog.at_level(logging.INFO, logger="spargeattn"):
        for sigma in (0.9, 0.5):
            state.begin_step(sigma)
            for block in (0, 1):
                call(state, q, kk, v, 2, transformer_options={"block_index": block, "block_type": "double"})
            call(state, *qkv(nk=7), 2)
            call(state, *qkv(nk=7), 2)
        run = state.end_run()
    assert len(steps) == 2 and run.steps == steps and state.last_run is run and not state.run.steps
    assert steps[0].sigma == 0.9 and steps[0].sparse_calls == 2 and steps[0].dense_calls == {ov.CROSS: 2}
    assert steps[1].layers["double.1"].density == [1.0, 1.0]  # the 4th kernel call reports 0.25 * 4
    assert steps[0].density == pytest.approx((0.25 + 0.5) / 2)
    assert run.totals()["dense_calls"] == {ov.CROSS: 4} and run.totals()["sparse_calls"] == 4
    messages = [r.getMessage() for r in caplog.records]
    assert sum("cross-attention" in m and "dense attention" in m for m in messages) == 1  # once per run
    assert sum(m.startswith("SpargeAttn: step ") for m in messages) == 2
    assert any("run finished: 2 steps, 4 sparse" in m for m in messages)


def test_two_states_keep_separate_settings_and_statistics():
    k1, k2 = FakeKernel(), FakeKernel()
    a, b = make(kernel=k1, topk=0.3), make(kernel=k2, topk=0.7)
    call(a, *qkv(), 2)
    call(b, *qkv(), 2)
    call(b, *qkv(), 2)
    assert [c["topk"] for c in k1.calls] == [0.3] and [c["topk"] for c in k2.calls] == [0.7, 0.7]
    assert a.end_run().totals()["sparse_calls"] == 1 and b.end_run().totals()["sparse_calls"] == 2


def test_config_validation_names_the_fix():
    with pytest.raises(ValueError, match="start_percent <= end_percent"):
        ov.SpargeConfig(sigma_start=0.2, sigma_end=0.8)
    with pytest.raises(ValueError, match="mode must be one of"):
        ov.SpargeConfig(mode="sparse")
    with pytest.raises(ValueError, match="topk must be in"):
        ov.SpargeConfig(topk=0.0)
    assert ov.SpargeConfig(pv_threshold=15).kernel_options()["pv_threshold"] == 15


def test_precision_chooses_the_pv_type():
    """'fast' leaves the P.V type to the kernel (FP8 where the GPU has it); 'accurate' asks for fp16, on the
    sparse calls of a tuned-thresholds run too (the same kernel call)."""
    for precision, want in (("fast", "auto"), ("accurate", "fp16")):
        k = FakeKernel()
        state = make(kernel=k, precision=precision)
        call(state, *qkv(layout="HND"), 2, skip_reshape=True)
        assert not reasons(state) and k.calls[-1]["pv_dtype"] == want, precision
    with pytest.raises(ValueError, match="precision must be one of .'fast', 'accurate'."):
        ov.SpargeConfig(precision="fp8")


def test_parse_dense_blocks():
    assert ov.parse_dense_blocks("0, 1, 47-49") == {0, 1, 47, 48, 49}
    assert ov.parse_dense_blocks(" ") == frozenset()
    assert ov.parse_dense_blocks("5-3;7") == {3, 4, 5, 7}
    with pytest.raises(ValueError, match="'0, 1, 47-49'"):
        ov.parse_dense_blocks("0, first")


# ------------------------------------------------------------------------------------- deferred RoPE
# ``flux_block`` replays what a ComfyUI Flux block does around attention (comfy.ldm.flux.layers /
# flux.math.attention) to test the override's side of the hand-over; the real blocks are exercised by
# tests/test_comfy_models.py.


def _rope(x, pe):
    """ComfyUI's formula (``kernels.reference.apply_rope``), in x's dtype."""
    return apply_rope(x, pe).to(x.dtype)


def _rotate_calls(log):
    def rotate(q, k, pe):  # stands in for comfy.ldm.flux.math.apply_rope (same formula)
        log.append((q, k))
        return _rope(q, pe), _rope(k, pe)
    return rotate


def _pe(n, d, b=1):
    a = torch.rand(b, 1, n, d // 2, dtype=torch.float32) * 50
    return torch.stack([a.cos(), -a.sin(), a.sin(), a.cos()], dim=-1).reshape(b, 1, n, d // 2, 2, 2)


def flux_block(state, q, k, v, pe, patches, func_calls, mask=None):
    options = {"patches": {"attn1_patch": patches}}
    ov.install(state, options)
    for p in patches:
        out = p(q, k, v, pe=pe, attn_mask=mask, extra_options=options.copy())
        q, k, v, pe = out.get("q", q), out.get("k", k), out.get("v", v), out.get("pe", pe)
    if pe is not None:
        q, k = _rope(q, pe), _rope(k, pe)
    return options["optimized_attention_override"](dense_backend(func_calls), q, k, v, 2, mask=mask, skip_reshape=True,
                                                   skip_output_reshape=True, transformer_options=options,
                                                   _inside_attn_wrapper=True)


def _flux_state(kernel, rotations, **cfg):
    state = make(TEXT_FIRST, kernel, protect_text=False, **cfg)
    state.rotate = _rotate_calls(rotations)
    return state


def _flux_case(**cfg):
    """(kernel, rotations, func_calls, state, q, k, v, pe) of one 40-token Flux-style call, head dim 16."""
    kernel, rotations, func_calls = FakeKernel(), [], []
    state = _flux_state(kernel, rotations, **cfg)
    q, k, v = qkv(layout="HND", d=16)
    return kernel, rotations, func_calls, state, q, k, v, _pe(40, 16)


def test_deferred_rope_reaches_the_kernel_unrotated():
    kernel, rotations, func_calls, state, q, k, v, pe = _flux_case()
    patch = ov.DeferredRope(state)
    flux_block(state, q, k, v, pe, [patch], func_calls)
    assert len(kernel.calls) == 1 and kernel.calls[0]["rope"] is pe and kernel.calls[0]["q"] is q
    assert rotations == [] and func_calls == [] and state._pending_rope is None


def test_deferred_rope_is_applied_before_a_dense_call():
    kernel, rotations, func_calls, state, q, k, v, pe = _flux_case(min_tokens=1000)  # 40 tokens: dense
    out = flux_block(state, q, k, v, pe, [ov.DeferredRope(state)], func_calls)
    qr, kr = _rope(q, pe), _rope(k, pe)
    assert kernel.calls == [] and len(rotations) == 1 and rotations[0][0] is q
    torch.testing.assert_close(out, F.scaled_dot_product_attention(qr, kr, v))
    assert reasons(state) == {ov.MIN_TOKENS: 1}


@pytest.mark.parametrize("case", ["later patch", "mask", "foreign override", "no rotate"])
def test_rope_stays_in_the_block_when_something_could_come_between(case):
    kernel, rotations, func_calls, state, q, k, v, pe = _flux_case()
    patches = [ov.DeferredRope(state)]
    mask = None
    if case == "later patch":
        patches.append(lambda q, k, v, **kw: {})
    elif case == "mask":
        mask = torch.zeros(1, 1, 40, 40)
    elif case == "foreign override":
        patches = [ov.DeferredRope(_flux_state(FakeKernel(), []))]
    else:
        state.rotate = None
    out = flux_block(state, q, k, v, pe, patches, func_calls, mask=mask)
    assert state._pending_rope is None and rotations == []
    assert all("rope" not in c for c in kernel.calls)
    qr, kr = _rope(q, pe), _rope(k, pe)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(qr, kr, v, attn_mask=mask))


def test_deferred_rope_turns_itself_off_when_a_call_bypassed_the_override(caplog):
    _, _, _, state, q, k, v, pe = _flux_case()
    assert state.defer_rope(q, k, pe)
    with caplog.at_level("WARNING", logger="spargeattn"):
        assert not state.defer_rope(q, k, pe)  # the first call never reached the override
    assert state.rope_off and "did not reach the SpargeAttn override" in caplog.text
    assert state.take_rope(q, k) is None and not state.defer_rope(q, k, pe)


def test_deferred_rope_passes_through_declared_pass_through_overrides():
    kernel, rotations, func_calls, state, q, k, v, pe = _flux_case()
    patch = ov.DeferredRope(state)
    options = {"patches": {"attn1_patch": [patch]}}
    ov.install(state, options)
    ours = options["optimized_attention_override"]

    def timer(func, *args, **kwargs):  # e.g. bench_e2e's attention timer
        return ours(func, *args, **kwargs)

    options["optimized_attention_override"] = timer
    assert patch(q, k, v, pe=pe, attn_mask=None, extra_options=options.copy()) == {}  # undeclared: kept
    timer.spargeattn_next = ours
    assert patch(q, k, v, pe=pe, attn_mask=None, extra_options=options.copy()) == {"pe": None}
    timer(dense_backend(func_calls), q, k, v, 2, skip_reshape=True, skip_output_reshape=True,
          transformer_options=options, _inside_attn_wrapper=True)
    assert kernel.calls[0]["rope"] is pe and state._pending_rope is None
