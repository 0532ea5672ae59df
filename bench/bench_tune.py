"""What tuning costs, and what it finds: full-size random-weight Wan 2.1-1.3B, 480p x 81 frames, in ComfyUI.

    source bench/gpu_comfy_env.sh && python3 bench/bench_tune.py --out $OUT     # H100: about 2-3 minutes
    python3 bench/bench_tune.py --tiny --out /tmp/tune                        # CPU plumbing check (tiny Wan)

ComfyUI runs in-process (``COMFYUI_PATH``), the model is built through ComfyUI's loader on the GPU
(``tests/comfy_support.py``, normalisation weights 1) and sampled with ComfyUI's sampler (euler /
simple, cfg 1: one model evaluation per step) from the same noise, as in ``bench/bench_e2e.py``
whose helpers this reuses. For each ``--modes`` entry (top-k, cdf):

1. ``untuned``: the model as it is (ComfyUI's dense attention), ``--warmup`` + ``--steps`` steps;
2. ``tune``: the model from ``tune_model`` (what the "SpargeAttn Tune" node runs), ``--warmup`` +
   ``--tune-steps`` steps (16 + 1: the 15-step search and two verification steps); the ratio of its
   median seconds per step to the untuned one is the cost of tuning (issue 4's budget: <= 3x);
3. the thresholds are written with the save node's code to ``--out/wan21_1.3b_<mode>.safetensors``;
4. ``applied``: the model patched with that file (what "SpargeAttn Patch" runs with the file picked),
   ``--warmup`` + ``--steps`` steps: seconds per step, density per layer, relL1 of the latent against
   the untuned one.

Before any timing, the kernel variants the runs use (per-head thresholds, P·V skip on and off) are
compiled once at the real shape, so Triton compilation never lands in a timed step. Random weights
give attention without the structure of a trained model: the densities found here say nothing about
real Wan; the cost ratio and the plumbing are what this measures. Results: ``tune.md`` / ``tune.json``
in ``--out`` (rewritten after each mode).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from bench.bench_e2e import (MODELS, SEED, TINY_LATENT, AttentionTimer, ModelSpec, compare,  # noqa: E402
                             environment, sample_timed, setup_comfy, sync, write_report)

TUNE = dict(start_percent=0.0, end_percent=1.0, dense_blocks="", min_tokens=0, protect_text=True,
            token_order="row-major", verbose=False)


def prewarm(spec: ModelSpec, heads: int, head_dim: int, dtype, device, modes) -> float:
    """Compile every kernel variant the runs use, at the run's shape; returns seconds spent."""
    from sparge_pack.kernels import sparge_attn

    if device.type != "cuda":
        return 0.0
    t0 = time.perf_counter()
    n = spec.tokens()
    q = torch.randn(1, n, heads, head_dim, device=device, dtype=dtype)
    per_head = torch.full((heads,), 0.5, device=device)
    theta = torch.full((heads,), -0.1, device=device)
    for mode in modes:
        for pv in (None, 8.0):
            for sim in (-0.1, theta):  # the tuner passes θ as a float, a file as one value per head
                sparge_attn(q, q, q, layout="NHD", mode=mode, cdf_threshold=per_head, topk=per_head,
                            sim_threshold=sim, pv_threshold=pv, return_stats=True)
    sync(device)
    return time.perf_counter() - t0


def timed(model, spec, latent, warmup, steps, device):
    """Sample; returns (latent, record with per-step seconds, median after warm-up, attention share)."""
    timer = AttentionTimer(device)
    timer.attach(model)
    out, seconds, attention = sample_timed(model, spec, latent, warmup + steps, timer, device)
    kept = list(zip(seconds, attention))[warmup:]
    return out, {
        "step_s": seconds,
        "s_per_step": statistics.median(s for s, _ in kept),
        "mean_s_per_step": statistics.mean(s for s, _ in kept),
        "attention_ms": statistics.median(a for _, a in kept),
        "finite": bool(torch.isfinite(out).all()),
    }


