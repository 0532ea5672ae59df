"""CogVideoX-5B through kijai's ComfyUI-CogVideoXWrapper: time per sampler step with and without SpargeAttn.

    # GPU (H100), from the pack root, carrying .comfyui (ComfyUI + the wrapper) and the wheels below:
    python3 -m pip install -q --no-index --no-deps --find-links .carry/wheels diffusers comfy-aimdo \\
        && python3 bench/bench_cogvideox.py --out $OUT
    python3 bench/bench_cogvideox.py --tiny --out /tmp/cogvideox     # CPU plumbing check (Triton interpreter)

What runs: the wrapper's own ``CogVideoXTransformer3DModel`` built from its ``transformer_config_5b.json``
(42 layers x 48 heads x 64, 5.6 B parameters) with random weights (PyTorch's default initialisation,
LayerNorm weights 1) directly on the GPU, in bf16, attention_mode "sdpa" (``F.scaled_dot_product_attention``,
cuDNN/flash on an H100), inside the wrapper's ``CogVideoXPipeline``. One step = one transformer call as the
wrapper's "CogVideo Sampler" makes it at cfg > 1: cond and uncond batched (B = 2), 720x480, 49 frames ->
latent (2, 13, 16, 60, 90) -> 13 x 30 x 45 = 17 550 video tokens + 226 text tokens = 17 776 per
attention, RoPE for that grid. Configurations, all on the same inputs:

* ``unpatched``: the loaded model as the wrapper runs it;
* ``full``, ``topk0.5`` (and ``topk0.3``, ``topk0.5-hilbert``, ``topk0.5-accurate`` with ``--configs``): the copy made by
  ``nodes.cogvideox.apply_sparge_cogvideox`` (what the "SpargeAttn CogVideoX" node runs), mode top-k,
  sparse from the first step, no dense blocks, min_tokens 0, sim_threshold -1 (only top-k decides),
  text protected, P·V skip off.

Random weights make attention nearly uniform, so the cdf mode would keep almost every block: the table
uses fixed top-k fractions. Time per step: median of ``--reps`` CUDA-event timings after ``--warmup``
calls (the first patched call compiles the Triton kernels). relL1 / cosine: the step's output (the
noise prediction) against the unpatched one, in fp32; at top-k 1.0 only the kernel's INT8 Q·Kᵀ and
FP8 P·V quantization differ. Density: the patch's own statistics (fraction of Q·Kᵀ blocks computed).
Attention per call: SDPA and the SpargeAttn kernel alone on random (2, 48, 17 776, 64) bf16 inputs with
the same settings; "attention share" = 42 x SDPA time / unpatched step time.

Results: a table on stdout, ``cogvideox.md`` and ``cogvideox.json`` in ``--out``. Expected on an H100:
about 1.5 minutes (import 10 s, build 15 s, Triton compilation 30 s, 4 configurations x 5 steps of
~1.4 s), peak GPU memory ~16 GiB (11 GiB of bf16 weights). ``COMFYUI_PATH`` and
``COGVIDEOX_WRAPPER_PATH`` default to ``.comfyui/ComfyUI`` and ``.comfyui/ComfyUI-CogVideoXWrapper``.
Needs diffusers and comfy-aimdo on top of the GPU image (wheels in ``.carry/wheels``); av, torchsde and
comfy-kitchen are not needed here.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports Triton

PACK = "sparge_pack"
TEXT = 226
sys.path.insert(0, ROOT)
from bench.bench_e2e import COMMON, CONFIGS, write_report  # noqa: E402  (the same node settings as the ComfyUI benchmark)
# off the path again: the pack is loaded by path as sparge_pack, and with the root on sys.path our kernels/ would
# pass for Hugging Face's `kernels` package, which diffusers (imported by the wrapper) probes for
sys.path.remove(ROOT)

# Full size: 720x480, 49 frames, cond + uncond. Tiny: 96x64, 9 frames, 2 layers x 2 heads, text width 32.
SIZES = {
    False: dict(latent=(2, 13, 16, 60, 90), pixels=(480, 720), config={}, text_dim=4096),
    True: dict(latent=(2, 3, 16, 8, 12), pixels=(64, 96), text_dim=32,
               config=dict(num_layers=2, num_attention_heads=2, text_embed_dim=32, time_embed_dim=32)),
}


def load_package(name: str, path: str):
    """Import the folder ``path`` as package ``name``, running its ``__init__`` (as ComfyUI loads a custom node)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, os.path.join(path, "__init__.py"),
                                                  submodule_search_locations=[path])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def setup(comfy_path: str, wrapper_path: str):
    """ComfyUI on sys.path (CPU mode without CUDA), then the wrapper and the pack; returns both packages."""
    for path, what in ((os.path.join(comfy_path, "comfy", "sd.py"), "a ComfyUI checkout (COMFYUI_PATH)"),
                       (os.path.join(wrapper_path, "custom_cogvideox_transformer_3d.py"),
                        "a ComfyUI-CogVideoXWrapper checkout (COGVIDEOX_WRAPPER_PATH)")):
        if not os.path.isfile(path):
            sys.exit(f"bench_cogvideox: {os.path.dirname(path)} is not {what}")
    sys.path.insert(0, comfy_path)
    from comfy.cli_args import args

    args.cpu = args.cpu or not torch.cuda.is_available()
    try:
        wrapper = load_package(os.path.basename(os.path.normpath(wrapper_path)), wrapper_path)
    except ImportError as e:
        sys.exit(f"bench_cogvideox: the wrapper failed to import ({e}); install its missing requirement "
                 "(GPU: pip install --no-index --find-links .carry/wheels <name>)")
    pack = load_package(PACK, ROOT)
    return wrapper, pack


