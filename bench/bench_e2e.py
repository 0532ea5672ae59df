"""End-to-end seconds per sampler step in real ComfyUI, unpatched vs the SpargeAttn Patch node.

    source bench/gpu_comfy_env.sh && python3 bench/bench_e2e.py --models wan1.3b,flux,wan14b --steps 3 --out $OUT
    python3 bench/bench_e2e.py --tiny --out /tmp/e2e          # CPU plumbing check (tiny models)
    python3 bench/bench_e2e.py --merge a/e2e.json b/e2e.json --out DIR   # one table from several runs

ComfyUI runs in-process (``COMFYUI_PATH``; no server, no frontend). Each model is a full-size
random-weight bf16 model built through ComfyUI's own loader (``comfy.sd.load_diffusion_model_state_dict``,
via ``tests/comfy_support.py``) directly on the GPU, and sampled with ComfyUI's sampler
(``comfy.sample.sample``, euler / simple, cfg 1 = one model evaluation per step, batch 1) from the same
noise in every configuration:

* ``unpatched``: ComfyUI's default attention (SDPA, cuDNN first on NVIDIA);
* ``full``, ``topk0.5``, ``topk0.3``: the model patched through ``apply_sparge`` (what the node runs)
  with top-k 1.0 / 0.5 / 0.3 from the first step on (start_percent 0, no dense blocks, min_tokens 0,
  sim_threshold -1 so that only top-k decides, text protected, P·V skip off);
* ``topk0.5-hilbert`` (optional): top-k 0.5 in Hilbert token order;
* ``topk0.5-accurate`` (optional): top-k 0.5 with the node's "accurate" P·V precision (fp16);
* ``topk0.5-comfyrope`` (optional): top-k 0.5 with RoPE left to ComfyUI (``apply_sparge(fuse_rope=False)``); the
  other patched configurations of Flux and HunyuanVideo rotate q and k inside the kernel (the record's
  ``rope_in_kernel`` counts those calls per step).

Random weights give attention without the local structure of a trained model (q·k logits of
random vectors), so the cdf mode would keep almost every block; the speed table therefore uses
fixed top-k fractions. The normalisation weights are 1 (not random) so that the logits have a
realistic spread (std ~1) for the quantization check. ComfyUI is set up as with ``--highvram``
(weights stay on the GPU, never partially loaded); comfy-aimdo's dynamic VRAM is off, as in any
in-process use.

RoPE: ComfyUI takes it from comfy-kitchen, whose CUDA backend (the manylinux wheel, a CUDA 13 torch) runs
it ~3.5x faster than its eager backend of plain torch ops; both sides of a speed-up pay it, so the report
names the backend that ran, and ``--rope eager`` measures the slow one (a CUDA 12 torch's).

Seconds per step: wall time between sampler callbacks, with one ``torch.cuda.synchronize()`` per
step; the first ``--warmup`` steps of every run (model load, Triton compilation) are left out and the
median of the other steps is reported. Attention share: a thin override is put on top of the
attention-override chain at every model evaluation (an APPLY_MODEL wrapper registered after the
patch's own), so it wraps every attention call, sparse or dense; it records a CUDA event before and
after each call and sums the event intervals once per step, after that step's synchronisation (no
host sync per call). Share = attention milliseconds / step milliseconds. relL1 / cosine: final latent
of a patched run against the unpatched one (top-k 1.0 differs only by the kernel's INT8 Q·Kᵀ and FP8
P·V quantization). Density: the patch's own per-step statistics (fraction of Q·Kᵀ blocks computed).

Models run cheapest first; results are written after every configuration, so a run that hits its
time limit still leaves complete rows. ``--budget-s`` skips what would not finish in time.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import json
import logging
import os
import statistics
import sys
import time
import weakref
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

import torch  # noqa: E402

SEED = 0
PACK = "sparge_pack"
TIMER_KEY = "bench_e2e.attention_timer"


@dataclass(frozen=True)
class ModelSpec:
    """A benchmark model: how to build it and what it samples.

    ``est_step_s`` / ``est_build_s``: rough H100 estimates (unpatched seconds per step, seconds to
    build), used only to order the models and to skip what would overrun ``--budget-s``.
    """

    label: str
    kind: str
    size: str
    latent: tuple
    text_tokens: int
    est_step_s: float
    est_build_s: float
    target: float  # issue 7's speed-up target at top-k 0.5

    def tokens(self) -> int:
        """Self-attention sequence length: latent grid after the 2x2 spatial patch, plus joint text."""
        frames = self.latent[2] if len(self.latent) == 5 else 1
        grid = frames * -(-self.latent[-2] // 2) * -(-self.latent[-1] // 2)
        return grid + (0 if self.kind == "wan" else self.text_tokens)


MODELS = {
    # 1024x1024 -> latent 128x128 -> 64x64 tokens, T5 512 tokens joint.
    "flux": ModelSpec("Flux.1 1024²", "flux", "full", (1, 16, 128, 128), 512, 0.4, 20, 1.1),
    # 832x480, 81 frames -> latent 21x60x104 -> 21x30x52 = 32 760 tokens; umt5 512 tokens in cross-attention.
    "wan1.3b": ModelSpec("Wan 2.1-1.3B 480p 81f", "wan", "wan1.3b", (1, 16, 21, 60, 104), 512, 0.7, 8, 1.4),
    "wan14b": ModelSpec("Wan 2.1-14B 480p 81f", "wan", "wan14b", (1, 16, 21, 60, 104), 512, 3.6, 25, 1.5),
    # 1280x720, 129 frames -> latent 33x90x160 -> 33x45x80 = 118 800 tokens + 256 text tokens joint.
    "hunyuan": ModelSpec("HunyuanVideo 720p 129f", "hunyuan_video", "full", (1, 16, 33, 90, 160), 256, 31, 25, 1.8),
}
TINY_LATENT = {"flux": (1, 16, 16, 16), "wan": (1, 16, 3, 16, 16), "hunyuan_video": (1, 16, 3, 16, 16)}

# The node's settings for every patched run; only top-k (and the token order) vary.
COMMON = dict(mode="topk", start_percent=0.0, end_percent=1.0, dense_blocks="", min_tokens=0, sim_threshold=-1.0,
              pv_threshold=0.0, protect_text=True, token_order="row-major", verbose=False)
CONFIGS = {
    "unpatched": None,
    "full": dict(topk=1.0),
    "topk0.5": dict(topk=0.5),
    "topk0.3": dict(topk=0.3),
    "topk0.5-hilbert": dict(topk=0.5, token_order="hilbert"),
    "topk0.5-accurate": dict(topk=0.5, precision="accurate"),
    "topk0.5-comfyrope": dict(topk=0.5, fuse_rope=False),
}
DEFAULT_CONFIGS = "unpatched,full,topk0.5,topk0.3"
# Step time relative to unpatched, for the time budget only (pessimistic).
COST = {"unpatched": 1.0, "full": 1.4, "topk0.5": 0.85, "topk0.3": 0.7, "topk0.5-hilbert": 0.9, "topk0.5-accurate": 0.9,
        "topk0.5-comfyrope": 0.85}
COMPILE_S = 60.0  # first patched run of the process: Triton compiles the kernels


class AttentionTimer:
    """Times every attention call of a patched or unpatched model, without a sync per call.

    :meth:`attach` registers an APPLY_MODEL wrapper on a ModelPatcher clone. At every model
    evaluation it puts a timing override on top of whatever override chain the evaluation's
    ``transformer_options`` holds (after the SpargeAttn patch has put its own there), so every
    attention call passes through it first; it then delegates unchanged (``_inside_attn_wrapper``
    included) to the previous override, or to ComfyUI's backend ``func``.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._spans: list = []
        self._active = False
        self.host_s: list = []  # host seconds of each timed call (Python and launches, no GPU wait)

    def _mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _timed(self, previous):
        def timed(func, *args, **kwargs):
            if self._active:  # reached again further down the chain: the outer call is timing it
                return func(*args, **kwargs) if previous is None else previous(func, *args, **kwargs)
            self._active = True
            try:
                start = self._mark()
                t0 = time.perf_counter()
                out = func(*args, **kwargs) if previous is None else previous(func, *args, **kwargs)
                self.host_s.append(time.perf_counter() - t0)
                self._spans.append((start, self._mark()))
            finally:
                self._active = False
            return out

        timed.timer = self
        timed.spargeattn_next = previous  # hands every call down unchanged (nodes/override.py DeferredRope)
        return timed

    def attach(self, patcher) -> None:
        """Register the timing wrapper on ``patcher`` (after any wrapper already there)."""
        from comfy.patcher_extension import WrappersMP

        def wrapper(executor, *args, **kwargs):
            options = args[5] if len(args) > 5 else kwargs.get("transformer_options")
            current = options.get("optimized_attention_override")
            if getattr(current, "timer", None) is not self:
                options["optimized_attention_override"] = self._timed(current)
            return executor(*args, **kwargs)

        patcher.add_wrapper_with_key(WrappersMP.APPLY_MODEL, TIMER_KEY, wrapper)

    def collect_ms(self) -> float:
        """Milliseconds spent in attention since the last call. Call it after a synchronisation."""
        spans, self._spans = self._spans, []
        if self.cuda:
            return sum(start.elapsed_time(end) for start, end in spans)
        return sum(end - start for start, end in spans) * 1e3


