"""The patch node's glue inside a real ComfyUI (``COMFYUI_PATH``): tiny random-weight Flux, Wan 2.1 and
HunyuanVideo models built through ComfyUI's loader and sampled with ComfyUI's sampler on the CPU.

Where a test needs the sparse path on a CPU, a recording kernel (exact attention with the kernel's
signature) is injected into the patch's state; ComfyUI itself is always the real one.
"""

import pytest
import torch

from comfy_support import RecordingKernel, build_model, latent_for, require_comfy, sample

KINDS = ["flux", "wan", "hunyuan_video"]
# Tiny shapes: 8 text tokens; Flux 16x16 latent -> 8x8 grid; video 3x16x16 latent -> 3x8x8 grid.
EXPECTED = {
    "flux": dict(layout="HND", n=8 + 64, keep=[(0, 8)], grid=(1, 8, 8)),
    "wan": dict(layout="NHD", n=3 * 64, keep=None, grid=(3, 8, 8)),
    "hunyuan_video": dict(layout="HND", n=8 + 3 * 64, keep=[(0, 8)], grid=(3, 8, 8)),
}


@pytest.fixture(scope="module")
def comfy():
    require_comfy()
    from sparge_pack.nodes import override
    from sparge_pack.nodes.patch import apply_sparge

    return override, apply_sparge


@pytest.fixture(scope="module")
def models(comfy):
    return {kind: build_model(kind) for kind in KINDS}


def patch(comfy, model, kernel=None, **options):
    _, apply_sparge = comfy
    options = {"start_percent": 0.0, "dense_blocks": "", "min_tokens": 0, **options}
    return apply_sparge(model, kernel=kernel.api if kernel else None, **options)


