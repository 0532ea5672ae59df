"""What each launch of a sparge_attn call costs inside the call's chain of launches (GPU only).

The bench's split (``bench_kernels.split_ms``) sums each kernel's GPU time with programmatic dependent
launch off. A real call chains its 6-7 launches with PDL, so a short kernel can cost more or less than
its own time. This script records one call's launch plan and replays subsets of it on the same inputs
and workspace, each as a CUDA graph and eagerly (L2 flushed before every repetition):

* the whole call, the attention launch alone and everything before it: the share of the call that the
  preparation and prediction cost, as the caller pays it;
* the whole call minus one launch at a time: what removing (fusing away) that launch could save at most;
* a bytes floor for the preparation: one launch that reads Q, K and V and writes 1-byte copies of them.

    python bench/chain_split.py [--shape flux] [--topk 0.5] [--rounds 3]

A skipped launch leaves its buffers as the previous replay wrote them (the same inputs, so the same
values), so the launches after it do the same work. Only the whole call's output is checked (it must
equal the normal call's). The subsets are measured in ``--rounds`` alternating rounds and printed as
median [min, max]: at the video shapes the small launches are below the run-to-run spread.
"""

import argparse
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from bench.bench_kernels import SHAPES, make_inputs  # noqa: E402
from kernels import api as A  # noqa: E402
from kernels import sparge_attn  # noqa: E402


def _timer():
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")

    def timed(fn, reps: int) -> float:
        """Median microseconds of ``fn()``, L2 flushed before each repetition (the flush queued ahead)."""
        events = []
        for _ in range(reps):
            flush.zero_()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            events.append((s, e))
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in events) * 1e3

    def graphed(fn, reps: int) -> float:
        fn()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        return timed(g.replay, reps)

    return timed, graphed


def _floor_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def copy_to_bytes(Q, K, V, Q8, K8, V8, ROWS, BLK: tl.constexpr, DP: tl.constexpr):
        pid = tl.program_id(0)
        nb = ROWS // BLK
        which = pid // nb
        offs = ((pid % nb).to(tl.int64) * BLK + tl.arange(0, BLK))[:, None] * DP + tl.arange(0, DP)[None, :]
        if which == 0:
            tl.store(Q8 + offs, (tl.load(Q + offs).to(tl.float32) * 20.0).to(tl.int8))
        elif which == 1:
            tl.store(K8 + offs, (tl.load(K + offs).to(tl.float32) * 20.0).to(tl.int8))
        else:
            tl.store(V8 + offs, tl.load(V + offs).to(tl.float8e4nv))

    return copy_to_bytes


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="flux", choices=list(SHAPES))
    ap.add_argument("--topk", type=float, default=0.5)
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU: launch chains and PDL do not exist in the interpreter")
        return 0
    timed, graphed = _timer()
    q, k, v = make_inputs(a.shape)
    b, h, n, d = q.shape

    def call():
        return sparge_attn(q, k, v, mode="topk", topk=a.topk, sim_threshold=-1.0)

    A._PLANS.clear()
    want = call()
    call()  # the second call with this key replays the recorded plan
    plan = next((p for p in A._PLANS.values() if p not in (None, ...)), None)
    if plan is None:
        print("this call takes no launch plan (see api._PLAN_MAX_WORK); nothing to split")
        return 0
    ws = torch.empty(max(plan.size, 1), dtype=torch.uint8, device="cuda")
    out = torch.empty_like(q)
    # the plan's input slots: q, k, v, out, stats, four threshold tensors; then the workspace
    ptrs = [q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), 0, 0, 0, 0, 0, ws.data_ptr()]
    args = [plan._args(r, ptrs, ws.data_ptr()) for r in plan.launches]
    names = [getattr(getattr(r.fn, "fn", None), "__name__", None) or repr(r.fn) for r in plan.launches]

    def subset(idx):
        def run():
            stream = torch.cuda.current_stream().cuda_stream
            for i in idx:
                r = plan.launches[i]
                r.run(r.g[0], r.g[1], r.g[2], stream, r.function, r.packed, None, None, None, *args[i])
        return run

    everything = list(range(len(names)))
    subset(everything)()
    torch.cuda.synchronize()
    if not torch.equal(out, want):
        raise SystemExit("the replayed launches do not reproduce the call's output")
    attn = [i for i, nm in enumerate(names) if "attn" in nm]
    before = [i for i in everything if i < min(attn)]
    print(f"{a.shape} {b}x{h}x{n}x{d}, top-k {a.topk}, {torch.cuda.get_device_name()}, launches: {', '.join(names)}")
    rows = {"whole call": everything, "attention alone": attn, "launches before it, alone": before}
    rows.update({f"whole call without {nm}": [j for j in everything if j != i] for i, nm in enumerate(names)
                 if i not in attn})
    runs = {label: ([], []) for label in rows}
    for _ in range(a.rounds):
        for label, idx in rows.items():
            runs[label][0].append(graphed(subset(idx), a.reps))
            runs[label][1].append(timed(subset(idx), a.reps))

    def fmt(xs):
        return f"{statistics.median(xs):8.1f} [{min(xs):8.1f}, {max(xs):8.1f}]"

    whole = [statistics.median(x) for x in runs["whole call"]]
    print(f"{'':34s} {'graph µs: median [min, max]':>30s} {'eager µs':>30s}   change of the median, graph / eager")
    for label, (g, e) in runs.items():
        extra = ""
        if label.startswith("whole call without"):
            extra = f"   {statistics.median(g) - whole[0]:+7.1f} / {statistics.median(e) - whole[1]:+7.1f}"
        print(f"{label:34s} {fmt(g):>30s} {fmt(e):>30s}{extra}")
    alone = [statistics.median(x) for x in runs["attention alone"]]
    share = [(w - t) / w for w, t in zip(whole, alone)]
    print(f"share of the call before the attention (whole - attention alone, medians): {share[0]:.1%} (graph), "
          f"{share[1]:.1%} (eager)")
    rows_ = b * h * n // 64 * 64
    q8 = torch.empty(rows_, d, dtype=torch.int8, device="cuda")
    k8, v8 = torch.empty_like(q8), torch.empty(rows_, d, dtype=torch.float8_e4m3fn, device="cuda")
    qh, kh, vh = (t.contiguous() for t in (q, k, v))
    kernel = _floor_kernel()
    floor = timed(lambda: kernel[(3 * rows_ // 16,)](qh, kh, vh, q8, k8, v8, rows_, BLK=16, DP=d, num_warps=1),
                  a.reps)
    mb = rows_ * d * 3 * 3 / 1e6
    print(f"bytes floor of the preparation: read Q, K, V, write 1-byte copies ({mb:.0f} MB): {floor:.1f} µs "
          f"({mb / floor:.2f} TB/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
