"""SpargeAttn kernel benchmark: our Triton kernel vs dense SDPA (cuDNN) and SageAttention at model shapes.

    python bench/bench_kernels.py                 # GPU: the comparison table; CPU: a small interpreter demo
    python bench/bench_kernels.py --shapes flux,wan --out bench/results/h100.md

On a GPU every row is timed in this one process (median of CUDA-event timings after warm-up, L2 flushed
between repetitions, the repetitions enqueued back to back as ``triton.testing.do_bench``, with which
the anchors of ``../shared/docs/anchors.md`` were measured) and the ratio is SDPA-cuDNN time / time. The
rows of one shape are timed in ``--rounds`` interleaved rounds (cuDNN, SageAttention, each of ours, then
again), and each time is the median over the rounds: the GPU's clock drifts over seconds with its power
draw, so the same launch timed twice a few seconds apart can differ by 5-10% at Flux size
(bench/NOTES.md #42), and a cuDNN time taken once, before all of ours, would carry that drift into every
ratio. The ratio's range over the rounds (cuDNN and ours of the same round) is printed next to it.
relL1 = sum|o - r| / sum|r| against fp32 dense attention on the first two heads. Inputs are bf16 (SageAttention gets fp16).
"grid" inputs have local, diffusion-like attention (Q/K from each token's position on the model's
latent grid, heads of different reach); "gauss" inputs are standard normal (nothing to prune).
"prep / predict / attn": GPU kernel time of each phase (quantize + pool, pooled scores + selection,
attention) from the torch profiler over calls back to back, so the host time between launches is not
in it.

Without a GPU the script runs the same kernel through the Triton interpreter at 1 x 2 x 1024 x 128
and says so; those numbers are correctness checks, not speeds.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernels import api as A  # noqa: E402
from kernels import reference as R  # noqa: E402
from kernels import sparge_attn  # noqa: E402

# name: (B, H, N, D, grid for the synthetic local inputs, input kind)
SHAPES = {
    "flux": (1, 24, 4608, 128, (1, 72, 64), "grid"),
    "wan": (1, 40, 32760, 128, (21, 30, 52), "grid"),
    "cogvideox": (1, 48, 17776, 64, (1, 16, 1111), "grid"),
    "hunyuan": (1, 24, 119056, 128, None, "gauss"),
}
LABEL = {
    "flux": "Flux 1024² 1×24×4608×128",
    "wan": "Wan 480p 1×40×32760×128",
    "cogvideox": "CogVideoX-5B 1×48×17776×64",
    "hunyuan": "HunyuanVideo 720p 1×24×119056×128",
}
SETTINGS = [("full", 1.0), ("topk 0.5", 0.5), ("topk 0.15", 0.15)]


def bench_ms(fn, budget_ms: float = 800.0, min_reps: int = 5, max_reps: int = 200, sync_each: bool = False) -> float:
    """Median milliseconds of ``fn()`` timed with CUDA events, L2 flushed (256 MB zeroed) before each repetition.

    As ``triton.testing.do_bench``, with which ``../shared/docs/anchors.md`` (the issue's reference figures)
    was measured: the repetitions are enqueued back to back and synchronised once, so each one times the
    GPU work between its two events while the host enqueues ahead, as it does inside a model. With
    ``sync_each`` the host waits for every repetition before enqueuing the next flush and call: the GPU then
    idles while the host enqueues the call, and a ~0.4 ms call carries the host's speed (NOTES #49, #50)."""
    flush = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device="cuda")
    fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    fn()
    e.record()
    torch.cuda.synchronize()
    est = max(s.elapsed_time(e), 1e-3)
    reps = int(min(max_reps, max(min_reps, budget_ms / est)))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for s, e in events:
        flush.zero_()
        s.record()
        fn()
        e.record()
        if sync_each:
            torch.cuda.synchronize()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def peak_mib(fn) -> float:
    """Extra GPU memory (MiB) allocated at the peak of one call of ``fn`` beyond what exists before."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak / 2**20


def make_inputs(name: str, dtype=torch.bfloat16):
    b, h, n, d, grid, kind = SHAPES[name]
    torch.manual_seed(1234)
    if kind == "grid":
        q, k, v = R.local_qkv(b, h, n, d, grid=grid if grid and grid[0] * grid[1] * grid[2] == n else None,
                              dtype=dtype, device="cuda")
    else:
        q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=dtype) for _ in range(3))
    return q, k, v


def ref_rel_l1(out, q, k, v, heads=2) -> float:
    ref = R.dense_attention(q[:, :heads].float(), k[:, :heads].float(), v[:, :heads].float())
    return R.metrics(out[:, :heads].float(), ref)["rel_l1"]


#: which phase of a call each of our kernels belongs to (bench table's time split)
PHASES = {"_colstats_kernel": 0, "_qk_prep_kernel": 0, "_v_prep_kernel": 0, "_v_fix_kernel": 0, "_scores_kernel": 1,
          "_select_kernel": 1, "_attn_kernel": 2, "_attn_kernel_sm90": 2}


def split_ms(f):
    """(quantize/pool, predict, attention) milliseconds of GPU kernel time per call of ``f`` (torch
    profiler, calls back to back), independent of the host time between the launches. Measured with
    programmatic dependent launch off: with it a kernel starts early and its profiled time includes the
    wait for the previous kernel of the call."""
    parts = [0.0, 0.0, 0.0]
    pdl, A.PDL = A.PDL, False
    try:
        per = gpu_kernels(f)
    finally:
        A.PDL = pdl
    for name, (_, us) in per.items():
        if name in PHASES:
            parts[PHASES[name]] += us / 1e3
    return tuple(parts)


def gpu_kernels(fn, reps: int = 5) -> dict:
    """Per CUDA kernel name of one ``fn()``: (launches per call, GPU microseconds per call), from the
    torch profiler over ``reps`` calls."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    per = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            n, us = per.get(e.name, (0.0, 0.0))
            per[e.name] = (n + 1 / reps, us + e.device_time / reps)
    return per


