"""The CogVideoX glue's pure logic, without ComfyUI or the wrapper (runs in CI).

The copy mechanics are tested on a small module tree with the wrapper's shape (pipeline ->
``transformer.transformer_blocks[i].attn1.processor.attn_func``, text tokens first, (B, H, N, D)
attention, (B, T, C, H, W) latents). It stands in for the wrapper only in these unit tests; the real
wrapper, diffusers and ComfyUI are exercised by tests/test_nodes_cogvideox_wrapper.py.
"""

import functools
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparge_pack import kernels  # imported while conftest's TRITON_INTERPRET=1 holds, so Triton interprets
from sparge_pack.nodes import cogvideox as cx
from sparge_pack.nodes import override as ov
from sparge_pack.nodes.hilbert import sequence_permutation
from sparge_pack.nodes.stats import RunStats

TEXT = 6
HEADS, HEAD_DIM = 2, 16
LATENT = (1, 3, 4, 8, 12)  # (B, T, C, H, W) -> grid (3, 4, 6) with patch 2


class FakeKernel:
    """Exact attention with ``kernels.sparge_attn``'s signature; records every call."""

    def __init__(self, reason=None):
        self.calls = []
        self.api = ov.KernelAPI(self.attn, lambda device: reason, range(1, 257))

    def attn(self, q, k, v, *, layout, scale, keep_ranges, return_stats, **options):
        assert layout == "HND" and return_stats
        self.calls.append(dict(q=q, keep_ranges=keep_ranges, **options))
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)
        return out, {"density": torch.full((q.shape[1],), options["topk"]), "pv_skipped": torch.zeros(q.shape[1])}


# ---- a small model with the wrapper's structure ----

def sdpa(q, k, v, is_causal=False, attn_mask=None):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)


def merged_sdpa(q, k, v, is_causal=False, attn_mask=None):
    """Like the wrapper's attention_mode="comfy": returns (B, N, H*D)."""
    out = sdpa(q, k, v, is_causal, attn_mask)
    return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)


class Processor:
    def __init__(self, attn_func, attention_mode):
        self.attn_func, self.attention_mode = attn_func, attention_mode

    def __call__(self, attn, hidden_states, encoder_hidden_states):
        n_text = encoder_hidden_states.shape[1]
        x = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        b, n, _ = x.shape
        q, k, v = (f(x).view(b, n, attn.heads, -1).transpose(1, 2) for f in (attn.to_q, attn.to_k, attn.to_v))
        out = self.attn_func(q, k, v, attn_mask=None, is_causal=False)
        if self.attention_mode != "comfy":
            out = out.transpose(1, 2).reshape(b, n, -1)
        out = attn.to_out(out)
        return out[:, n_text:], out[:, :n_text]


class Attention(nn.Module):
    def __init__(self, dim, heads, processor):
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v, self.to_out = (nn.Linear(dim, dim) for _ in range(4))
        self.processor = processor

    def forward(self, hidden_states, encoder_hidden_states):
        return self.processor(self, hidden_states, encoder_hidden_states)


class Block(nn.Module):
    def __init__(self, dim, heads, mode):
        super().__init__()
        self.attn1 = Attention(dim, heads, Processor(merged_sdpa if mode == "comfy" else sdpa, mode))
        self.cached_hidden_states = []

    def forward(self, hidden_states, encoder_hidden_states):
        a, e = self.attn1(hidden_states, encoder_hidden_states)
        return hidden_states + a, encoder_hidden_states + e


