"""Tuning without ComfyUI: the search's guarantees, tune mode in the override, and tuned thresholds
reaching their target on held-out calls of synthetic attention with local structure.

Calls come from :class:`SyntheticLayer`: Q/K built from token positions on a line
(``kernels.reference.local_qkv``, each head with its own reach), fixed per layer as a layer's weights
fix its positional structure, plus fresh content noise and a fresh V on every call, as steps and
prompts vary. Sizes are small (16 key blocks) so that the CPU tests stay fast. Most tests run the
kernel's plain-torch specification (:class:`ReferenceKernel`, ``kernels.reference``) for speed; one
runs the Triton kernel itself (the interpreter on a CPU).
"""

import random

import pytest
import torch
import torch.nn.functional as F

from sparge_pack.kernels import reference as R
from sparge_pack.nodes import override as ov
from sparge_pack.nodes import tune as T
from sparge_pack.nodes.adapters import VIDEO
from sparge_pack.nodes.presets import ModelSignature, TunedThresholds


class ReferenceKernel:
    """``kernels.sparge_attn``'s signature over its plain-torch specification (exact arithmetic).

    Stage 1 with ``reference.predict_block_mask`` (per-head τ / θ / top-k tensors), attention with
    ``reference.block_sparse_attention`` (stage-2 P·V skip emulated). Records the options of every call.
    """

    def __init__(self):
        self.calls = []
        self.api = ov.KernelAPI(self.attn, lambda device: None, range(1, 257))

    def attn(self, q, k, v, *, layout, scale, keep_ranges, return_stats, mode, cdf_threshold, sim_threshold, topk,
             pv_threshold, pv_dtype):
        assert pv_dtype == "auto"
        self.calls.append(dict(mode=mode, cdf_threshold=cdf_threshold, sim_threshold=sim_threshold, topk=topk,
                               pv_threshold=pv_threshold))
        mask = R.predict_block_mask(q, k, layout=layout, scale=scale, mode=mode, cdf_threshold=cdf_threshold,
                                    sim_threshold=sim_threshold, topk=topk, keep_ranges=keep_ranges)
        out, skipped = R.block_sparse_attention(q, k, v, mask, layout=layout, scale=scale, pv_threshold=pv_threshold)
        out = out.to(q.dtype)
        computed = mask.float().sum((0, 2, 3))
        stats = {"density": mask.float().mean((0, 2, 3)),
                 "pv_skipped": skipped.float().sum((0, 2)) / computed.clamp_min(1.0)}
        return (out.transpose(1, 2) if layout == "NHD" else out), stats


def dense_func(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False,
               **kwargs):
    """ComfyUI's backend stand-in: exact attention, (B, N, H·D) or (B, H, N, D) as ComfyUI's contract says."""
    if not skip_reshape:
        b, n, _ = q.shape
        q, k, v = (t.view(b, t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q.double(), k.double(), v.double()).to(q.dtype)
    return out if skip_output_reshape else out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)


class SyntheticLayer:
    """Attention calls of one layer: fixed positional structure, fresh content noise and V per call."""

    def __init__(self, heads=2, n=1024, dim=32, seed=7, noise=0.3, device="cpu"):
        self.heads, self.n, self.dim, self.noise, self.device = heads, n, dim, noise, device
        g = torch.Generator().manual_seed(seed)
        self.q, self.k, _ = R.local_qkv(1, heads, n, dim, noise=0.0, generator=g)

    def call(self, seed):
        """(q, k, v) of call ``seed`` in Wan's layout (B, N, H·D)."""
        g = torch.Generator().manual_seed(seed)
        q = self.q + self.noise * torch.randn(self.q.shape, generator=g)
        k = self.k + self.noise * torch.randn(self.k.shape, generator=g)
        v = torch.randn(self.q.shape, generator=g)
        return tuple(t.transpose(1, 2).reshape(1, self.n, -1).to(self.device) for t in (q, k, v))


def run_call(state, layer, seed, block=0):
    q, k, v = layer.call(seed)
    options = {"transformer_options": {"block_index": block, "block_type": "double"}, "_inside_attn_wrapper": True}
    out = ov.SpargeOverride(state, None)(dense_func, q, k, v, layer.heads, **options)
    return out, dense_func(q, k, v, layer.heads)