def host_us(fn, reps: int = 50) -> float:
    """Host microseconds per ``fn()`` call: the wall time to enqueue ``reps`` calls while the GPU is held
    busy, so that no call waits on the GPU."""
    import time

    fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(int(2e9))  # ~1 s of GPU time
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    t = (time.perf_counter() - t0) / reps * 1e6
    torch.cuda.synchronize()
    return t


class Synced:
    """An entry of :func:`interleaved` timed with ``bench_ms(..., sync_each=True)``."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self):
        return self.fn()


def interleaved(fns: dict, rounds: int, budget_ms: float = 800.0) -> dict:
    """Per name of ``fns``: its ``bench_ms`` times over ``rounds`` rounds, each round timing every function
    once in order (so slow drifts of the GPU clock reach all of them alike). :class:`Synced` entries are
    timed with the host waiting for each repetition."""
    # compile and record launch plans before the first round: ``bench_ms``'s own untimed first call would
    # do it too, but the GPU would idle for seconds of compilation between the functions of round 1
    for fn in fns.values():
        fn()
    torch.cuda.synchronize()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(bench_ms(fn, budget_ms=budget_ms / rounds, sync_each=isinstance(fn, Synced)))
    return times


def ratio_cell(t_ref: list, t: list) -> str:
    """``a.bc×`` (median time of the reference over median time), with the range of the per-round ratios
    when there are several rounds."""
    r = statistics.median(t_ref) / statistics.median(t)
    if len(t) < 2:
        return f"{r:.2f}×"
    per = [a / b for a, b in zip(t_ref, t)]
    return f"{r:.2f}× ({min(per):.2f}–{max(per):.2f})"


def graphed(fn):
    """A CUDA graph of one ``fn()`` call (warmed up on a side stream first, as capture requires)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def overhead(q, k, v, kw: dict, f_sdpa, rounds: int):
    """(kernel launches per call, host microseconds per call, {timing: ms times over interleaved rounds}) with
    the timings "eager", "graph" (CUDA-graph replay), "synced" (eager, the host waiting for each call) and
    the same for cuDNN ("sdpa", "sdpa_graph", "sdpa_synced").

    The graphs replay the same launches without Python: replay against replay compares the two on the GPU
    alone. "synced" starts every call on an idle GPU, so the GPU also waits while the host enqueues the call:
    a short call's synced time moves with the host's speed, cuDNN's too (NOTES #49, #50)."""
    f = lambda: sparge_attn(q, k, v, **kw)  # noqa: E731
    launches = sum(n for n, _ in gpu_kernels(f).values())
    host = host_us(f)
    graph, graph_sdpa = graphed(f), graphed(f_sdpa)
    t = interleaved({"sdpa": f_sdpa, "sdpa_graph": graph_sdpa.replay, "sdpa_synced": Synced(f_sdpa),
                     "eager": f, "graph": graph.replay, "synced": Synced(f)}, rounds)
    return launches, host, t