def build(wrapper, tiny: bool, device: torch.device, dtype: torch.dtype) -> dict:
    """A COGVIDEOMODEL dict like the wrapper's CogVideoXModelLoader returns, around a random-weight 5B."""
    import importlib

    from diffusers.schedulers import CogVideoXDDIMScheduler

    root = os.path.dirname(wrapper.__file__)
    with open(os.path.join(root, "configs", "transformer_config_5b.json")) as f:
        config = json.load(f)
    with open(os.path.join(root, "configs", "scheduler_config_5b.json")) as f:
        scheduler_config = json.load(f)
    config.update(SIZES[tiny]["config"])
    cls = importlib.import_module(f"{wrapper.__name__}.custom_cogvideox_transformer_3d").CogVideoXTransformer3DModel
    torch.manual_seed(0)
    with torch.device(device):  # initialised on the GPU (fp32, 22 GiB for a moment), then cast: no host copy
        transformer = cls.from_config(config, attention_mode="sdpa").to(dtype).eval()
    pipeline_cls = importlib.import_module(f"{wrapper.__name__}.pipeline_cogvideox").CogVideoXPipeline
    pipe = pipeline_cls(transformer, CogVideoXDDIMScheduler.from_config(scheduler_config), dtype=dtype)
    return {"pipe": pipe, "dtype": dtype, "quantization": "disabled", "base_path": "random-cogvideox-5b",
            "onediff": False, "cpu_offloading": False, "scheduler_config": scheduler_config,
            "model_name": "random-cogvideox-5b", "manual_offloading": True}


def make_inputs(model: dict, tiny: bool, device, dtype) -> dict:
    size = SIZES[tiny]
    g = torch.Generator(device="cpu").manual_seed(1)
    latent = torch.randn(size["latent"], generator=g).to(device, dtype)
    text = torch.randn(size["latent"][0], TEXT, size["text_dim"], generator=g).to(device, dtype)
    height, width = size["pixels"]
    rope = model["pipe"]._prepare_rotary_positional_embeddings(height, width, latent.shape[1], device)
    return dict(hidden_states=latent, encoder_hidden_states=text, image_rotary_emb=rope,
                timestep=torch.full((latent.shape[0],), 500, device=device, dtype=torch.long))


def step(model: dict, inputs: dict) -> torch.Tensor:
    """One sampler step's transformer call (cond + uncond)."""
    with torch.no_grad():
        return model["pipe"].transformer(**inputs, return_dict=False)[0]


def timed(fn, warmup: int, reps: int, cuda: bool) -> tuple[float, object]:
    """(median milliseconds of ``fn()``, the last result)."""
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            out = fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            out = fn()
            times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times), out