class Transformer(nn.Module):
    """Patchifies (B, T, C, H, W) like CogVideoX 1.0: tokens row-major over (t, h/2, w/2), text first."""

    def __init__(self, layers=2, mode="sdpa", channels=4):
        super().__init__()
        dim = HEADS * HEAD_DIM
        self.config = SimpleNamespace(patch_size=2, patch_size_t=None)
        self.proj_in = nn.Linear(channels * 4, dim)
        self.text_proj = nn.Linear(8, dim)
        self.transformer_blocks = nn.ModuleList(Block(dim, HEADS, mode) for _ in range(layers))
        self.proj_out = nn.Linear(dim, channels * 4)

    def forward(self, hidden_states, encoder_hidden_states, timestep, return_dict=False):
        b, t, c, h, w = hidden_states.shape
        x = hidden_states.reshape(b, t, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4, 6).reshape(b, -1, c * 4)
        x, e = self.proj_in(x), self.text_proj(encoder_hidden_states)
        for block in self.transformer_blocks:
            x, e = block(x, e)
        out = self.proj_out(x).reshape(b, t, h // 2, w // 2, c, 2, 2).permute(0, 1, 4, 2, 5, 3, 6)
        return (out.reshape(b, t, c, h, w),)


class Pipeline:
    """Loops over timesteps, one transformer call per step with cond and uncond batched."""

    def __init__(self, transformer):
        self.transformer = transformer
        self.scheduler = SimpleNamespace(alphas_cumprod=torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0))

    def __call__(self, timesteps, latent, text):
        x = latent
        for t in timesteps:
            pred = self.transformer(hidden_states=torch.cat([x, x]), encoder_hidden_states=text,
                                    timestep=torch.tensor(float(t)).expand(2))[0]
            x = x - 0.1 * pred.chunk(2)[0]
        return x


def make_model(mode="sdpa", layers=2, seed=0):
    torch.manual_seed(seed)
    return {"pipe": Pipeline(Transformer(layers, mode)), "dtype": torch.float32, "model_name": "toy"}


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(LATENT, generator=g), torch.randn(2, TEXT, 8, generator=g)


def patch(model, kernel=None, **options):
    options = {"min_tokens": 0, "dense_blocks": "", **options}
    return cx.apply_sparge_cogvideox(model, kernel=kernel.api if kernel else None, **options)


def attn_funcs(model):
    return [b.attn1.processor.attn_func for b in model["pipe"].transformer.transformer_blocks]


# ---- pure helpers ----

def test_latent_grid_follows_the_patch_embedding():
    assert cx.latent_grid((2, 13, 16, 60, 90), 2) == (13, 30, 45)  # 720x480, 49 frames: 17 550 tokens
    assert cx.latent_grid((1, 22, 16, 96, 170), 2, 2) == (11, 48, 85)  # CogVideoX 1.5: 2 frames per token
    with pytest.raises(ValueError, match="B, T, C, H, W"):
        cx.latent_grid((1, 16, 60, 90), 2)


def test_noise_levels_match_comfyui_discrete_sampling():
    alphas = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    levels = cx.NoiseLevels(alphas)
    for t in (0, 250, 999):
        assert levels.sigma(t) == pytest.approx(math.sqrt((1 - alphas[t]) / alphas[t]), rel=1e-9)
    s1, s2 = levels.sigma(10), levels.sigma(11)  # log-linear in between, as ComfyUI's ModelSamplingDiscrete
    assert levels.sigma(10.5) == pytest.approx(math.sqrt(s1 * s2), rel=1e-9)
    assert levels.percent_to_sigma(0.0) == math.inf and levels.percent_to_sigma(1.0) == 0.0
    assert levels.percent_to_sigma(0.2) == pytest.approx(levels.sigma(0.8 * 999), rel=1e-12)
    assert levels.percent_to_sigma(0.2) > levels.percent_to_sigma(0.5)
    zsnr = alphas.clone()
    zsnr[-1] = 0.0  # CogVideoX's rescale_betas_zero_snr: ComfyUI's finite stand-in for the last step
    assert cx.NoiseLevels(zsnr).sigma(999) == pytest.approx(math.sqrt((1 - cx.ZSNR_ALPHA_BAR) / cx.ZSNR_ALPHA_BAR))


