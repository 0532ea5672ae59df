"""Where the host time of one sparge_attn call goes (GPU only): cProfile over calls enqueued while the
GPU is held busy, so no call ever waits on the GPU.

    python bench/profile_host.py [--shape flux] [--calls 200]
"""

import argparse
import cProfile
import os
import pstats
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from bench.bench_kernels import SHAPES, make_inputs  # noqa: E402
from kernels import sparge_attn  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="flux", choices=list(SHAPES))
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--topk", type=float, default=0.5)
    ap.add_argument("--top", type=int, default=35, help="rows of the profile to print")
    ap.add_argument("--kernels", action="store_true", help="only print GPU time per kernel (torch profiler)")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU (host launch overhead does not exist in the interpreter)")
        return 0
    q, k, v = make_inputs(a.shape)
    f = lambda: sparge_attn(q, k, v, mode="topk", topk=a.topk, sim_threshold=-1.0)  # noqa: E731
    for _ in range(3):
        f()
    torch.cuda.synchronize()
    if a.kernels:
        from torch.profiler import ProfilerActivity, profile

        reps = 10
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                f()
            torch.cuda.synchronize()
        per = {}
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                per[e.name] = per.get(e.name, 0.0) + e.device_time / reps
        for name, us in sorted(per.items(), key=lambda x: -x[1]):
            print(f"{us:10.1f} us  {name[:90]}")
        print(f"{sum(per.values()):10.1f} us  total GPU time per call ({a.shape}, top-k {a.topk})")
        return 0
    torch.cuda._sleep(int(4e9))
    t0 = time.perf_counter()
    for _ in range(a.calls):
        f()
    plain = (time.perf_counter() - t0) / a.calls * 1e6
    torch.cuda.synchronize()
    torch.cuda._sleep(int(4e9))
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(a.calls):
        f()
    prof.disable()
    torch.cuda.synchronize()
    print(f"host time per call: {plain:.0f} us (without the profiler)")
    from kernels import api as A

    def host_us(fn, reps=20):
        fn()
        torch.cuda.synchronize()
        torch.cuda._sleep(int(2e9))
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        t = (time.perf_counter() - t0) / reps * 1e6
        torch.cuda.synchronize()
        return t

    g = A._check(q, k, v, "HND")
    sc = g.d**-0.5
    buf = A._prep_qk(q, k, v, g, sc, "fp8")
    sel = A._select(buf, g, sc, False, "topk", 0.98, -1.0, a.topk, None)
    parts = {
        "whole call": f,
        "_check": lambda: A._check(q, k, v, "HND"),
        "_prep_qk (4 launches)": lambda: A._prep_qk(q, k, v, g, sc, "fp8"),
        "_select (2 launches)": lambda: A._select(buf, g, sc, False, "topk", 0.98, -1.0, a.topk, None),
        "_attend (1 launch)": lambda: A._attend(buf, *sel[:3], q, g, False, None, "fp8"),
        "torch.empty x1": lambda: torch.empty(24, 4608, 128, device="cuda", dtype=torch.int8),
        "torch.empty_like(q) x1": lambda: torch.empty_like(q),
    }
    for fast in (True, False):
        A._Fast.enabled = fast
        for name, fn in parts.items():
            print(f"fast launch {'on ' if fast else 'off'} {name:28s} {host_us(fn):8.1f} us")
    A._Fast.enabled = True
    pstats.Stats(prof).sort_stats("tottime").print_stats(a.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