def run_gpu(names, pv_paths, with_sage: bool, lines: list, rounds: int = 3):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    sage = None
    if with_sage:
        try:
            from sageattention import sageattn as sage
        except ImportError as exc:
            print(f"SageAttention not available ({exc}); its column stays empty", flush=True)
    dev = torch.cuda.get_device_name()
    import triton

    head = (f"{dev}, torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}, "
            f"{datetime.date.today().isoformat()}")
    lines += ["# SpargeAttn kernel benchmark", "", head, "",
              f"Times: median over {rounds} interleaved rounds; × cuDNN: ratio of the medians (in brackets the range of "
              "the ratios of the single rounds).", ""]
    lines += ["| shape | input | setting | P·V | time ms | × cuDNN | density | relL1 | prep / predict / attn ms (GPU) | peak MiB |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    overheads = []
    cudnn = functools.partial(sdpa_kernel, [SDPBackend.CUDNN_ATTENTION])  # around every timing and call of f_sdpa
    for name in names:
        q, k, v = make_inputs(name)
        kind = SHAPES[name][5]
        f_sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)  # noqa: E731

        fns = {"sdpa": f_sdpa}
        if sage is not None:
            qh, kh, vh = q.half(), k.half(), v.half()
            fns["sage"] = lambda: sage(qh, kh, vh, tensor_layout="HND", is_causal=False)  # noqa: E731
        ours = {}
        for pv in pv_paths:
            for label, topk in SETTINGS:
                ours[(pv, label)] = dict(mode="topk", topk=topk, sim_threshold=-1.0, pv_dtype=pv)
                fns[(pv, label)] = functools.partial(sparge_attn, q, k, v, **ours[(pv, label)])
        with cudnn():
            times = interleaved(fns, rounds)
            rel_sdpa, mem_sdpa = ref_rel_l1(f_sdpa(), q, k, v), peak_mib(f_sdpa)
        t_sdpa = times["sdpa"]
        lines.append(f"| {LABEL[name]} | {kind} | SDPA cuDNN (bf16) | — | {statistics.median(t_sdpa):.3f} | 1.00× | 1 | "
                     f"{rel_sdpa:.4f} | — | {mem_sdpa:.0f} |")
        print(lines[-1], flush=True)
        if sage is not None:
            t_sage = times["sage"]
            rel_sage = ref_rel_l1(fns["sage"](), qh, kh, vh)
            lines.append(f"| {LABEL[name]} | {kind} | SageAttention 1.0.6 (fp16) | fp16 | {statistics.median(t_sage):.3f} | "
                         f"{ratio_cell(t_sdpa, t_sage)} | 1 | {rel_sage:.4f} | — | — |")
            print(lines[-1], flush=True)
            del qh, kh, vh
        for (pv, label), kw in ours.items():
            f = fns[(pv, label)]
            t = times[(pv, label)]
            out, stats = sparge_attn(q, k, v, return_stats=True, **kw)
            rel = ref_rel_l1(out, q, k, v)
            dens = float(stats["density"].mean())
            t_prep, t_pred, t_attn = split_ms(f)
            mem = peak_mib(f)
            lines.append(
                f"| {LABEL[name]} | {kind} | ours {label} | {pv} | {statistics.median(t):.3f} | {ratio_cell(t_sdpa, t)} | "
                f"{dens:.2f} | {rel:.4f} | {t_prep:.3f} / {t_pred:.3f} / {t_attn:.3f} | {mem:.0f} |"
            )
            print(lines[-1], flush=True)
            del out
        if name == "wan":
            # accuracy at full density on gaussian inputs (the kernel issue's bound)
            gq, gk, gv = (torch.randn_like(q) for _ in range(3))
            for pv in pv_paths:
                o = sparge_attn(gq, gk, gv, mode="topk", topk=1.0, sim_threshold=-1.0, pv_dtype=pv)
                lines.append(f"| {LABEL[name]} | gauss | ours full | {pv} | — | — | 1 | {ref_rel_l1(o, gq, gk, gv):.4f} | — | — |")
                print(lines[-1], flush=True)
            del gq, gk, gv
        if name == "flux":
            for label, topk in SETTINGS[:2]:
                kw = dict(mode="topk", topk=topk, sim_threshold=-1.0, pv_dtype=pv_paths[0])
                with cudnn():
                    launches, host_us, t = overhead(q, k, v, kw, f_sdpa, rounds)
                med = {key: f"{statistics.median(x):.3f}" for key, x in t.items()}
                overheads.append(f"| {LABEL[name]} | ours {label} | {launches:.0f} | {host_us:.0f} | "
                                 f"{med['eager']} / {med['sdpa']} | {med['graph']} / {med['sdpa_graph']} | "
                                 f"{med['synced']} / {med['sdpa_synced']} | {ratio_cell(t['sdpa'], t['eager'])} | "
                                 f"{ratio_cell(t['sdpa_graph'], t['graph'])} | {ratio_cell(t['sdpa_synced'], t['synced'])} |")
                print(overheads[-1], flush=True)
        del q, k, v
        torch.cuda.empty_cache()
    if overheads:
        lines += ["", "Host overhead: each call timed three ways, ours / cuDNN's in the same interleaved rounds: eager "
                  "(enqueued back to back, as the main table), replayed from a CUDA graph (each from its own), and "
                  "synced (the host waits for every call, so the GPU idles while the next one is enqueued); "
                  "× cuDNN = cuDNN time / ours, the same way:", "",
                  "| shape | setting | GPU kernels / call | host µs / call | eager ms | graph replay ms | synced ms | "
                  "eager × cuDNN | replay × cuDNN | synced × cuDNN |",
                  "|---|---|---|---|---|---|---|---|---|---|"] + overheads
    return lines


