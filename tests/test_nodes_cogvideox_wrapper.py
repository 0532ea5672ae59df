"""The CogVideoX node against a real checkout of kijai's ComfyUI-CogVideoXWrapper (``COGVIDEOX_WRAPPER_PATH``)
inside a real ComfyUI (``COMFYUI_PATH``), with diffusers from PyPI; skipped with the reason otherwise.

Models are tiny random-weight transformers built by the wrapper's own class from its CogVideoX-5B config
(2 layers x 2 heads x 64, 226 text tokens) inside the wrapper's own pipeline, and sampled with the wrapper's
own "CogVideo Sampler" node: 9 frames at 96x64 -> a (3, 4, 6) token grid, 298 tokens per attention, cond
and uncond batched. Where a test needs the sparse path without the real kernel, an exact attention with
the kernel's signature is injected and records its calls.
"""

import pytest
import torch

from comfy_support import RecordingKernel, build_cogvideox, cogvideox_conditioning, require_cogvideox_wrapper, sample_cogvideox
from sparge_pack import kernels  # imported while conftest's TRITON_INTERPRET=1 holds, so Triton interprets

TEXT = 226
GRID = (3, 4, 6)
STEPS, LAYERS = 2, 2


@pytest.fixture(scope="module")
def wrapper():
    return require_cogvideox_wrapper()


@pytest.fixture(scope="module")
def pack(wrapper):
    from sparge_pack.nodes import cogvideox, override

    return cogvideox, override


def patch(pack, model, kernel=None, **options):
    cogvideox, _ = pack
    options = {"start_percent": 0.0, "dense_blocks": "", "min_tokens": 0, **options}
    return cogvideox.apply_sparge_cogvideox(model, kernel=kernel.api if kernel else None, **options)


def attn_funcs(model):
    return [b.attn1.processor.attn_func for b in model["pipe"].transformer.transformer_blocks]


def forward(model, seed=2):
    """One transformer call as the wrapper's pipeline makes it (cond + uncond, RoPE at 96x64, 3 latent frames)."""
    pipe = model["pipe"]
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(2, GRID[0], 16, 8, 12, generator=g)
    text = torch.cat(cogvideox_conditioning(seed))
    rope = pipe._prepare_rotary_positional_embeddings(64, 96, GRID[0], torch.device("cpu"))
    with torch.no_grad():
        return pipe.transformer(hidden_states=latent, encoder_hidden_states=text, timestep=torch.tensor([500, 500]),
                                image_rotary_emb=rope, return_dict=False)[0]


def rel_l1(a, b):
    return ((a - b).abs().sum() / b.abs().sum()).item()