def compare(out: torch.Tensor, ref: torch.Tensor) -> dict:
    """relL1 and cosine similarity in fp32."""
    o, r = out.float().flatten(), ref.float().flatten()
    return {"rel_l1": ((o - r).abs().sum() / r.abs().sum()).item(),
            "cosine": torch.nn.functional.cosine_similarity(o, r, dim=0).item()}


def attention_calls(pack, shape, warmup, reps, cuda, dtype, topks) -> dict:
    """SDPA vs the SpargeAttn kernel alone at the model's attention shape (text kept, same settings)."""
    from importlib import import_module

    kernels = import_module(f"{PACK}.kernels")
    device = "cuda" if cuda else "cpu"
    g = torch.Generator(device="cpu").manual_seed(2)
    q, k, v = (torch.randn(shape, generator=g).to(device, dtype) for _ in range(3))
    sdpa_ms, ref = timed(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), warmup, reps, cuda)
    rows = {"sdpa": {"ms": sdpa_ms}}
    for topk in topks:
        ms, out = timed(lambda: kernels.sparge_attn(q, k, v, mode="topk", topk=topk, sim_threshold=-1.0,
                                                    keep_ranges=[(0, TEXT)]), warmup, reps, cuda)
        rows[f"topk {topk}"] = {"ms": ms, "speedup": sdpa_ms / ms, **compare(out, ref)}
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "out", "cogvideox"), help="folder for the results")
    ap.add_argument("--tiny", action="store_true", help="2-layer model at 96x64, 9 frames (CPU plumbing check)")
    ap.add_argument("--configs", default="unpatched,full,topk0.5", help=f"comma list of {', '.join(CONFIGS)}")
    ap.add_argument("--warmup", type=int, default=None, help="untimed calls per configuration (default 1; tiny 0)")
    ap.add_argument("--reps", type=int, default=None, help="timed calls per configuration (default 3; tiny 1)")
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH", os.path.join(ROOT, ".comfyui", "ComfyUI")))
    ap.add_argument("--wrapper", default=os.environ.get("COGVIDEOX_WRAPPER_PATH",
                                                        os.path.join(ROOT, ".comfyui", "ComfyUI-CogVideoXWrapper")))
    args = ap.parse_args()
    configs = args.configs.split(",")
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown or configs[0] != "unpatched":
        sys.exit(f"--configs: start with 'unpatched' and use {', '.join(CONFIGS)}; got {args.configs}")
    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        sys.exit("bench_cogvideox: no CUDA GPU; the full-size run needs one (use --tiny for the CPU plumbing check)")
    warmup = args.warmup if args.warmup is not None else (0 if args.tiny else 1)
    reps = args.reps if args.reps is not None else (1 if args.tiny else 3)
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    os.makedirs(args.out, exist_ok=True)

    t0 = time.perf_counter()
    wrapper, pack = setup(args.comfyui, args.wrapper)
    from importlib import import_module

    cogvideox = import_module(f"{PACK}.nodes.cogvideox")
    t_import = time.perf_counter() - t0
    model = build(wrapper, args.tiny, device, dtype)
    inputs = make_inputs(model, args.tiny, device, dtype)
    t_build = time.perf_counter() - t0 - t_import
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    config = model["pipe"].transformer.config
    layers, heads = config.num_layers, config.num_attention_heads
    tokens = TEXT + inputs["hidden_states"].shape[1] * inputs["hidden_states"].shape[3] * \
        inputs["hidden_states"].shape[4] // 4
    print(f"CogVideoX-5B{' (tiny)' if args.tiny else ''}: {layers} layers x {heads} heads x "
          f"{config.attention_head_dim}, latent {tuple(inputs['hidden_states'].shape)}, {tokens} tokens per "
          f"attention, {dtype}, {device}; import {t_import:.0f} s, build {t_build:.0f} s", flush=True)

    rows, ref = {}, None
    for name in configs:
        t1 = time.perf_counter()
        if CONFIGS[name] is None:
            run_model, state = model, None
        else:
            run_model, state = cogvideox.apply_sparge_cogvideox(model, **{**COMMON, **CONFIGS[name]})
        first_patched = state is not None and not any(r.get("patched") for r in rows.values())
        ms, out = timed(lambda: step(run_model, inputs), warmup + (1 if first_patched and cuda else 0), reps, cuda)
        row = {"ms_per_step": ms, "patched": state is not None}
        if ref is None:
            ref = out.float()
        else:
            row.update(compare(out, ref))
            row["speedup"] = rows["unpatched"]["ms_per_step"] / ms
        if state is not None:
            totals = state.end_run().totals()
            row.update(density=totals["density"], sparse_calls=totals["sparse_calls"],
                       dense_calls=totals["dense_calls"])
            if totals["sparse_calls"] != layers * (warmup + reps + (1 if first_patched and cuda else 0)):
                print(f"  warning: {name}: {totals['sparse_calls']} sparse calls, dense: {totals['dense_calls']}")
        rows[name] = row
        print(f"  {name:16s} {ms:9.1f} ms/step  ({time.perf_counter() - t1:.0f} s)", flush=True)
        del out

    shape = (inputs["hidden_states"].shape[0], heads, tokens, config.attention_head_dim)
    # the kernel alone at each plain top-k setting (the Hilbert and accurate variants only change the patch)
    topks = [CONFIGS[c]["topk"] for c in configs if CONFIGS[c] is not None and set(CONFIGS[c]) == {"topk"}]
    attn = attention_calls(pack, shape, warmup + 1 if cuda else 0, max(reps, 5) if cuda else 1, cuda, dtype, topks)
    share = layers * attn["sdpa"]["ms"] / rows["unpatched"]["ms_per_step"]
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None

    result = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if cuda else "cpu (Triton interpreter)",
        "torch": torch.__version__, "triton": _version("triton"), "diffusers": _version("diffusers"),
        "wrapper": args.wrapper, "tiny": args.tiny, "layers": layers, "heads": heads, "tokens": tokens,
        "latent": list(inputs["hidden_states"].shape), "warmup": warmup, "reps": reps, "settings": COMMON,
        "steps": rows, "attention": attn, "attention_share": share, "peak_gib": peak,
        "seconds": time.perf_counter() - t0,
    }
    table = markdown(result)
    print("\n" + table)
    write_report(args.out, "cogvideox", result, table + "\n")
    print(f"written: {args.out}/cogvideox.md, cogvideox.json ({result['seconds']:.0f} s)")


