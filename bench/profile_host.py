"""Where the host time of one sparge_attn call goes (GPU only): cProfile over calls enqueued while the
GPU is held busy, so no call ever waits on the GPU.

    python bench/profile_host.py [--shape flux] [--calls 200]
"""

import argparse
import cProfile
import os
import pstats
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from bench.bench_kernels import SHAPES, gpu_kernels, host_us, make_inputs  # noqa: E402
from kernels import sparge_attn  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="flux", choices=list(SHAPES))
    ap.add_argument("--calls", type=int, default=200, help="calls under cProfile")
    ap.add_argument("--topk", type=float, default=0.5)
    ap.add_argument("--top", type=int, default=35, help="rows of the profile to print")
    ap.add_argument("--kernels", action="store_true", help="only print GPU time per kernel (torch profiler)")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU (host launch overhead does not exist in the interpreter)")
        return 0
    q, k, v = make_inputs(a.shape)
    f = lambda: sparge_attn(q, k, v, mode="topk", topk=a.topk, sim_threshold=-1.0)  # noqa: E731
    if a.kernels:
        per = gpu_kernels(f, reps=10)
        for name, (_, us) in sorted(per.items(), key=lambda x: -x[1][1]):
            print(f"{us:10.1f} us  {name[:90]}")
        print(f"{sum(us for _, us in per.values()):10.1f} us  total GPU time per call ({a.shape}, top-k {a.topk})")
        return 0
    # 50 calls (350 launches) stay below the GPU's launch queue depth, so none waits for a free slot
    print(f"host time per call: {host_us(f):.0f} us (without the profiler)")
    torch.cuda._sleep(int(4e9))  # profile calls that never wait on the GPU
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(a.calls):
        f()
    prof.disable()
    torch.cuda.synchronize()
    from kernels import api as A

    g = A._check(q, k, v, "HND")
    sc = g.d**-0.5
    buf = A._prep_qk(q, k, v, g, sc, "fp8")
    sel = A._blocks(buf, g, sc, False, "topk", 0.98, -1.0, a.topk, None)
    parts = {
        "whole call": f,
        "_check": lambda: A._check(q, k, v, "HND"),
        "_prep_qk (4 launches)": lambda: A._prep_qk(q, k, v, g, sc, "fp8"),
        "_select (2 launches)": lambda: A._select(buf, g, sc, False, "topk", 0.98, -1.0, a.topk, None),
        "_attend (1 launch)": lambda: A._attend(buf, *sel, q, g, False, None, "fp8"),
        "torch.empty x1": lambda: torch.empty(24, 4608, 128, device="cuda", dtype=torch.int8),
        "torch.empty_like(q) x1": lambda: torch.empty_like(q),
    }
    from kernels import launch as L

    for plans, fast in ((True, True), (False, True), (False, False)):
        L.Plan.enabled, L._Fast.enabled = plans, fast
        mode = f"plans {'on ' if plans else 'off'}, fast launch {'on ' if fast else 'off'}"
        for name, fn in (parts.items() if not plans else [("whole call", f)]):
            print(f"{mode} {name:28s} {host_us(fn, 20):8.1f} us")
    L.Plan.enabled, L._Fast.enabled = True, True
    pstats.Stats(prof).sort_stats("tottime").print_stats(a.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
