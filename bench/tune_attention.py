"""Time the attention kernel alone over launch configurations (GPU only).

    python bench/tune_attention.py [--shapes flux,wan,cogvideox] [--topk 1.0,0.5]

For each shape, P.V path and top-k it prepares the buffers once, then times ``_attend`` under
every (num_warps, num_stages, pair) in the grid and prints one line per config with the time
and the relL1 of the output against fp32 dense attention on the first two heads. The chosen
defaults live in ``kernels.api._attention_config``; the measurements go to bench/NOTES.md.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from bench.bench_kernels import bench_ms, make_inputs, ref_rel_l1  # noqa: E402
from kernels import api as A  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="flux,wan,cogvideox")
    ap.add_argument("--topk", default="1.0,0.5")
    ap.add_argument("--pv", default="fp8,fp16")
    ap.add_argument("--warps", default="4,8")
    ap.add_argument("--stages", default="2,3,4")
    ap.add_argument("--pair", default="0,1")
    ap.add_argument("--bm", default="128", help="query rows per program (64 or 128)")
    ap.add_argument("--kernel", default="tl", help="tl (kernels/attention.py) and/or sm90 (kernels/attention_sm90.py)")
    ap.add_argument("--profile", action="store_true", help="only print per-kernel GPU times of whole calls")
    args = ap.parse_args()
    if args.profile:
        return profile(args)
    grid = list(itertools.product(args.kernel.split(","), [int(x) for x in args.bm.split(",")],
                                  [int(x) for x in args.warps.split(",")], [int(x) for x in args.stages.split(",")],
                                  [bool(int(x)) for x in args.pair.split(",")]))
    # the sm90 kernel has no paired walk
    grid = [c for c in grid if c[0] == "tl" or not c[4]]
    for name in args.shapes.split(","):
        q, k, v = make_inputs(name)
        g = A._check(q, k, v, "HND")
        scale = g.d**-0.5
        flops = 4.0 * g.b * g.h * g.nq * g.nk * g.d
        for pv in args.pv.split(","):
            # V's token order differs between the kernels: one preparation each
            bufs = {kn: A._prep_qk(q, k, v, g, scale, pv, sm90=kn == "sm90") for kn in {c[0] for c in grid}}
            for topk in [float(x) for x in args.topk.split(",")]:
                sel = A._blocks(next(iter(bufs.values())), g, scale, False, "topk", 0.98, -1.0, topk, None)
                for kernel, bm, warps, stages, pair in grid:
                    A.ATTN_CONFIG_OVERRIDE.clear()
                    A.ATTN_CONFIG_OVERRIDE.update(block_m=bm, num_warps=warps, num_stages=stages, pair=pair, kernel=kernel)
                    try:
                        fn = lambda b=bufs[kernel], q=q: A._attend(b, *sel, q, g, False, None, pv)  # noqa: E731
                        t = bench_ms(fn, budget_ms=400)
                        rel = ref_rel_l1(fn()[0], q, k, v) if topk == 1.0 else float("nan")
                        print(f"{name:10s} {pv:4s} {kernel:4s} topk={topk:<4} bm={bm} warps={warps} stages={stages} pair={int(pair)}  "
                              f"{t:8.3f} ms  {flops * topk / t / 1e9:6.0f} TOPS-eq  relL1={rel:.4f}", flush=True)
                    except Exception as exc:  # a config that does not compile (shared memory) is reported
                        print(f"{name:10s} {pv:4s} {kernel:4s} topk={topk:<4} bm={bm} warps={warps} stages={stages} pair={int(pair)}  "
                              f"FAILED {type(exc).__name__}: {str(exc).splitlines()[0][:120]}", flush=True)
            del bufs
        A.ATTN_CONFIG_OVERRIDE.clear()
        del q, k, v
        torch.cuda.empty_cache()


def profile(args):
    """Per-kernel GPU time of one whole ``sparge_attn`` call (torch.profiler, 5 calls averaged)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    from kernels import sparge_attn

    for name in args.shapes.split(","):
        q, k, v = make_inputs(name)
        for pv in args.pv.split(","):
            for topk in [float(x) for x in args.topk.split(",")]:
                kw = dict(mode="topk", topk=topk, sim_threshold=-1.0, pv_dtype=pv)
                for _ in range(3):
                    sparge_attn(q, k, v, **kw)
                torch.cuda.synchronize()
                with prof(activities=[ProfilerActivity.CUDA]) as p:
                    for _ in range(5):
                        sparge_attn(q, k, v, **kw)
                    torch.cuda.synchronize()
                rows = [(e.key, e.device_time_total / 5 / 1000.0) for e in p.key_averages() if e.device_time_total > 0]
                total = sum(t for _, t in rows)
                print(f"{name} {pv} topk={topk}: {total:.3f} ms of kernels per call")
                for key, t in sorted(rows, key=lambda r: -r[1]):
                    print(f"    {t:8.3f} ms  {100 * t / total:5.1f}%  {key[:70]}")
        del q, k, v
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