def _version(name: str) -> str:
    try:
        return importlib.import_module(name).__version__
    except ImportError:
        return "not installed"


def _f(value, fmt):
    return "—" if value is None else format(value, fmt)


def _x(value):
    return "—" if value is None else f"{value:.2f}×"


def markdown(r: dict) -> str:
    """The results as a markdown table with its context."""
    lines = [
        f"CogVideoX-5B via ComfyUI-CogVideoXWrapper{' (tiny, CPU interpreter: not a speed)' if r['tiny'] else ''}, "
        f"{r['device']}, {r['date']}; torch {r['torch']}, triton {r['triton']}, diffusers {r['diffusers']}.",
        f"Random weights, {r['layers']} layers x {r['heads']} heads x 64, latent {tuple(r['latent'])} "
        f"(cond + uncond), {r['tokens']} tokens per attention; median of {r['reps']} step(s) after {r['warmup']} "
        f"warm-up (one more for the first patched configuration on a GPU: Triton compiles). Patched: top-k, "
        f"sparse from the first step, no dense blocks, text kept, sim_threshold -1, P·V skip off.",
        "",
        "| configuration | ms / step | speed-up | relL1 vs unpatched | cosine | density |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in r["steps"].items():
        lines.append(f"| {name} | {row['ms_per_step']:.1f} | {_x(row.get('speedup'))} | "
                     f"{_f(row.get('rel_l1'), '.4f')} | {_f(row.get('cosine'), '.5f')} | "
                     f"{_f(row.get('density'), '.3f')} |")
    lines += ["", f"Attention alone, {r['latent'][0]}×{r['heads']}×{r['tokens']}×64 per call "
                  f"(attention share of the unpatched step ≈ {r['attention_share']:.0%}):", "",
              "| kernel | ms / call | speed-up vs SDPA | relL1 vs SDPA |", "|---|---|---|---|"]
    for name, row in r["attention"].items():
        lines.append(f"| {name} | {row['ms']:.2f} | {_x(row.get('speedup'))} | "
                     f"{_f(row.get('rel_l1'), '.4f')} |")
    if r["peak_gib"] is not None:
        lines += ["", f"Peak GPU memory: {r['peak_gib']:.1f} GiB."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