def tune(layer, kernel, mode, l1, pv=0.0, evals=12, sim=-0.1):
    tuner = T.Tuner(mode, l1, pv, sim)
    state = ov.SpargeState(ov.SpargeConfig(min_tokens=0, mode=mode, sim_threshold=sim), VIDEO, kernel.api, tuner=tuner)
    state.begin_run()
    for seed in range(evals):
        state.begin_step(1.0)
        out, ref = run_call(state, layer, seed)
        assert torch.equal(out, ref)  # while tuning the model gets the dense output
    state.end_run()
    return tuner, state


def thresholds_of(tuner, layer, mode):
    result = tuner.result()
    return TunedThresholds(ModelSignature(VIDEO, "Synthetic", layer.heads, layer.dim, (("blocks", 1),)), result.layers,
                           mode, "row-major", True, tuner.l1_target, tuner.pv_target)


def held_out(thresholds, layer, kernel, seeds=range(1000, 1010)):
    """Per-head relL1 of each held-out call against dense, and the run's statistics."""
    state = ov.SpargeState(ov.SpargeConfig(min_tokens=0), VIDEO, kernel.api, thresholds=thresholds)
    state.begin_run()
    errors = []
    for seed in seeds:
        state.begin_step(1.0)
        out, ref = run_call(state, layer, seed)
        errors.append(T.rel_l1_per_head(out, ref, layer.heads, heads_first=False)[0])
    state.end_run()
    return torch.stack(errors), state.last_run.totals()


# ---- the search itself ----

def test_schedule_steps_only_halve_and_fit_the_lattice():
    for stage2 in (False, True):
        n = T.search_length(stage2)
        assert n == 9 + 6 * stage2
        probes = [T.schedule(i, stage2) for i in range(n + 6)]
        for stage, top in ((1, T.STAGE1_TOP), (2, T.STAGE2_TOP)):
            steps = [p.step for p in probes if p.stage == stage]
            if not steps:
                continue
            assert all(a >= b and a % b == 0 for a, b in zip(steps, steps[1:])), steps
            assert all(top % s == 0 for s in steps)
            assert sum(p.step for p in probes if p.stage == stage and p.kind == "E") <= top
        assert all(p.kind == "V" for p in probes[n:])  # after the search only verification
        assert {p.stage for p in probes[n:]} == ({1, 2} if stage2 else {1})


def test_level_maps():
    levels = torch.arange(T.STAGE1_TOP + 1)
    tau, topk = T.tau_of(levels), T.topk_of(levels)
    assert tau[0] == 1.0 and topk[0] == 1.0 and abs(tau[-1]) < 1e-6 and topk[-1] == 0.0
    assert bool((tau[1:] < tau[:-1]).all()) and bool((topk[1:] < topk[:-1]).all())  # sparser as the level grows
    assert 0.97 < tau[32] < 0.99  # the first probe sits near the reference's typical τ
    lam = [T.lambda_of(g) for g in range(T.STAGE2_TOP + 1)]
    assert lam[0] == 0.0 and lam[1] == 32.0 and lam[-1] == 1.0 and all(a > b for a, b in zip(lam[1:], lam[2:]))


@pytest.mark.parametrize("seed", range(5))
def test_a_stricter_target_never_ends_sparser_whatever_the_errors(seed):
    """The ladder's order-preservation, with arbitrary (even non-monotone) error landscapes per call:
    only "same call, same setting -> same error" is assumed, which tune mode guarantees."""
    rng = random.Random(seed)
    targets = sorted(rng.uniform(0.01, 0.2) for _ in range(4))
    levels = [torch.zeros(16, dtype=torch.int64) for _ in targets]
    for call in range(40):
        landscape = torch.rand(T.STAGE1_TOP + 1, 16, generator=torch.Generator().manual_seed(1000 * seed + call)) * 0.3
        probe = T.schedule(call, stage2=False)
        for i, target in enumerate(targets):
            probed = T.probe_level(levels[i], probe, T.STAGE1_TOP)
            error = landscape.gather(0, probed[None])[0]
            levels[i] = T.ladder_update(levels[i], probe, T.STAGE1_TOP, error, target)
        for stricter, looser in zip(levels, levels[1:]):
            assert bool((stricter <= looser).all())
    assert any(bool((lv > 0).any()) for lv in levels)