def setup_comfy(tiny: bool) -> torch.device:
    """Put ComfyUI on the path, configure it before ``comfy.model_management`` is imported, load the pack.

    Without a GPU (``--tiny``) the kernel runs in the Triton interpreter unless ``TRITON_INTERPRET=0``
    is set, in which case every call stays dense ("not CUDA"), as for a ComfyUI user on a CPU.
    """
    path = os.environ.get("COMFYUI_PATH")
    if not path or not os.path.isfile(os.path.join(path, "comfy", "sd.py")):
        sys.exit(f"COMFYUI_PATH={path!r} is not a ComfyUI checkout: set it (source bench/gpu_comfy_env.sh on the GPU)")
    if not torch.cuda.is_available():
        if not tiny:
            sys.exit("full-size models need a CUDA GPU; use --tiny for a CPU plumbing check")
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from comfy_support import require_comfy

    require_comfy()
    from comfy.cli_args import args

    # Weights stay on the GPU between runs (as ComfyUI's --highvram): no offloading, no partial loads.
    args.highvram = torch.cuda.is_available()
    import comfy.model_management as mm

    # The pack as ComfyUI loads a custom node: a package (named like tests/conftest.py does) whose
    # modules import each other relatively.
    spec = importlib.util.spec_from_file_location(PACK, os.path.join(ROOT, "__init__.py"),
                                                  submodule_search_locations=[ROOT])
    sys.modules[PACK] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sys.modules[PACK])
    return mm.get_torch_device()


