"""A/B of RoPE inside the preparation (``sparge_attn(..., rope=pe)``) on the GPU, at Flux's shape (and Wan
2.1-14B's for one setting), for the pieces of ``api.PREP_ROWS["rope"]`` = 8, 16 and 4 rows:

* ``fused``: our call with ComfyUI's ``pe`` format (random angles, one rotation per token for every head);
* ``plain (no rope)``: our call without it (the floor);
* ``eager rope + call``: ComfyUI's ``_apply_rope1`` formula in torch ops (what ComfyUI runs without
  comfy-kitchen's CUDA backend, e.g. with a CUDA 12 torch) on q and k, then our call.

Prints us per call (median of 3 rounds of 20 calls), the relL1 of ``fused`` against the call on q, k rotated
first in fp32, and the torch profiler's kernel times. Run from the pack root: ``python3 bench/rope_ab.py``.
The output of 2026-12-04 03:53 UTC is ``bench/results/h200_rope_ab.txt``.
"""
import importlib.util
import os
import statistics
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.getcwd())
spec = importlib.util.spec_from_file_location("sparge_pack", "__init__.py", submodule_search_locations=[os.getcwd()])
mod = importlib.util.module_from_spec(spec)
sys.modules["sparge_pack"] = mod
spec.loader.exec_module(mod)
from sparge_pack.kernels import api as A  # noqa: E402
from sparge_pack.kernels import reference as R  # noqa: E402
from sparge_pack.kernels import sparge_attn  # noqa: E402

dev = "cuda"
torch.manual_seed(0)
for rows in (8, 16, 4):
    A.PREP_ROWS["rope"] = rows
    print(f"\n######## PREP_ROWS['rope'] = {rows}")
    for (b, h, n, d) in ([(1, 24, 4608, 128), (1, 40, 32760, 128)] if rows == 16 else [(1, 24, 4608, 128)]):
        q, k, v = (torch.randn(b, h, n, d, device=dev, dtype=torch.bfloat16) for _ in range(3))
        a = torch.rand(1, 1, n, d // 2, device=dev) * 100
        pe = torch.stack([a.cos(), -a.sin(), a.sin(), a.cos()], -1).reshape(1, 1, n, d // 2, 2, 2).contiguous()

        def rope_eager(x):
            x_ = x.float().reshape(*x.shape[:-1], -1, 1, 2)
            o = pe[..., 0] * x_[..., 0]
            o.addcmul_(pe[..., 1], x_[..., 1])
            return o.reshape(*x.shape).type_as(x)

        for topk in (0.5,):
            fns = {
                "fused": lambda: sparge_attn(q, k, v, mode="topk", topk=topk, rope=pe),
                "plain (no rope)": lambda: sparge_attn(q, k, v, mode="topk", topk=topk),
                "eager rope + call": lambda: sparge_attn(rope_eager(q), rope_eager(k), v, mode="topk", topk=topk),
            }
            # accuracy: fused vs rotate first (fp32)
            qr, kr = R.apply_rope(q, pe).float(), R.apply_rope(k, pe).float()
            m = R.metrics(fns["fused"]().float(), sparge_attn(qr, kr, v, mode="topk", topk=topk).float())
            times = {k_: [] for k_ in fns}
            for f in fns.values():
                for _ in range(3): f()
            torch.cuda.synchronize()
            for r in range(3):
                for name, f in fns.items():
                    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    torch.cuda.synchronize(); s.record()
                    for _ in range(20): f()
                    e.record(); torch.cuda.synchronize()
                    times[name].append(s.elapsed_time(e) / 20)
            print(f"\n## {b}x{h}x{n}x{d} top-k {topk}: fused vs rotated-first relL1 {m['rel_l1']:.2e} cos {m['cos']:.6f}")
            for name, t in times.items():
                print(f"  {name:20s} {statistics.median(t)*1e3:8.1f} us/call  (rounds {', '.join(f'{x*1e3:.1f}' for x in t)})")
            for name in ("fused", "plain (no rope)"):
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(10): fns[name]()
                    torch.cuda.synchronize()
                per = {}
                for ev in prof.events():
                    if ev.device_type == torch.autograd.DeviceType.CUDA:
                        c, us = per.get(ev.name, (0, 0.0)); per[ev.name] = (c + 1, us + ev.device_time)
                print(f"  kernels of {name}: " + "; ".join(f"{nm[:24]} {us/c:.1f}us" for nm, (c, us) in sorted(per.items(), key=lambda x: -x[1][1])[:6]))