def test_tuner_validates_targets():
    with pytest.raises(ValueError, match="larger than the relL1 target"):
        T.Tuner("topk", 0.05, 0.05, -0.1)
    with pytest.raises(ValueError, match="mode"):
        T.Tuner("dense", 0.05, 0.06, -0.1)
    with pytest.raises(ValueError, match="no attention call was tuned"):
        T.Tuner("cdf", 0.05, 0.0, 0.6).result()


def test_rel_l1_per_head_matches_the_reference_metric_in_both_layouts():
    torch.manual_seed(0)
    ref, out = torch.randn(2, 3, 50, 16), torch.randn(2, 3, 50, 16)
    expect = torch.tensor([[R.metrics(out[b, h], ref[b, h])["rel_l1"] for h in range(3)] for b in range(2)],
                          dtype=torch.float64)
    torch.testing.assert_close(T.rel_l1_per_head(out, ref, 3, heads_first=True).double(), expect, rtol=1e-5, atol=0)
    flat = [t.transpose(1, 2).reshape(2, 50, 48) for t in (out, ref)]
    torch.testing.assert_close(T.rel_l1_per_head(*flat, 3, heads_first=False).double(), expect, rtol=1e-5, atol=0)


# ---- tune mode in the override ----

def test_tune_mode_returns_dense_counts_it_and_probes_all_heads_in_one_call():
    kernel, layer = ReferenceKernel(), SyntheticLayer(n=256)
    tuner, state = tune(layer, kernel, "topk", 0.05, evals=3)
    assert len(kernel.calls) == 3  # one sparse probe per attention call, every head in it
    first = kernel.calls[0]
    assert first["topk"].shape == (2,) and torch.allclose(first["topk"], torch.full((2,), 0.5))  # level 32
    assert first["pv_threshold"] is None and first["mode"] == "topk"
    totals = state.last_run.totals()
    assert totals["sparse_calls"] == 0 and totals["dense_calls"] == {ov.TUNING: 3}
    assert tuner.evaluations == 3 and list(tuner.layers) == ["double.0"] and tuner.progress() == (3, 9)


def test_on_call_runs_before_every_tuned_call_and_can_stop_the_run():
    """Where the node hooks ComfyUI's "Cancel": an exception from ``on_call`` ends the call before the probe."""
    kernel, layer = ReferenceKernel(), SyntheticLayer(n=256)
    seen = []

    def on_call():
        seen.append(len(kernel.calls))
        if len(seen) == 2:
            raise KeyboardInterrupt

    tuner = T.Tuner("topk", 0.05, 0.0, -0.1, on_call=on_call)
    state = ov.SpargeState(ov.SpargeConfig(min_tokens=0), VIDEO, kernel.api, tuner=tuner)
    state.begin_step(1.0)
    run_call(state, layer, 0)
    with pytest.raises(KeyboardInterrupt):
        run_call(state, layer, 1)
    assert seen == [0, 1] and len(kernel.calls) == 1


def test_tuned_layers_apply_per_head_and_untuned_layers_stay_dense():
    kernel, layer = ReferenceKernel(), SyntheticLayer(n=256)
    tuner, _ = tune(layer, kernel, "cdf", 0.05, evals=2)
    thresholds = thresholds_of(tuner, layer, "cdf")
    state = ov.SpargeState(ov.SpargeConfig(min_tokens=0, mode="topk", topk=0.3), VIDEO, kernel.api,
                           thresholds=thresholds)
    state.begin_run()
    state.begin_step(1.0)
    kernel.calls.clear()
    run_call(state, layer, 5, block=0)
    run_call(state, layer, 6, block=1)  # not in the file
    call = kernel.calls[0]
    assert len(kernel.calls) == 1 and call["mode"] == "cdf"  # the file's mode, not the config's top-k 0.3
    torch.testing.assert_close(call["cdf_threshold"], thresholds.layers["double.0"]["cdf_threshold"])
    assert state._step._dense == {ov.UNTUNED: 1}