@pytest.mark.parametrize("kind", KINDS)
def test_on_cpu_the_patched_model_runs_dense_and_matches_exactly(comfy, models, kind, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the kernel's CPU interpreter stays off
    override, _ = comfy
    model = models[kind]
    patched, state = patch(comfy, model)
    latent = latent_for(kind)
    reference = sample(model, kind, latent)
    out = sample(patched, kind, latent)
    assert torch.equal(out, reference)
    totals = state.last_run.totals()
    assert totals["sparse_calls"] == 0 and totals["dense_calls"][override.NOT_CUDA] > 0
    assert len(state.last_run.steps) == 2
    assert "optimized_attention_override" not in model.model_options.get("transformer_options", {})


@pytest.mark.parametrize("kind", KINDS)
def test_override_fires_for_self_attention_with_layout_and_text_range(comfy, models, kind):
    override, _ = comfy
    kernel = RecordingKernel(override)
    model = models[kind]
    patched, state = patch(comfy, model, kernel, topk=0.4, token_order="hilbert")
    latent = latent_for(kind)
    out = sample(patched, kind, latent)
    torch.testing.assert_close(out, sample(model, kind, latent), atol=1e-4, rtol=1e-4)
    exp = EXPECTED[kind]
    blocks = 2  # Flux and HunyuanVideo: one double + one single block; Wan: two blocks
    assert len(kernel.calls) == 2 * blocks  # 2 steps, cfg 1: one evaluation per step
    for c in kernel.calls:
        heads_first = c["shape"][1:3] == (2, exp["n"])
        assert c["layout"] == exp["layout"] and c["keep_ranges"] == exp["keep"] and c["topk"] == 0.4
        assert heads_first == (exp["layout"] == "HND")
    run = state.last_run
    assert run.totals()["sparse_calls"] == 2 * blocks
    assert set(run.steps[0].layers) == ({"double.0", "single.0"} if kind != "wan" else {"double.0", "double.1"})
    dense = run.totals()["dense_calls"]
    if kind == "wan":
        assert dense == {override.CROSS: 2 * blocks}  # text cross-attention stays dense with its reason
    elif kind == "hunyuan_video":
        # The two token-refiner blocks attend over the 8 text tokens only (2 steps x 2 blocks).
        assert dense == {override.LAYOUT: 4}
    else:
        assert dense == {}


@pytest.mark.parametrize("kind", ["flux", "hunyuan_video"])
@pytest.mark.parametrize("case", ["fused", "env off", "argument off", "later attn1_patch"])
def test_flux_family_rope_goes_into_the_kernel(comfy, models, kind, case, monkeypatch):
    """ComfyUI's Flux blocks hand ``pe`` to our attn1_patch: sparse calls get q and k unrotated plus ``rope``
    (the recording kernel rotates them as the real one does), and the sample matches the unpatched one.
    Off with SPARGEATTN_FUSE_ROPE=0 or ``apply_sparge(fuse_rope=False)``, and when another attn1_patch runs
    after ours."""
    override, _ = comfy
    if case == "env off":
        monkeypatch.setenv("SPARGEATTN_FUSE_ROPE", "0")
    kernel = RecordingKernel(override)
    model = models[kind]
    patched, state = patch(comfy, model, kernel, topk=0.4, **({"fuse_rope": False} if case == "argument off" else {}))
    seen = []
    if case == "later attn1_patch":
        patched.set_model_attn1_patch(lambda q, k, v, pe=None, **kw: seen.append(pe is not None) or {})
    latent = latent_for(kind)
    out = sample(patched, kind, latent)
    torch.testing.assert_close(out, sample(model, kind, latent), atol=1e-4, rtol=1e-4)
    assert len(kernel.calls) == 4
    assert {c["rope"] for c in kernel.calls} == {case == "fused"}
    assert state.rope_off is None and state._pending_rope is None
    if case == "later attn1_patch":
        assert seen == [True] * 4  # the later patch still saw pe


def test_cross_attention_reason_reaches_the_verbose_log(comfy, models, caplog):
    override, _ = comfy
    patched, _ = patch(comfy, models["wan"], RecordingKernel(override), verbose=True)
    with caplog.at_level("INFO", logger="spargeattn"):
        sample(patched, "wan", latent_for("wan"))
    messages = [r.getMessage() for r in caplog.records]
    assert sum("dense attention: cross-attention: 192 queries, 8 keys" in m for m in messages) == 1
    assert any("sparse attention: 192 tokens, 2 heads x 128, layout NHD" in m for m in messages)
    assert any("run finished: 2 steps, 4 sparse attention calls" in m for m in messages)


def test_sigma_window_and_dense_blocks(comfy, models):
    override, _ = comfy
    kernel = RecordingKernel(override)
    patched, state = patch(comfy, models["wan"], kernel, start_percent=0.5, dense_blocks="1")
    sample(patched, "wan", latent_for("wan"), steps=4)
    steps = state.last_run.steps
    assert len(steps) == 4
    assert steps[0].dense_calls.get(override.WINDOW) == 2 and steps[0].sparse_calls == 0
    assert steps[-1].sparse_calls == 1 and steps[-1].dense_calls.get(override.DENSE_BLOCK) == 1


def test_two_clones_patched_differently_keep_separate_settings_and_statistics(comfy, models):
    override, _ = comfy
    k1, k2 = RecordingKernel(override), RecordingKernel(override)
    model = models["flux"]
    a, sa = patch(comfy, model, k1, topk=0.3)
    b, sb = patch(comfy, model, k2, topk=0.7, protect_text=False)
    sample(a, "flux", latent_for("flux"), steps=2)
    sample(b, "flux", latent_for("flux"), steps=3)
    assert {c["topk"] for c in k1.calls} == {0.3} and {c["topk"] for c in k2.calls} == {0.7}
    assert {str(c["keep_ranges"]) for c in k2.calls} == {"None"}
    assert len(sa.last_run.steps) == 2 and len(sb.last_run.steps) == 3
    assert sa.last_run.steps[0].density == pytest.approx(0.3) and sb.last_run.steps[0].density == pytest.approx(0.7)


def test_chaining_with_overrides_installed_before_and_after(comfy, models):
    override, _ = comfy
    model = models["wan"]
    before, after = [], []

    def before_override(func, *args, **kwargs):  # e.g. an attention-backend node applied before ours
        before.append(args[1].shape[1])
        assert kwargs["_inside_attn_wrapper"] is True
        return func(*args, **kwargs)

    def make_after(previous):
        def after_override(func, *args, **kwargs):  # a node applied after ours that chains
            after.append(args[1].shape[1])
            return previous(func, *args, **kwargs)
        return after_override

    first = model.clone()
    first.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = before_override
    kernel = RecordingKernel(override)
    patched, state = patch(comfy, first, kernel)
    last = patched.clone()
    options = last.model_options["transformer_options"]
    options["optimized_attention_override"] = make_after(options["optimized_attention_override"])

    latent = latent_for("wan")
    out = sample(last, "wan", latent)
    torch.testing.assert_close(out, sample(model, "wan", latent), atol=1e-4, rtol=1e-4)
    # We are re-installed on top of the later override: self-attention runs sparse (once per call);
    # the calls we leave dense (cross-attention) go through the later override, then the earlier one.
    assert len(kernel.calls) == 4 and after == [8] * 4 and before == [8] * 4
    assert state.last_run.totals()["dense_calls"] == {override.CROSS: 4}


def _compiled(model):
    """What ComfyUI's TorchCompileModel node does, with the aot_eager backend instead of inductor
    (no C++ compiler in tests): Dynamo traces, guards and recompiles exactly as with inductor."""
    from comfy_api.torch_helpers import set_torch_compile_wrapper
    from comfy_extras.nodes_torch_compile import skip_torch_compile_dict

    m = model.clone()
    set_torch_compile_wrapper(model=m, backend="aot_eager", options={"guard_filter_fn": skip_torch_compile_dict},
                              keys=["diffusion_model"])
    return m


def _graphs():
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def test_torch_compile_model_node_keeps_every_per_step_decision(comfy, models):
    """With ComfyUI's TorchCompileModel our override must not be traced: Dynamo would guard on the
    per-step state and recompile every step (until its recompile limit), or, with the guards on
    transformer_options filtered, freeze the first step's decisions (sigma window, statistics)."""
    override, _ = comfy
    latent = latent_for("wan")
    torch._dynamo.reset()
    g0 = _graphs()
    sample(_compiled(models["wan"]), "wan", latent, steps=4)
    unpatched_graphs = _graphs() - g0

    kernel_eager, kernel_comp = RecordingKernel(override), RecordingKernel(override)
    eager, s_eager = patch(comfy, models["wan"], kernel_eager, start_percent=0.5, dense_blocks="1")
    comp, s_comp = patch(comfy, models["wan"], kernel_comp, start_percent=0.5, dense_blocks="1")
    comp = _compiled(comp)
    torch._dynamo.reset()
    g0 = _graphs()
    out_eager = sample(eager, "wan", latent, steps=4)
    out_comp = sample(comp, "wan", latent, steps=4)
    first_run_graphs = _graphs() - g0
    torch.testing.assert_close(out_comp, out_eager, atol=1e-4, rtol=1e-4)
    assert len(kernel_comp.calls) == len(kernel_eager.calls) > 0
    for a, b in zip(s_comp.last_run.steps, s_eager.last_run.steps):
        assert (a.sparse_calls, a.dense_calls) == (b.sparse_calls, b.dense_calls)
    # one graph per piece between attention calls, compiled once: not one set per step
    assert first_run_graphs <= 4 * unpatched_graphs + 8, (first_run_graphs, unpatched_graphs)
    # a second run through the same compiled model compiles nothing and still decides per call
    g1 = _graphs()
    sample(comp, "wan", latent, steps=4)
    assert _graphs() == g1
    assert len(kernel_comp.calls) == 2 * len(kernel_eager.calls)
    assert len(s_comp.last_run.steps) == 4


def test_torch_compile_model_node_with_rope_in_the_kernel(comfy, models):
    """Flux under TorchCompileModel: the attn1_patch that takes pe off the block runs eagerly too, every
    sparse call still gets rope, and the output matches the patched model run eagerly."""
    override, _ = comfy
    latent = latent_for("flux")
    kernel_eager, kernel_comp = RecordingKernel(override), RecordingKernel(override)
    eager, _ = patch(comfy, models["flux"], kernel_eager)
    comp, s_comp = patch(comfy, models["flux"], kernel_comp)
    comp = _compiled(comp)
    torch._dynamo.reset()
    out_eager = sample(eager, "flux", latent)
    out_comp = sample(comp, "flux", latent)
    torch.testing.assert_close(out_comp, out_eager, atol=1e-4, rtol=1e-4)
    assert len(kernel_comp.calls) == len(kernel_eager.calls) == 4
    assert all(c["rope"] for c in kernel_comp.calls)
    assert s_comp.rope_off is None and s_comp.rope_calls == 4
