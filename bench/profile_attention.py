"""Drive the attention launch alone, for a profiler such as Nsight Compute (GPU only).

    python bench/profile_attention.py --shape flux --topk 1.0 [--pv fp8] [--bm 64] [--calls 3]
    ncu --clock-control none -k regex:_attn_kernel --launch-skip 1 --launch-count 1 \
        --set full -o flux_full python bench/profile_attention.py --shape flux --topk 1.0

The inputs are the benchmark's (``bench_kernels.make_inputs``); the preparation and the selection run
once, then the attention launch runs ``--calls`` times (the first one compiles). ``bench/ncu.sh`` runs
Nsight Compute over it and prints the stall reasons per SASS instruction of the main loop.
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from bench.bench_kernels import SHAPES, bench_ms, make_inputs  # noqa: E402
from kernels import api as A  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="flux", choices=list(SHAPES))
    ap.add_argument("--topk", type=float, default=1.0)
    ap.add_argument("--pv", default="fp8", choices=["fp8", "fp16"])
    ap.add_argument("--bm", type=int, default=None, help="query rows per program (default: the launch code's choice)")
    ap.add_argument("--heads", type=int, default=None, help="keep only the first H heads (shorter launches)")
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--time", action="store_true", help="also print the attention launch's median time")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 1
    q, k, v = make_inputs(a.shape)
    if a.heads:
        q, k, v = (x[:, : a.heads].contiguous() for x in (q, k, v))
    if a.bm:
        A.ATTN_CONFIG_OVERRIDE["block_m"] = a.bm
    g = A._check(q, k, v, "HND")
    scale = g.d**-0.5
    buf = A._prep_qk(q, k, v, g, scale, a.pv)
    sel = A._blocks(buf, g, scale, False, "topk", 0.98, -1.0, a.topk, None)  # top-k 1: no LUT, as in a call
    fn = lambda: A._attend(buf, *sel, q, g, False, None, a.pv)  # noqa: E731
    for _ in range(a.calls):
        fn()
    torch.cuda.synchronize()
    if a.time:
        t = bench_ms(fn)
        flops = 4.0 * g.b * g.h * g.nq * g.nk * g.d * a.topk
        print(f"{a.shape} {tuple(q.shape)} topk={a.topk} pv={a.pv} bm={A._sm90_config(g.dp, g.b * g.h * g.nqb, a.pv == 'fp16')['block_m']}: "
              f"attention {t:.3f} ms, {flops / t / 1e9:.0f} TOPS-eq", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