def sync(device: torch.device) -> None:
    """Wait for the GPU (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sample_timed(model, spec: ModelSpec, latent, steps: int, timer: AttentionTimer, device):
    """One sampling run; returns (final latent, seconds of each step, attention ms of each step)."""
    import comfy.sample
    from comfy_support import conditioning

    positive, negative = conditioning(spec.kind, spec.text_tokens, size=spec.size)
    noise = comfy.sample.prepare_noise(latent, SEED)
    marks, attention = [], []

    def callback(step, x0, x, total):
        sync(device)
        marks.append(time.perf_counter())
        attention.append(timer.collect_ms())

    sync(device)
    timer.collect_ms()
    start = time.perf_counter()
    out = comfy.sample.sample(model, noise, steps, 1.0, "euler", "simple", positive, negative, latent,
                              callback=callback, disable_pbar=True, seed=SEED)
    seconds = [b - a for a, b in zip([start] + marks[:-1], marks)]
    return out, seconds, attention


def compare(out: torch.Tensor, ref: torch.Tensor) -> dict:
    """relL1 = sum|out - ref| / sum|ref|, cosine similarity and RMSE of two latents."""
    out, ref = out.double().flatten(), ref.double().flatten()
    return {"rel_l1": ((out - ref).abs().sum() / ref.abs().sum()).item(),
            "cosine": torch.nn.functional.cosine_similarity(out, ref, dim=0).item(),
            "rmse": (out - ref).pow(2).mean().sqrt().item()}


def run_config(model, name, spec, latent, args, timer, device, ref):
    """Sample one configuration; returns (record for the results, final latent)."""
    from sparge_pack.nodes.patch import apply_sparge

    options = CONFIGS[name]
    if options is None:
        patched, state = model.clone(), None
    else:
        patched, state = apply_sparge(model, **{**COMMON, **options})
    if args.compile:
        # what ComfyUI's TorchCompileModel node does; no attention timer then (it would add graph breaks
        # around the unpatched model's attention)
        from comfy_api.torch_helpers import set_torch_compile_wrapper
        from comfy_extras.nodes_torch_compile import skip_torch_compile_dict

        torch._dynamo.reset()
        set_torch_compile_wrapper(model=patched, backend=args.compile,
                                  options={"guard_filter_fn": skip_torch_compile_dict})
    else:
        timer.attach(patched)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timer.host_s.clear()
    from sparge_pack.kernels.launch import Plan

    replays = Plan.replays
    steps = args.warmup + args.steps
    if args.profile and device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            out, seconds, attention = sample_timed(patched, spec, latent, steps, timer, device)
        print_kernels(prof, f"{spec.label} {name}", steps)
    else:
        out, seconds, attention = sample_timed(patched, spec, latent, steps, timer, device)
    timed = list(zip(seconds, attention))[args.warmup:]
    calls = timer.host_s[len(timer.host_s) * args.warmup // steps:]
    rec = {
        "host_us_per_call": statistics.median(calls) * 1e6 if calls else None,
        "s_per_step": statistics.median(s for s, _ in timed),
        "step_s": seconds,
        "attention_ms": attention,
        "attention_share": None if args.compile else statistics.median(a / 1e3 / s for s, a in timed),
        "finite": bool(torch.isfinite(out).all()),
    }
    if device.type == "cuda":
        rec["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    if ref is not None:
        rec.update(compare(out, ref))
    if state is not None:
        run = state.last_run
        steps = run.steps[args.warmup:]
        densities = [s.density for s in steps if s.density is not None]
        totals = run.totals()
        rec.update(
            density=statistics.mean(densities) if densities else None,
            density_per_step=[s.density for s in run.steps],
            pv_skipped=totals["pv_skipped"],
            sparse_calls_per_step=totals["sparse_calls"] / max(1, len(run.steps)),
            dense_calls_per_step={k: v / max(1, len(run.steps)) for k, v in totals["dense_calls"].items()},
        )
        rec["plan_replays"] = Plan.replays - replays  # sparse calls that replayed a launch plan
        rec["rope_in_kernel"] = state.rope_calls / max(1, len(run.steps))  # per step
        if totals["sparse_calls"] == 0:
            rec["warning"] = "no attention call ran sparse"
    return rec, out


def print_kernels(prof, title: str, steps: int, top: int = 18) -> None:
    """GPU kernels of a profiled sampling run by total time: launches and milliseconds per step."""
    per = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            n, us = per.get(e.name, (0, 0.0))
            per[e.name] = (n + 1, us + e.device_time)
    total = sum(us for _, us in per.values())
    print(f"  GPU kernels of {title} (torch profiler, {steps} steps; {total / 1e3 / steps:.1f} ms per step):")
    for name, (n, us) in sorted(per.items(), key=lambda x: -x[1][1])[:top]:
        print(f"    {us / 1e3 / steps:8.2f} ms/step {n / steps:7.1f} launches/step {us / n:9.1f} us each  {name[:80]}")


def describe(name: str, rec: dict) -> str:
    """The console line of one configuration (dense calls by reason, so a silent fallback shows)."""
    line = (f"  {name:>16}: {rec['s_per_step']:.3f} s/step (steps " + " ".join(f"{s:.3f}" for s in rec["step_s"])
            + f"), attention {fmt(rec['attention_share'] and 100 * rec['attention_share'], '.1f', '%')} of the step")
    if rec.get("plan_replays") is not None:
        line += f", {rec['plan_replays']} calls replayed a launch plan"
    if rec.get("host_us_per_call") is not None:
        line += f", {rec['host_us_per_call']:.0f} us of host time per attention call"
    if "rel_l1" in rec:
        line += f", vs unpatched relL1 {rec['rel_l1']:.3g} cosine {rec['cosine']:.6f} RMSE {rec['rmse']:.3g}"
    if "density" in rec:
        density = "n/a" if rec["density"] is None else f"{rec['density']:.3f}"
        dense = ", ".join(f"{n:g} × {r}" for r, n in sorted(rec["dense_calls_per_step"].items())) or "none"
        line += (f"; density {density}; per step {rec['sparse_calls_per_step']:g} sparse calls, dense: {dense}")
    if "peak_gib" in rec:
        line += f"; peak {rec['peak_gib']:.1f} GiB"
    if not rec["finite"]:
        line += "; NON-FINITE LATENT"
    if "warning" in rec:
        line += f"\n  WARNING: {rec['warning']}: the kernel never ran (see the dense reasons)"
    return line


def release(holder: dict) -> None:
    """Drop the model in ``holder["model"]`` and check that its weights are freed before the next one."""
    import comfy.model_management as mm

    ref = weakref.ref(holder.pop("model").model)
    mm.unload_all_models()
    gc.collect()
    mm.soft_empty_cache()
    if ref() is not None:
        print("  WARNING: the model is still referenced after unloading; its memory was not freed", flush=True)


def bench_model(key: str, spec: ModelSpec, configs: list, args, device, results: dict, clock: dict) -> None:
    """Build one model, run the configurations that fit the time budget, record them in ``results``."""
    from comfy_support import build_model
    from sparge_pack.nodes.patch import kernel_problem

    row = results["models"].setdefault(key, {"label": spec.label, "tokens": spec.tokens(), "target": spec.target,
                                             "steps": args.steps, "warmup": args.warmup, "configs": {}, "skipped": [],
                                             "errors": {}})
    need = spec.est_build_s + spec.est_step_s * clock["calib"] * (args.warmup + args.steps) * COST[configs[0]]
    left = clock["deadline"] - time.perf_counter()
    if need > left:
        print(f"\n== {spec.label}: skipped, needs ~{need:.0f} s to build and run {configs[0]}, {left:.0f} s left "
              f"in --budget-s; run it alone: --models {key}", flush=True)
        row["skipped"] += configs
        return
    problem = kernel_problem()
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        problem = "Triton interpreter on the CPU (TRITON_INTERPRET=1)"
    print(f"\n== {spec.label}: {spec.tokens()} tokens, latent {spec.latent}; sparse kernel: "
          f"{problem or 'available'}", flush=True)
    t0 = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    holder = {"model": build_model(spec.kind, spec.size, dtype=args.dtype, seed=SEED, device=device, norm_scale=1.0)}
    model = holder["model"]
    row["build_s"] = time.perf_counter() - t0
    if device.type == "cuda":
        row["build_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.empty_cache()  # the random state dict (one more copy of the weights) is gone
    peak = f", peak {row['build_peak_gib']:.1f} GiB while loading" if "build_peak_gib" in row else ""
    print(f"  built through comfy.sd.load_diffusion_model_state_dict in {row['build_s']:.1f} s "
          f"({model.model_size() / 2**30:.1f} GiB of {model.model.get_dtype()} weights{peak})", flush=True)
    latent = torch.zeros(spec.latent)
    ref = None
    for name in configs:
        step_s = row["configs"].get("unpatched", {}).get("s_per_step", spec.est_step_s * clock["calib"])
        need = step_s * COST[name] * (args.warmup + args.steps) + (COMPILE_S if name != "unpatched"
                                                                    and not clock["compiled"] else 0.0)
        left = clock["deadline"] - time.perf_counter()
        if need > left:
            print(f"  skipped {name}: needs ~{need:.0f} s, {left:.0f} s left in --budget-s", flush=True)
            row["skipped"].append(name)
            continue
        try:
            rec, out = run_config(model, name, spec, latent, args, AttentionTimer(device), device, ref)
        except torch.cuda.OutOfMemoryError as e:  # keep the rows measured so far; try the next configuration
            row["errors"][name] = f"CUDA out of memory: {str(e).splitlines()[0]}"
            print(f"  {name}: {row['errors'][name]}", flush=True)
            gc.collect()
            torch.cuda.empty_cache()
            write_outputs(results, args.out)
            continue
        clock["compiled"] |= name != "unpatched"
        if name == "unpatched":
            ref = out
            if spec.est_step_s:
                clock["calib"] = max(clock["calib"], rec["s_per_step"] / spec.est_step_s)
        row["configs"][name] = rec
        print(describe(name, rec), flush=True)
        write_outputs(results, args.out)
    del model
    release(holder)
    if device.type == "cuda":
        print(f"  released: {torch.cuda.memory_allocated(device) / 2**30:.2f} GiB still allocated", flush=True)


def fmt(x, spec: str, suffix: str = "") -> str:
    return "—" if x is None else f"{x:{spec}}{suffix}"


def render(results: dict) -> str:
    """The markdown report: environment, the summary table, per-configuration details."""
    meta = results["meta"]
    lines = [f"# End-to-end seconds per step in ComfyUI ({meta['device']})", "",
             f"{meta['date']}; torch {meta['torch']}, triton {meta['triton']}, ComfyUI {meta['comfyui']}, "
             f"default attention `{meta['attention']}`; RoPE: {meta.get('rope', 'not recorded')}; "
             f"{meta['dtype']} random weights, batch 1, cfg 1, euler/simple; "
             "seconds per step = median of the timed steps after the warm-up step(s) of each run."
             + (f" Every configuration compiled with torch.compile (backend {meta['compile']}) the way ComfyUI's "
                "TorchCompileModel node does it; attention share not measured then." if meta.get("compile") else ""),
             "",
             f"Command: `{meta['command']}`", "",
             "| model | unpatched s/step | full | top-k 0.5 | top-k 0.3 | speed-up at 0.5 | target (issue 7) | "
             "attention share | relL1 full |", "|---|---|---|---|---|---|---|---|---|"]
    for row in results["models"].values():
        c = row["configs"]

        def s(name):
            return fmt(c.get(name, {}).get("s_per_step"), ".3f")

        base, half = c.get("unpatched", {}).get("s_per_step"), c.get("topk0.5", {}).get("s_per_step")
        ratio = base / half if base and half else None
        speed = fmt(ratio, ".3f", "×")  # three decimals: a ratio just under its target must not print as met
        target = row.get("target")
        verdict = "—" if ratio is None or target is None else (
            f"≥ {target}×: {'met' if ratio >= target else 'missed'}")
        share = fmt(100 * c["unpatched"]["attention_share"] if c.get("unpatched", {}).get("attention_share") is not None
                    else None, ".0f", "%")
        lines.append(f"| {row['label']} ({row['tokens']} tok) | {s('unpatched')} | {s('full')} | {s('topk0.5')} | "
                     f"{s('topk0.3')} | {speed} | {verdict} | {share} | {fmt(c.get('full', {}).get('rel_l1'), '.3g')} |")
    lines += ["", "Attention share: of the unpatched step. Speed-up targets at top-k 0.5 (issue 7): "
              + ", ".join(f"{row['label']} ≥ {row['target']}×" for row in results["models"].values()) + ".", "",
              "Host µs/call: median wall time of the attention override's Python and launches per call (it "
              "includes waits for a full launch queue when the GPU is far behind, as in the video models); plan "
              "replays: sparse calls served by a recorded launch plan (`kernels/launch.py`; calls with "
              "B·H·Nq·Nk > 2³⁶ use the normal path). RoPE in kernel: sparse calls per step that rotated q and k inside "
              "the kernel instead of in ComfyUI (Flux and HunyuanVideo; — in results from before it existed).", "",
              "## Details", "",
              "| model | config | steps | s/step | attention ms/step | attention share | density | sparse calls/step | "
              "dense calls/step | relL1 | cosine | RMSE | peak GiB | host µs/call | plan replays | RoPE in kernel/step |",
              "|" + "---|" * 16]
    for row in results["models"].values():
        for name, rec in row["configs"].items():
            attn = None if rec["attention_share"] is None else statistics.median(rec["attention_ms"][row["warmup"]:])
            dense = ", ".join(f"{n:g} {r}" for r, n in sorted(rec.get("dense_calls_per_step", {}).items()))
            lines.append(
                f"| {row['label']} | {name} | {row['steps']} + {row['warmup']} warm-up | {rec['s_per_step']:.3f} "
                f"| {fmt(attn, '.0f')} | {fmt(rec['attention_share'] and 100 * rec['attention_share'], '.0f', '%')} "
                f"| {fmt(rec.get('density'), '.3f')} | {fmt(rec.get('sparse_calls_per_step'), 'g')} | {dense or '—'} "
                f"| {fmt(rec.get('rel_l1'), '.3g')} | {fmt(rec.get('cosine'), '.6f')} | {fmt(rec.get('rmse'), '.3g')} "
                f"| {fmt(rec.get('peak_gib'), '.1f')} | {fmt(rec.get('host_us_per_call'), '.0f')} "
                f"| {fmt(rec.get('plan_replays'), 'd')} | {fmt(rec.get('rope_in_kernel'), 'g')} |")
        for name, error in row.get("errors", {}).items():
            lines.append(f"| {row['label']} | {name}: {error} |" + " |" * 14)
        if row["skipped"]:
            lines.append(f"| {row['label']} | skipped (time budget): {', '.join(row['skipped'])} |" + " |" * 14)
    return "\n".join(lines) + "\n"


def write_report(out_dir: str, stem: str, results: dict, markdown: str) -> None:
    """``<stem>.json`` (the results) and ``<stem>.md`` (their table) in ``out_dir``; used by every
    ComfyUI benchmark."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{stem}.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out_dir, f"{stem}.md"), "w") as f:
        f.write(markdown)