# ---- the attention function ----

def qkv(b=2, n=TEXT + 72, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, HEADS, n, HEAD_DIM, generator=g) for _ in range(3)]


def attention(kernel=None, layer=0, merged=False, grid=(3, 4, 6), sigma=None, **cfg):
    cfg.setdefault("min_tokens", 0)
    state = ov.SpargeState(ov.SpargeConfig(**cfg), cx.TEXT_FIRST, kernel.api if kernel else None)
    state.begin_step(sigma)
    state.set_latent(grid)
    return cx.CogVideoXAttention(state, layer, merged_sdpa if merged else sdpa, merged), state


@pytest.mark.parametrize("order", ["row-major", "hilbert"])
@pytest.mark.parametrize("merged", [False, True])
def test_sparse_call_keeps_text_and_returns_the_original_layout(order, merged):
    kernel = FakeKernel()
    fn, state = attention(kernel, merged=merged, token_order=order, topk=0.4)
    q, k, v = qkv()
    out = fn(q, k, v, attn_mask=None, is_causal=False)
    expected = (merged_sdpa if merged else sdpa)(q, k, v)
    assert out.shape == expected.shape and torch.allclose(out, expected, atol=1e-5)
    call = kernel.calls[0]
    assert call["keep_ranges"] == [(0, TEXT)] and call["topk"] == 0.4
    if order == "hilbert":  # video tokens reordered, text in place
        perm, _ = sequence_permutation((3, 4, 6), TEXT, q.shape[2], q.device)
        assert torch.equal(call["q"], q.index_select(2, perm)) and not torch.equal(call["q"], q)
    else:
        assert torch.equal(call["q"], q)
    step = state._step.flush(0, None)
    assert step.sparse_calls == 1 and list(step.layers) == ["block.0"]


@pytest.mark.parametrize("case, cfg, call_kw, category", [
    ("mask", {}, {"attn_mask": torch.zeros(1, 1, TEXT + 72, TEXT + 72)}, ov.MASK),
    ("causal", {}, {"is_causal": True}, ov.MASK),
    ("dense block", {"dense_blocks": frozenset({1})}, {}, ov.DENSE_BLOCK),
    ("min tokens", {"min_tokens": 1000}, {}, ov.MIN_TOKENS),
    ("window", {"sigma_start": 1.0, "sigma_end": 0.5}, {}, ov.WINDOW),
])
def test_dense_reasons_call_the_original_function(case, cfg, call_kw, category):
    kernel = FakeKernel()
    fn, state = attention(kernel, layer=1, sigma=2.0, **cfg)
    q, k, v = qkv()
    out = fn(q, k, v, **call_kw)
    mask = call_kw.get("attn_mask")
    assert torch.equal(out, sdpa(q, k, v, call_kw.get("is_causal", False), mask))
    assert kernel.calls == [] and dict(state._step._dense) == {category: 1}


def test_unknown_grid_or_no_kernel_stays_dense_with_a_reason():
    fn, state = attention(FakeKernel(), grid=None)
    q, k, v = qkv()
    fn(q, k, v)
    assert dict(state._step._dense) == {ov.LAYOUT: 1}
    fn, state = attention(FakeKernel(reason="not CUDA (tensors are on cpu)"))
    fn(q, k, v)
    assert dict(state._step._dense) == {ov.NOT_CUDA: 1}


