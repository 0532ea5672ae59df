"""Compile every kernel launch of the public API for a GPU architecture, without a GPU.

    python tests/compile_check.py --arch 90 [--arch 80] [--full] [--dump DIR]

The API is driven on CPU tensors with the launches intercepted: each ``kernel[grid](*args)`` is
turned into a signature (pointer dtypes, scalar types, constexprs, the 16-divisibility hints Triton
would derive) and compiled by Triton's own compiler and the ptxas it bundles, down to a cubin. This
catches what the interpreter lets through (non-constexpr globals, type errors, unsupported dot
shapes) and reports registers, shared memory and spills per variant. ``--dump`` writes PTX/TTGIR.
Must run without ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kernels import api as A  # noqa: E402

_DTYPES = {
    torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int8: "i8",
    torch.int32: "i32", torch.int64: "i64", torch.bool: "i1", torch.float8_e4m3fn: "fp8e4nv",
}
KERNELS = ["_rope_table_kernel", "_colstats_kernel", "_qk_prep_kernel", "_v_prep_kernel", "_v_fix_kernel", "_scores_kernel", "_select_kernel",
           "_attn_kernel", "_attn_kernel_sm90", "_stats_kernel"]
_GL_DTYPES = {torch.int8: "i8", torch.float8_e4m3fn: "fp8e4nv", torch.float16: "fp16"}


class Compiler:
    def __init__(self, arch: int, dump: str | None):
        self.target = GPUTarget("cuda", arch, 128 if arch >= 90 else 32)
        self.dump = dump
        self.seen = {}

    def wrap(self, kernel):
        comp = self

        class Launcher:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: comp.compile(kernel, args, kwargs)

        return Launcher()

    def compile(self, kernel, args, kwargs):
        opts = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "launch_pdl") if k in kwargs}
        names = kernel.arg_names
        values = dict(zip(names, args))
        values.update(kwargs)
        sig, const, attrs = {}, {}, {}
        for i, name in enumerate(names):
            val = values[name] if name in values else kernel.params[i].default  # a constexpr left at its default
            if kernel.params[i].is_constexpr:
                sig[name] = "constexpr"
                const[name] = val
            elif type(val).__name__ == "TensorDescriptor":  # Gluon's host-side TMA descriptor
                block = ", ".join(map(str, val.block_shape))
                sig[name] = f"tensordesc<{_GL_DTYPES[val.base.dtype]}[{block}],{val.layout!r}>"
            elif isinstance(val, torch.Tensor):
                sig[name] = "*" + _DTYPES[val.dtype]
                attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
            elif isinstance(val, bool):
                sig[name] = "i1"
            elif isinstance(val, int):
                sig[name] = "i64" if abs(val) >= 2**31 else "i32"
                if val % 16 == 0 and val != 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
                if val == 1:  # Triton specializes 1 into a constant
                    sig[name] = "constexpr"
                    const[name] = 1
            elif isinstance(val, float):
                sig[name] = "fp32"
            else:
                raise TypeError(f"{kernel.fn.__name__}: argument {name} has unsupported type {type(val)}")
        key = (kernel.fn.__name__, tuple(sorted(const.items())), tuple(sorted(sig.items())), tuple(sorted(opts.items())))
        if key in self.seen:
            return
        if getattr(kernel, "is_gluon", lambda: False)():
            from triton.experimental.gluon._runtime import GluonASTSource

            src = GluonASTSource(kernel, sig, const, attrs)
        else:
            src = ASTSource(kernel, sig, const, attrs)
        k = triton.compile(src, target=self.target, options=opts)
        md = k.metadata
        info = f"{kernel.fn.__name__:18s} {str({c: v for c, v in const.items() if c not in ('INTERPRET',)}):110s} shared={md.shared}"
        info += " pdl" if opts.get("launch_pdl") else ""
        ptx = k.asm["ptx"]
        info += (f" wgmma={ptx.count('wgmma.mma_async')} rowsum_mmas={ptx.count('mma_async.sync.aligned.m64n8k')}"
                 f" mma={ptx.count('mma.sync')} local={'.local' in ptx}")
        self.seen[key] = info
        print(info, flush=True)
        if self.dump:
            os.makedirs(self.dump, exist_ok=True)
            stem = f"{kernel.fn.__name__}_{len(self.seen)}"
            for ext in ("ttgir", "ptx"):
                with open(os.path.join(self.dump, f"{stem}.{ext}"), "w") as f:
                    f.write(k.asm[ext])


def drive(arch: int, full: bool):
    """Call the API on CPU tensors for the variants the launch code can produce (all with ``full``)."""
    fp8 = arch >= 89
    pvs = ["fp8", "fp16"] if fp8 else ["fp16"]
    A.unavailable_reason = lambda device: None
    A.default_pv_dtype = lambda device: "fp8" if fp8 else "fp16"
    if arch == 90 and A._attn_kernel_sm90 is not None:  # the calls an H100 sends to the Gluon kernel
        A._use_sm90 = lambda device, dp, pv, causal, pv_skip: A._sm90_covers(dp, pv, causal, pv_skip)
    if arch >= 90:  # programmatic dependent launch between the kernels of a call
        A._pdl_ok = lambda device: A.PDL
    dims = (64, 72, 128, 256) if full else (64, 128, 256)
    dtypes = (torch.bfloat16, torch.float16, torch.float32) if full else (torch.bfloat16,)
    for d in dims:
        for dtype in dtypes:
            q = torch.randn(1, 2, 300, d).to(dtype)
            for pv in pvs:
                for causal in (False, True):
                    for thr in (None, 8.0):
                        for mode in ("cdf", "topk") if (full or d == 128) else ("topk",):
                            A.sparge_attn(q, q, q, mode=mode, causal=causal, pv_threshold=thr, pv_dtype=pv,
                                          topk=torch.full((2,), 0.5) if causal else 0.5)
                    A.block_sparse_attn(q, q, q, torch.ones(1, 2, 3, 5, dtype=torch.bool), causal=causal, pv_dtype=pv)
                # every block kept: no selection, the kernels walk all blocks without a LUT (DENSE)
                for thr in (None, 8.0):
                    A.sparge_attn(q, q, q, mode="topk", topk=1.0, pv_threshold=thr, pv_dtype=pv, return_stats=True)
                    one = q[:, :, :1]  # one key token: NKB == Nk == 1, which Triton turns into constants
                    A.sparge_attn(q, one, one, mode="topk", topk=1.0, pv_threshold=thr, pv_dtype=pv)
            A.predict_block_mask(q, q, mode="topk")
            if d % 2 == 0:  # RoPE in the preparation (Flux's pe: one rotation per token for every head)
                a = torch.rand(1, 1, 300, d // 2)
                pe = torch.stack([a.cos(), -a.sin(), a.sin(), a.cos()], -1).reshape(1, 1, 300, d // 2, 2, 2)
                A.sparge_attn(q, q, q, mode="topk", topk=0.5, pv_dtype=pvs[0], rope=pe)
    if fp8:  # 128-row programs (the Hopper kernel's choice at Wan / HunyuanVideo grids)
        A.ATTN_CONFIG_OVERRIDE["block_m"] = 128
        try:
            q = torch.randn(1, 2, 300, 128).to(torch.bfloat16)
            A.sparge_attn(q, q, q, mode="topk", topk=0.5, pv_dtype="fp8")
            A.sparge_attn(q, q, q, mode="topk", topk=1.0, pv_dtype="fp8")
        finally:
            A.ATTN_CONFIG_OVERRIDE.clear()
    h = torch.randn(1, 2, 300, 128).half()  # fp16 output: the saturating store
    A.sparge_attn(h, h, h, pv_dtype=pvs[0])
    A.sparge_attn(h, h, h, pv_dtype=pvs[0], pv_threshold=torch.tensor([4.0, float("inf")]))  # per-head lambda


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", type=int, action="append", help="compute capability x10, e.g. 80, 89, 90")
    ap.add_argument("--dump", default=None)
    ap.add_argument("--full", action="store_true", help="every dtype and head-dim variant (slower)")
    args = ap.parse_args()
    for arch in args.arch or [90]:
        print(f"== sm_{arch}")
        comp = Compiler(arch, args.dump)
        saved = {name: getattr(A, name) for name in KERNELS + ["_use_sm90", "_pdl_ok"]}
        for name in KERNELS:
            if saved[name] is not None:
                setattr(A, name, comp.wrap(saved[name]))
        try:
            drive(arch, args.full)
        finally:
            for name, k in saved.items():
                setattr(A, name, k)
        print(f"sm_{arch}: {len(comp.seen)} kernel variants compiled")


if __name__ == "__main__":
    main()