def write_outputs(results: dict, out_dir: str) -> None:
    write_report(out_dir, "e2e", results, render(results))


def rope_backend() -> str:
    """What runs ComfyUI's RoPE (``comfy.ldm.flux.math.apply_rope1``, used by Flux, Wan and HunyuanVideo):
    the backend comfy-kitchen's registry picks for the op (before its per-call input checks), or
    ComfyUI's own torch ops without comfy-kitchen. Both the unpatched and the patched steps pay it, so
    a slower RoPE lowers every speed-up."""
    import comfy.ldm.flux.math as flux_math

    # ComfyUI 0.8.0 binds comfy-kitchen's function itself; 0.19.3 wraps it (``q_apply_rope1``, called
    # outside training); without comfy-kitchen both fall back to their own torch-op functions
    direct = getattr(flux_math.apply_rope1, "__module__", "").startswith("comfy_kitchen")
    if not direct and getattr(flux_math, "q_apply_rope1", None) is None:
        return "ComfyUI's torch ops (no comfy-kitchen)"
    import importlib.metadata

    import comfy_kitchen as ck
    from comfy_kitchen.exceptions import BackendError

    try:  # comfy-kitchen's own choice for a call (priority order, disabled backends, overrides)
        name = ck.registry.get_capable_backend("apply_rope1")
    except BackendError as exc:
        return f"comfy-kitchen, no backend with apply_rope1 ({exc})"
    return f"comfy-kitchen {importlib.metadata.version('comfy-kitchen')}, {name} backend"