def layer_rows(thresholds, applied_state) -> list[dict]:
    """Per layer: the file's thresholds and densities measured while tuning and in the applied run."""
    measured = {}
    for step in applied_state.last_run.steps:
        for name, layer in step.layers.items():
            measured.setdefault(name, []).append(sum(layer.density) / len(layer.density))
    rows = []
    for name, values in thresholds.layers.items():
        knob = values["topk"] if thresholds.mode == "topk" else values["cdf_threshold"]
        tuned = values["density"][~torch.isnan(values["density"])]
        rows.append({
            "layer": name,
            "knob_min": knob.min().item(), "knob_median": knob.median().item(), "knob_max": knob.max().item(),
            "full_density_heads": int((knob >= 1.0).sum()),
            "pv_threshold": values["pv_threshold"].max().item(),
            "density_tuning": tuned.mean().item() if tuned.numel() else None,
            "density_applied": statistics.mean(measured[name]) if name in measured else None,
        })
    return rows


def fmt(x, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def render(results: dict) -> str:
    meta, base = results["meta"], results["untuned"]
    lines = [f"# Tuning cost and result: {results['model']} ({meta['device']})", "",
             f"{meta['date']}; torch {meta['torch']}, triton {meta['triton']}, ComfyUI {meta['comfyui']}, default "
             f"attention `{meta['attention']}`; {meta['dtype']} random weights (norm weights 1), cfg 1, euler/simple. "
             f"Kernel variants compiled before timing ({results['prewarm_s']:.0f} s).", "",
             f"Command: `{meta['command']}`", "",
             "| run | s/step (median) | mean | × untuned | attention ms/step | × untuned | steps (with warm-up) | density | "
             "relL1 vs untuned |", "|---|---|---|---|---|---|---|---|---|",
             f"| untuned | {base['s_per_step']:.3f} | {base['mean_s_per_step']:.3f} | 1.00× | "
             f"{base['attention_ms']:.0f} | 1.00× | {len(base['step_s'])} | 1 | — |"]
    for mode, rec in results["modes"].items():
        for name in ("tune", "applied"):
            r = rec[name]
            lines.append(
                f"| {name} {mode} | {r['s_per_step']:.3f} | {r['mean_s_per_step']:.3f} | "
                f"{r['s_per_step'] / base['s_per_step']:.2f}× | {r['attention_ms']:.0f} | "
                f"{r['attention_ms'] / base['attention_ms']:.2f}× | {len(r['step_s'])} | {fmt(r.get('density'), '.3f')} "
                f"| {fmt(r.get('rel_l1'), '.4f')} |")
    lines += ["", "Budget (issue 4): a tuning run costs <= 3x the same run untuned (median s/step).", ""]
    for mode, rec in results["modes"].items():
        lines += [f"## {mode}: {rec['summary']}", "", f"File: `{rec['file']}`", "",
                  f"| layer | {'top-k' if mode == 'topk' else 'τ'} min / median / max | heads at full density | λ | "
                  "density (tuning) | density (applied) |", "|---|---|---|---|---|---|"]
        for row in rec["layers"]:
            lam = "off" if row["pv_threshold"] == 0 else f"{row['pv_threshold']:g}"
            lines.append(f"| {row['layer']} | {row['knob_min']:.3f} / {row['knob_median']:.3f} / {row['knob_max']:.3f} "
                         f"| {row['full_density_heads']} | {lam} | {fmt(row['density_tuning'], '.3f')} "
                         f"| {fmt(row['density_applied'], '.3f')} |")
        lines.append("")
    return "\n".join(lines)


def write(results: dict, out: str) -> None:
    write_report(out, "tune", results, render(results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default="topk,cdf", help="comma-separated subset of topk,cdf")
    parser.add_argument("--steps", type=int, default=3, help="timed steps of the untuned and applied runs")
    parser.add_argument("--tune-steps", type=int, default=16, help="timed steps of each tuning run")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first steps of every run")
    parser.add_argument("--l1-target", type=float, default=0.05)
    parser.add_argument("--pv-target", type=float, default=0.06)
    parser.add_argument("--budget-s", type=float, default=200.0, help="skip a mode that would end later than this")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "out", "tune"))
    parser.add_argument("--tiny", action="store_true", help="tiny Wan (2 heads, 2 blocks) on the CPU: plumbing only")
    args = parser.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - {"topk", "cdf"}:
        parser.error("--modes: choose from topk, cdf")
    if min(args.steps, args.tune_steps) < 1 or args.warmup < 0:
        parser.error("--steps and --tune-steps must be >= 1, --warmup >= 0")
    start = time.perf_counter()
    device = setup_comfy(args.tiny)
    from comfy_support import build_model
    from sparge_pack.nodes import presets
    from sparge_pack.nodes.patch import apply_sparge, kernel_problem
    from sparge_pack.nodes.tune_nodes import tune_model, tuned_thresholds

    spec = MODELS["wan1.3b"]
    if args.tiny:
        spec = ModelSpec("Wan 2.1 (tiny)", "wan", "tiny", TINY_LATENT["wan"], 8, 0.0, 0.0, spec.target)
    args.dtype = torch.float32 if args.tiny else torch.bfloat16
    print(f"{spec.label}: {spec.tokens()} tokens; sparse kernel: {kernel_problem() or 'available'}", flush=True)
    t0 = time.perf_counter()
    model = build_model(spec.kind, spec.size, dtype=args.dtype, seed=SEED, device=device, norm_scale=1.0)
    dm = model.get_model_object("diffusion_model")
    heads, head_dim = dm.num_heads, dm.dim // dm.num_heads
    print(f"built through ComfyUI's loader in {time.perf_counter() - t0:.1f} s ({heads} heads x {head_dim}, "
          f"{len(dm.blocks)} blocks)", flush=True)
    results = {"meta": environment(device, args), "model": f"{spec.label}, {spec.tokens()} tokens", "modes": {}}
    results["meta"]["steps"] = args.steps
    results["prewarm_s"] = prewarm(spec, heads, head_dim, args.dtype, device, modes)
    latent = torch.zeros(spec.latent)
    ref, results["untuned"] = timed(model.clone(), spec, latent, args.warmup, args.steps, device)
    base = results["untuned"]["s_per_step"]
    print(f"untuned: {base:.3f} s/step", flush=True)
    for mode in modes:
        need = base * ((args.warmup + args.tune_steps) * 3 + (args.warmup + args.steps))
        if time.perf_counter() - start + need > args.budget_s:
            print(f"skipped {mode}: needs ~{need:.0f} s, over --budget-s", flush=True)
            continue
        tuned, _ = tune_model(model, mode=mode, l1_target=args.l1_target, pv_target=args.pv_target,
                              sim_threshold=-0.1, **TUNE)
        _, tune_rec = timed(tuned, spec, latent, args.warmup, args.tune_steps, device)
        thresholds = tuned_thresholds(tuned)
        path = presets.save(thresholds, args.out, f"wan21_1.3b_{mode}" + ("_tiny" if args.tiny else ""), overwrite=True)
        print(f"tune {mode}: {tune_rec['s_per_step']:.3f} s/step = {tune_rec['s_per_step'] / base:.2f}x untuned; "
              f"{thresholds.summary()}; written to {path}", flush=True)
        patched, state = apply_sparge(model, thresholds=thresholds,
                                      **{**TUNE, "mode": thresholds.mode, "token_order": thresholds.token_order})
        out, applied = timed(patched, spec, latent, args.warmup, args.steps, device)
        applied.update(compare(out, ref))
        applied["density"] = state.last_run.totals()["density"]
        print(f"applied {mode}: {applied['s_per_step']:.3f} s/step, density {fmt(applied['density'], '.3f')}, "
              f"relL1 vs untuned {applied['rel_l1']:.4f}", flush=True)
        results["modes"][mode] = {"tune": tune_rec, "applied": applied, "file": path,
                                  "summary": thresholds.summary(), "layers": layer_rows(thresholds, state)}
        write(results, args.out)
        del tuned, patched
    write(results, args.out)
    print("\n" + render(results))
    print(f"written to {args.out}/tune.md and tune.json; total {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