def test_on_cpu_the_patched_model_runs_dense_and_matches_exactly(wrapper, pack, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the kernel's CPU interpreter stays off
    _, override = pack
    model = build_cogvideox(wrapper)
    before = attn_funcs(model)
    reference = sample_cogvideox(wrapper, model)
    patched, state = patch(pack, model)
    assert torch.equal(sample_cogvideox(wrapper, patched), reference)
    totals = state.last_run.totals()
    assert totals["sparse_calls"] == 0 and totals["dense_calls"] == {override.NOT_CUDA: STEPS * LAYERS}
    assert len(state.last_run.steps) == STEPS
    assert state.last_run.steps[0].sigma > 1000 > state.last_run.steps[1].sigma  # zero-SNR first step: ~4519
    assert attn_funcs(model) == before and "spargeattn" not in model
    assert torch.equal(sample_cogvideox(wrapper, model), reference)


@pytest.mark.parametrize("token_order", ["row-major", "hilbert"])
def test_full_density_matches_unpatched_within_quantization_noise(wrapper, pack, token_order):
    """The real kernel (Triton interpreter on a CPU, set by conftest; the GPU when there is one)."""
    why = kernels.unavailable_reason(torch.device("cpu"))
    if why is not None:
        pytest.skip(f"kernel not runnable on the CPU: {why}")
    model = build_cogvideox(wrapper)
    reference = forward(model)
    patched, state = patch(pack, model, topk=1.0, token_order=token_order)
    out = forward(patched)
    rel = rel_l1(out, reference)
    assert 0 < rel < 3e-3, rel  # INT8 Q·Kᵀ and FP8 P·V rounding: 3.2e-4 measured (interpreter)
    step = state._step.flush(0, None)
    assert step.sparse_calls == LAYERS and step.density == pytest.approx(1.0)
    assert torch.equal(forward(model), reference)


@pytest.mark.parametrize("mode", ["sdpa", "fused_sdpa", "comfy"])
def test_sampler_through_the_copy_for_each_attention_mode(wrapper, pack, mode):
    _, override = pack
    kernel = RecordingKernel(override)
    model = build_cogvideox(wrapper, attention_mode=mode)
    before = attn_funcs(model)
    reference = sample_cogvideox(wrapper, model)
    # CogVideoXDDIM, 2 steps: t = 999 (before 30% of the schedule: dense), then t = 499
    patched, state = patch(pack, model, kernel, start_percent=0.3, dense_blocks="0", token_order="hilbert", topk=0.4)
    out = sample_cogvideox(wrapper, patched)
    assert rel_l1(out, reference) < 1e-5  # the recording kernel is exact; only the token order differs
    assert [c["shape"] for c in kernel.calls] == [(2, 2, TEXT + 72, 64)]
    assert kernel.calls[0]["layout"] == "HND" and kernel.calls[0]["keep_ranges"] == [(0, TEXT)]
    first, second = state.last_run.steps
    assert first.dense_calls == {override.WINDOW: LAYERS} and first.sparse_calls == 0
    assert second.dense_calls == {override.DENSE_BLOCK: 1} and list(second.layers) == ["block.1"]
    assert attn_funcs(model) == before


def test_compiled_blocks_and_offload_hooks_keep_the_copy_separate(wrapper, pack):
    """Blocks compiled as the loader's compile_args do, and an accelerate hook on the transformer as
    ``enable_sequential_cpu_offload`` adds one: the copy still runs its own attention."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    _, override = pack
    model = build_cogvideox(wrapper)
    transformer = model["pipe"].transformer
    blocks = transformer.transformer_blocks
    for i, block in enumerate(blocks):
        blocks[i] = torch.compile(block, backend="eager")
    add_hook_to_module(transformer, AlignDevicesHook(io_same_device=True))
    reference = forward(model)
    kernel = RecordingKernel(override)
    patched, state = patch(pack, model, kernel)
    assert rel_l1(forward(patched), reference) < 1e-5
    assert len(kernel.calls) == LAYERS
    assert torch.equal(forward(model), reference) and len(kernel.calls) == LAYERS
    assert all(type(b._orig_mod.attn1.processor.attn_func).__name__ == "function" for b in blocks)


def test_the_node_through_comfyui_v3_execution(wrapper, pack, monkeypatch):
    """SpargeAttnCogVideoX as ComfyUI's executor runs it (class clone with hidden inputs), widget defaults."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from comfy_api.latest import io
    from sparge_pack.nodes.cogvideox_node import SpargeAttnCogVideoX

    _, override = pack
    schema = SpargeAttnCogVideoX.GET_SCHEMA()
    defaults = {i.id: i.default for i in schema.inputs if i.id != "model"}
    assert list(defaults) == ["mode", "topk", "cdf_threshold", "sim_threshold", "pv_threshold", "start_percent",
                              "end_percent", "dense_blocks", "min_tokens", "protect_text", "token_order", "verbose",
                              "precision"]
    SpargeAttnCogVideoX.VALIDATE_CLASS()
    node = SpargeAttnCogVideoX.PREPARE_CLASS_CLONE({"hidden_inputs": {io.Hidden.unique_id: "12:3"}})
    model = build_cogvideox(wrapper)
    reference = sample_cogvideox(wrapper, model)
    patched = node.EXECUTE_NORMALIZED(model=model, **defaults).result[0]
    hooks = patched["spargeattn"]
    runs = []
    hooks.run_listeners.append(runs.append)
    assert torch.equal(sample_cogvideox(wrapper, patched), reference)
    assert hooks.state.node_id == "12:3" and hooks.state.config.topk == 0.5
    assert runs == [hooks.state.last_run] and len(runs[0].steps) == STEPS
    # defaults: start 0.2 keeps t=999 dense (window), then dense blocks "0, 1" are both layers
    assert runs[0].steps[0].dense_calls == {override.WINDOW: LAYERS}
    assert runs[0].steps[1].dense_calls == {override.DENSE_BLOCK: LAYERS}