def test_real_kernel_at_full_density_matches_within_quantization_noise():
    """The Triton kernel (interpreter on CPU) behind the CogVideoX attention function."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    why = kernels.unavailable_reason(torch.device(device))
    if why is not None:
        pytest.skip(f"kernel not runnable here: {why}")
    fn, state = attention(None, token_order="hilbert", topk=1.0, grid=(2, 8, 8))
    q, k, v = (t.to(device) for t in qkv(b=1, n=TEXT + 128, seed=3))
    out = fn(q, k, v)
    ref = sdpa(q, k, v)
    rel = ((out - ref).abs().sum() / ref.abs().sum()).item()
    assert 0 < rel < 0.08, rel  # INT8 Q·Kᵀ and FP8 P·V rounding only
    step = state._step.flush(0, None)
    assert step.sparse_calls == 1 and step.density == pytest.approx(1.0)


# ---- the copy ----

def test_the_copy_has_its_own_attention_and_leaves_the_original_untouched():
    model = make_model()
    pipe, transformer = model["pipe"], model["pipe"].transformer
    before = attn_funcs(model)
    hooks_before = dict(transformer._forward_pre_hooks)
    patched, state = patch(model, FakeKernel())
    assert attn_funcs(model) == before and dict(transformer._forward_pre_hooks) == hooks_before
    assert type(pipe) is Pipeline and pipe.transformer is transformer and "spargeattn" not in model
    new = patched["pipe"].transformer
    assert new is not transformer and new.transformer_blocks is not transformer.transformer_blocks
    for i, (a, b) in enumerate(zip(transformer.transformer_blocks, new.transformer_blocks, strict=True)):
        assert a is not b and a.attn1 is not b.attn1 and a.attn1.processor is not b.attn1.processor
        assert b.attn1.to_q is a.attn1.to_q and b.attn1.to_q.weight is a.attn1.to_q.weight  # weights shared
        assert b.cached_hidden_states is not a.cached_hidden_states
        func = b.attn1.processor.attn_func
        assert isinstance(func, cx.CogVideoXAttention) and func.layer == i and func.original is sdpa
    assert new.proj_in is transformer.proj_in
    assert isinstance(patched["pipe"], Pipeline) and patched["model_name"] == "toy"
    assert patched["spargeattn"].state is state


def test_patched_sampling_runs_sparse_while_the_original_still_samples_as_before():
    model = make_model()
    latent, text = inputs()
    timesteps = [900, 500, 100]
    reference = model["pipe"](timesteps, latent, text)
    kernel = FakeKernel()
    patched, state = patch(model, kernel, topk=0.5)
    out = patched["pipe"](timesteps, latent, text)
    assert torch.allclose(out, reference, atol=1e-5)  # the fake kernel is exact
    assert len(kernel.calls) == 3 * 2 and all(c["keep_ranges"] == [(0, TEXT)] for c in kernel.calls)
    assert torch.equal(model["pipe"](timesteps, latent, text), reference)
    assert len(kernel.calls) == 6  # the original never reaches our kernel
    run = state.last_run
    assert [s.sparse_calls for s in run.steps] == [2, 2, 2] and set(run.steps[0].layers) == {"block.0", "block.1"}
    levels = cx.NoiseLevels(model["pipe"].scheduler.alphas_cumprod)
    assert [s.sigma for s in run.steps] == pytest.approx([levels.sigma(t) for t in timesteps])


def test_window_in_percent_and_steps_per_timestep():
    model = make_model()
    latent, text = inputs()
    kernel = FakeKernel()
    patched, state = patch(model, kernel, start_percent=0.2, end_percent=0.8)
    runs: list[RunStats] = []
    patched["spargeattn"].run_listeners.append(runs.append)
    # 900 and 950 are before 20% of the schedule (t > 0.8 * 999), 100 after 80% (t < 0.2 * 999)
    patched["pipe"]([950, 900, 500, 500, 100], latent, text)
    steps = runs[0].steps
    assert len(steps) == 4  # the two calls at t=500 (context windows) are one step
    assert [s.sparse_calls for s in steps] == [0, 0, 4, 0]
    assert steps[0].dense_calls == {ov.WINDOW: 2} and steps[3].dense_calls == {ov.WINDOW: 2}
    assert state.last_run is runs[0] and len(runs) == 1


def test_a_scheduler_without_noise_levels_keeps_every_step_in_the_window(caplog):
    model = make_model()
    model["pipe"].scheduler = SimpleNamespace()
    latent, text = inputs()
    patched, state = patch(model, FakeKernel(), start_percent=0.5)
    patched["pipe"]([900, 100], latent, text)
    assert [s.sigma for s in state.last_run.steps] == [None, None]
    assert [s.sparse_calls for s in state.last_run.steps] == [2, 2]
    assert "start/end percent cannot be placed" in caplog.text


def test_comfy_attention_mode_gets_merged_heads_back():
    model = make_model("comfy")
    latent, text = inputs()
    reference = model["pipe"]([500], latent, text)
    patched, _ = patch(model, FakeKernel())
    assert all(f.merged_heads for f in attn_funcs(patched))
    assert torch.allclose(patched["pipe"]([500], latent, text), reference, atol=1e-5)


def test_patching_a_patched_model_replaces_the_settings():
    model = make_model()
    latent, text = inputs()
    first, second = FakeKernel(), FakeKernel()
    patched1, state1 = patch(model, first, topk=0.3)
    patched2, state2 = patch(patched1, second, topk=0.7)
    assert all(f.original is sdpa for f in attn_funcs(patched2))
    assert len(patched2["pipe"].transformer._forward_pre_hooks) == 1
    patched2["pipe"]([500], latent, text)
    assert first.calls == [] and len(second.calls) == 2 and state1.last_run is None
    assert state2.last_run.totals()["sparse_calls"] == 2
    patched1["pipe"]([500], latent, text)  # the first copy keeps its own settings
    assert [c["topk"] for c in first.calls] == [0.3, 0.3]


def test_instance_forward_bound_to_the_original_is_rebound():
    """Offload hooks (accelerate) store ``forward = partial(new_forward, module)`` on the instance."""
    model = make_model()
    transformer = model["pipe"].transformer
    seen = []

    def new_forward(module, *args, **kwargs):
        seen.append(module)
        return module._old_forward(*args, **kwargs)

    transformer._old_forward = transformer.forward
    transformer.forward = functools.partial(new_forward, transformer)
    latent, text = inputs()
    kernel = FakeKernel()
    patched, _ = patch(model, kernel)
    patched["pipe"]([500], latent, text)
    copy = patched["pipe"].transformer
    assert seen == [copy] and len(kernel.calls) == 2
    assert transformer.forward.args[0] is transformer and transformer._old_forward.__self__ is transformer


def test_compiled_blocks_are_compiled_again_around_the_copy():
    model = make_model()
    blocks = model["pipe"].transformer.transformer_blocks
    for i, block in enumerate(blocks):
        blocks[i] = torch.compile(block, backend="eager")
    latent, text = inputs()
    reference = model["pipe"]([500], latent, text)
    kernel = FakeKernel()
    patched, _ = patch(model, kernel)
    new = patched["pipe"].transformer.transformer_blocks
    assert all(type(b) is type(blocks[0]) and b._orig_mod is not blocks[i]._orig_mod for i, b in enumerate(new))
    assert all(isinstance(b._orig_mod.attn1.processor.attn_func, cx.CogVideoXAttention) for b in new)
    assert torch.allclose(patched["pipe"]([500], latent, text), reference, atol=1e-5)
    assert len(kernel.calls) == 2
    assert all(b._orig_mod.attn1.processor.attn_func is sdpa for b in blocks)


def test_bad_input_names_the_fix():
    with pytest.raises(ValueError, match="COGVIDEOMODEL"):
        cx.apply_sparge_cogvideox({"samples": torch.zeros(1)})
    model = make_model()
    model["pipe"].transformer.transformer_blocks[1].attn1.processor = object()
    with pytest.raises(ValueError, match="block 1 .*attn_func"):
        patch(model)
    with pytest.raises(ValueError, match="start_percent"):
        patch(make_model(), start_percent=0.8, end_percent=0.2)