# ---- tuning reaches its target on held-out calls ----

@pytest.mark.parametrize("mode", ["topk", "cdf"])
def test_tuning_meets_the_target_on_held_out_calls_with_sparsity(mode):
    kernel, layer = ReferenceKernel(), SyntheticLayer()
    tuner, _ = tune(layer, kernel, mode, 0.05, evals=20)
    assert tuner.complete
    errors, totals = held_out(thresholds_of(tuner, layer, mode), layer, kernel, range(1000, 1006))
    assert errors.max() <= 0.05, errors.max(0).values
    assert totals["dense_calls"] == {} and totals["density"] < 0.85  # sparsity found, every call sparse
    assert len({round(x, 3) for x in tuner.result().layers["double.0"][mode if mode == "topk" else "cdf_threshold"]
                .tolist()}) > 1  # heads of different reach get different settings


def test_stage_two_finds_a_pv_threshold_within_its_target():
    kernel, layer = ReferenceKernel(), SyntheticLayer(n=512)
    tuner, _ = tune(layer, kernel, "topk", 0.05, pv=0.06, evals=16)
    assert tuner.complete
    thresholds = thresholds_of(tuner, layer, "topk")
    lam = thresholds.layers["double.0"]["pv_threshold"]
    assert lam.min() == lam.max() and lam[0] > 0  # one λ per layer for now, and the skip is on
    errors, totals = held_out(thresholds, layer, kernel, range(2000, 2006))
    assert errors.max() <= 0.06 and totals["pv_skipped"] > 0


def test_a_stricter_target_never_yields_higher_sparsity():
    kernel, layer = ReferenceKernel(), SyntheticLayer(n=512)
    levels, densities = [], []
    for target in (0.03, 0.05, 0.08):
        tuner, _ = tune(layer, kernel, "topk", target, evals=10)
        levels.append(tuner.layers["double.0"].level1)
        densities.append(held_out(thresholds_of(tuner, layer, "topk"), layer, kernel, range(3000, 3003))[1]["density"])
    assert all(bool((a <= b).all()) for a, b in zip(levels, levels[1:])), levels
    assert densities[0] >= densities[1] >= densities[2] and densities[0] > densities[2], densities


def test_the_triton_kernel_tunes_too():
    """The real kernel (on a GPU, else in the Triton interpreter): INT8/FP8 quantization error included."""
    from sparge_pack.nodes.override import load_kernel

    kernel = load_kernel()
    layer = SyntheticLayer(n=512, dim=64, device="cuda" if torch.cuda.is_available() else "cpu")
    assert not isinstance(kernel, str), kernel

    class Real:
        api = kernel

    tuner, _ = tune(layer, Real, "topk", 0.08, evals=9)
    assert tuner.complete
    errors, totals = held_out(thresholds_of(tuner, layer, "topk"), layer, Real, range(4000, 4002))
    assert errors.max() <= 0.08 and totals["density"] < 1.0, (errors, totals)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host-sync check needs a CUDA GPU")
def test_no_host_sync_inside_a_tuned_evaluation():
    from sparge_pack.nodes.override import load_kernel

    layer = SyntheticLayer(n=4096, dim=64)
    tuner = T.Tuner("cdf", 0.05, 0.06, -0.1)
    state = ov.SpargeState(ov.SpargeConfig(min_tokens=0, mode="cdf"), VIDEO, load_kernel(), tuner=tuner)
    q, k, v = (t.cuda().half() for t in layer.call(0))
    options = {"transformer_options": {"block_index": 0, "block_type": "double"}, "_inside_attn_wrapper": True}
    state.begin_run()
    state.begin_step(1.0)
    ov.SpargeOverride(state, None)(dense_func, q, k, v, 2, **options)  # warm-up: compilation, first allocations
    state.begin_step(1.0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            ov.SpargeOverride(state, None)(dense_func, q, k, v, 2, **options)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    state.end_run()