def run_cpu(lines: list):
    lines += ["# SpargeAttn kernel demo on the CPU", "",
              "No CUDA GPU found: this runs the Triton kernels in the Triton interpreter (TRITON_INTERPRET=1)",
              "at 1 x 2 x 1024 x 128. It checks correctness only; the interpreter's times mean nothing.", ""]
    q, k, v = R.local_qkv(1, 2, 1024, 128, grid=(1, 32, 32), dtype=torch.float16, generator=torch.Generator().manual_seed(0))
    dense = R.dense_attention(q, k, v)
    lines += ["| setting | P·V | density | relL1 vs dense | relL1 vs reference (same mask) |", "|---|---|---|---|---|"]
    for pv in ("fp8", "fp16"):
        for label, topk in SETTINGS:
            out, stats = sparge_attn(q, k, v, mode="topk", topk=topk, sim_threshold=-1.0, pv_dtype=pv, return_stats=True)
            mask = A.predict_block_mask(q, k, mode="topk", topk=topk, sim_threshold=-1.0)
            emu, _ = R.block_sparse_attention(q, k, v, mask, quant=pv, **A.walk_options(q.shape[-1], q.shape[2], q.shape[0] * q.shape[1]))
            lines.append(f"| {label} | {pv} | {float(stats['density'].mean()):.2f} | "
                         f"{R.metrics(out, dense)['rel_l1']:.4f} | {R.metrics(out, emu)['rel_l1']:.2e} |")
            print(lines[-1], flush=True)
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated: " + ", ".join(SHAPES))
    ap.add_argument("--pv", default=None, help="comma-separated P.V paths (default: fp8,fp16 where FP8 exists)")
    ap.add_argument("--no-sage", action="store_true", help="skip SageAttention even if installed")
    ap.add_argument("--out", default=None, help="also write the markdown table to this file")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds per shape (GPU)")
    args = ap.parse_args(argv)
    lines: list = []
    if torch.cuda.is_available():
        names = [s.strip() for s in args.shapes.split(",") if s.strip()]
        unknown = [s for s in names if s not in SHAPES]
        if unknown:
            ap.error(f"unknown shapes {unknown}; choose from {list(SHAPES)}")
        pv_paths = args.pv.split(",") if args.pv else (["fp8", "fp16"] if A.default_pv_dtype("cuda") == "fp8" else ["fp16"])
        if args.rounds < 1:
            ap.error("--rounds must be at least 1")
        run_gpu(names, pv_paths, not args.no_sage, lines, args.rounds)
    else:
        run_cpu(lines)
    text = "\n".join(lines) + "\n"
    print()
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
