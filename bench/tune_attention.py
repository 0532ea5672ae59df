"""Time the attention kernel alone over launch configurations (GPU only).

    python bench/tune_attention.py [--shapes flux,wan,cogvideox] [--topk 1.0,0.5]

For each shape, P.V path and top-k it prepares the buffers once, then times ``_attend`` under
every (num_warps, num_stages, acc_in_dot) in the grid and prints one line per config with the time
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

from bench.bench_kernels import SHAPES, bench_ms, make_inputs, ref_rel_l1  # noqa: E402
from kernels import api as A  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="flux,wan,cogvideox")
    ap.add_argument("--topk", default="1.0,0.5")
    ap.add_argument("--pv", default="fp8,fp16")
    ap.add_argument("--warps", default="4,8")
    ap.add_argument("--stages", default="2,3,4")
    ap.add_argument("--acc", default="0,1")
    args = ap.parse_args()
    grid = list(itertools.product([int(x) for x in args.warps.split(",")], [int(x) for x in args.stages.split(",")],
                                  [bool(int(x)) for x in args.acc.split(",")]))
    for name in args.shapes.split(","):
        q, k, v = make_inputs(name)
        g = A._check(q, k, v, "HND")
        scale = g.d**-0.5
        flops = 4.0 * g.b * g.h * g.nq * g.nk * g.d
        for pv in args.pv.split(","):
            buf = A._prep_qk(q, k, v, g, scale, pv)
            for topk in [float(x) for x in args.topk.split(",")]:
                sel = A._select(buf, g, scale, False, "topk", 0.98, -1.0, topk, None)
                for warps, stages, acc in grid:
                    A.ATTN_CONFIG_OVERRIDE.clear()
                    A.ATTN_CONFIG_OVERRIDE.update(num_warps=warps, num_stages=stages, acc_in_dot=acc)
                    try:
                        fn = lambda: A._attend(buf, *sel[:3], q, g, False, None, pv)  # noqa: E731
                        t = bench_ms(fn, budget_ms=400)
                        rel = ref_rel_l1(fn()[0], q, k, v) if topk == 1.0 else float("nan")
                        print(f"{name:10s} {pv:4s} topk={topk:<4} warps={warps} stages={stages} acc_in_dot={int(acc)}  "
                              f"{t:8.3f} ms  {flops * topk / t / 1e9:6.0f} TOPS-eq  relL1={rel:.4f}", flush=True)
                    except Exception as exc:  # a config that does not compile (shared memory) is reported
                        print(f"{name:10s} {pv:4s} topk={topk:<4} warps={warps} stages={stages} acc_in_dot={int(acc)}  "
                              f"FAILED {type(exc).__name__}: {str(exc).splitlines()[0][:120]}", flush=True)
            del buf
        A.ATTN_CONFIG_OVERRIDE.clear()
        del q, k, v
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