def environment(device, args) -> dict:
    import comfy.ldm.modules.attention as attention
    import comfy.ops
    import comfyui_version

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    priority = getattr(comfy.ops, "SDPA_BACKEND_PRIORITY", None)
    backend = attention.optimized_attention.__name__
    if priority and backend == "attention_pytorch":
        backend += " (SDPA priority " + ", ".join(getattr(b, "name", str(b)) for b in priority) + ")"
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (tiny plumbing check)",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__, "triton": triton_version, "comfyui": comfyui_version.__version__,
        "attention": backend, "dtype": str(args.dtype).replace("torch.", ""),
        "command": "python3 " + " ".join(sys.argv), "patch": COMMON, "compile": getattr(args, "compile", None),
        "rope": rope_backend(),
    }


def merge(paths: list, out_dir: str) -> None:
    """One report from several runs' e2e.json (models of later files replace earlier ones)."""
    results = None
    for path in paths:
        with open(path) as f:
            part = json.load(f)
        if results is None:
            results = part
        else:
            results["models"].update(part["models"])
            results["meta"]["command"] += " ; " + part["meta"]["command"]
    write_outputs(results, out_dir)
    print(render(results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="wan1.3b,flux,wan14b,hunyuan",
                        help=f"comma-separated subset of {','.join(MODELS)}; run cheapest first")
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"comma-separated subset of {','.join(CONFIGS)}")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run (after --warmup)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first steps per run")
    parser.add_argument("--budget-s", type=float, default=540.0,
                        help="skip configurations that would end later than this many seconds after the start")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "out", "e2e"), help="folder for e2e.md / e2e.json")
    parser.add_argument("--tiny", action="store_true", help="tiny models (2 heads, 1-2 blocks): a CPU plumbing check")
    parser.add_argument("--compile", default=None, choices=["inductor", "aot_eager"],
                        help="compile every configuration as ComfyUI's TorchCompileModel node does (with this "
                             "backend); the first --warmup steps then include the compilation")
    parser.add_argument("--profile", action="store_true",
                        help="run each configuration under the torch profiler and print its GPU kernels by time "
                             "(a diagnostic: the profiler changes the timings)")
    parser.add_argument("--rope", default="installed", choices=["installed", "eager"],
                        help="'eager': disable comfy-kitchen's CUDA backend, so ComfyUI's RoPE runs on plain torch "
                             "ops, as it does for a CUDA 12 torch or with comfy-kitchen's pure-Python wheel")
    parser.add_argument("--merge", nargs="+", metavar="JSON",
                        help="only merge the e2e.json files of earlier runs into one report in --out")
    args = parser.parse_args()
    if args.merge:
        return merge(args.merge, args.out)
    start = time.perf_counter()
    keys = [k.strip() for k in args.models.split(",") if k.strip()]
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    for what, asked, known in (("--models", keys, MODELS), ("--configs", configs, CONFIGS)):
        bad = sorted(set(asked) - set(known))
        if bad:
            parser.error(f"{what}: unknown {bad}; choose from {', '.join(known)}")
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    if "unpatched" in configs:  # the reference for relL1 and the speed-ups comes first
        configs.remove("unpatched")
        configs.insert(0, "unpatched")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    device = setup_comfy(args.tiny)
    if args.rope == "eager":
        try:
            import comfy_kitchen
        except ImportError:
            pass  # ComfyUI then runs its own torch-op RoPE already
        else:
            comfy_kitchen.registry.disable("cuda")
    args.dtype = torch.float32 if args.tiny else torch.bfloat16
    specs = {k: MODELS[k] for k in keys}
    if args.tiny:
        specs = {k: ModelSpec(f"{k} (tiny)", s.kind, "tiny", TINY_LATENT[s.kind], 8, 0.0, 0.0, s.target)
                 for k, s in specs.items()}
    per_step = args.warmup + args.steps
    estimate = {k: s.est_build_s + s.est_step_s * per_step * sum(COST[c] for c in configs) for k, s in specs.items()}
    order = sorted(specs, key=estimate.get)
    results = {"meta": environment(device, args), "models": {}}
    meta = results["meta"]
    print(f"{meta['device']}; attention {meta['attention']}; RoPE {meta['rope']}; order "
          + ", ".join(f"{k} (~{estimate[k]:.0f} s)" for k in order), flush=True)
    clock = {"deadline": start + args.budget_s, "calib": 1.0, "compiled": False}
    for key in order:
        bench_model(key, specs[key], configs, args, device, results, clock)
    write_outputs(results, args.out)
    print("\n" + render(results))
    print(f"written to {args.out}/e2e.md and e2e.json; total {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
