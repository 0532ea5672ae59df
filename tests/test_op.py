"""``torch.ops.spargeattn.sparge_attn``: the custom op, torch.compile around it, CUDA-graph capture.

On a CPU the op runs the kernels in the Triton interpreter and torch.compile uses the
``aot_eager`` backend (Dynamo and AOTAutograd trace the graph; no C++ compiler needed); on a GPU
the default Inductor backend compiles the code around our op.
"""

import pytest
import torch

from conftest import random_seed
from sparge_pack.kernels import sparge_attn, sparge_attn_op
from sparge_pack.kernels import reference as R

ON_GPU = torch.cuda.is_available()
DEV = "cuda" if ON_GPU else "cpu"
N = 4608 if ON_GPU else 300
H = 4 if ON_GPU else 2
BACKEND = "inductor" if ON_GPU else "aot_eager"


def _gen():
    seed = random_seed()
    return seed, torch.Generator().manual_seed(seed)


def _qkv(gen, n=N, dtype=torch.float16, layout="HND"):
    q, k, v = R.local_qkv(1, H, n, 64, dtype=dtype, device=DEV, generator=gen)
    if layout == "NHD":
        q, k, v = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    return q, k, v


def test_op_is_registered_with_a_fake_kernel():
    seed, gen = _gen()
    q, k, v = _qkv(gen, n=200)
    pv = torch.tensor([3.0, float("inf")][:H] + [3.0] * (H - 2), device=DEV)
    args = (q, k, v, "HND", None, False, "topk", 0.9, None, -0.1, None, True, 3.0, pv, 0.5, None, [0, 64], True,
            "auto")
    # schema, fake (meta) kernel against the real one, and AOT dispatch, as torch.library checks them
    torch.library.opcheck(torch.ops.spargeattn.sparge_attn.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
    out, stats = torch.ops.spargeattn.sparge_attn(*args)
    ref, ref_stats = sparge_attn(q, k, v, mode="topk", topk=0.5, pv_threshold=pv, keep_ranges=[(0, 64)],
                                 return_stats=True)
    assert torch.equal(out, ref), f"seed {seed}"
    assert stats.shape == (4, H)
    for i, key in enumerate(("density", "pv_skipped", "blocks_computed", "blocks_total")):
        assert torch.equal(stats[i], ref_stats[key].float()), f"{key}, seed {seed}"
    assert sparge_attn_op is not None


class _Block(torch.nn.Module):
    """A transformer-style block: projections around SpargeAttn, the way model code calls it."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x, topk: float):
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).unbind(2)
        o, stats = sparge_attn(q, k, v, layout="NHD", mode="topk", topk=topk, return_stats=True)
        return self.proj(o.reshape(b, n, c)), stats["density"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_torch_compile_traces_around_the_op(dtype):
    seed, gen = _gen()
    torch.manual_seed(seed)
    block = _Block(H * 64, H).to(device=DEV, dtype=dtype).eval()
    x = torch.randn(1, N, H * 64, generator=gen).to(device=DEV, dtype=dtype)
    torch._dynamo.reset()
    compiled = torch.compile(block, backend=BACKEND, fullgraph=True)  # fullgraph: a graph break fails
    with torch.no_grad():
        want, want_density = block(x, 0.5)
        got, density = compiled(x, 0.5)
        got2, _ = compiled(x * 0.5, 0.5)
        want2, _ = block(x * 0.5, 0.5)
    assert torch.isfinite(got).all()
    m = R.metrics(got, want)
    assert m["rel_l1"] < 1e-2 and m["cos"] > 0.9999, f"{m}, seed {seed}"
    assert R.metrics(got2, want2)["rel_l1"] < 1e-2, f"seed {seed}"
    assert torch.equal(density, want_density), f"seed {seed}"


def test_op_under_compile_writes_out_and_accepts_per_head_thresholds():
    seed, gen = _gen()
    q, k, v = _qkv(gen, layout="NHD")
    tau = torch.linspace(0.5, 0.99, H, device=DEV)

    def f(q, k, v, out):
        return sparge_attn(q, k, v, layout="NHD", mode="cdf", cdf_threshold=tau, out=out)

    out = torch.full_like(q, float("nan"))
    torch._dynamo.reset()
    res = torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v, out)
    ref = sparge_attn(q, k, v, layout="NHD", mode="cdf", cdf_threshold=tau)
    assert torch.equal(out, ref), f"seed {seed}"
    assert torch.equal(res, ref), f"seed {seed}"


@pytest.mark.skipif(not ON_GPU, reason="CUDA-graph capture needs a CUDA GPU")
def test_cuda_graph_capture_and_replay():
    seed, gen = _gen()
    q, k, v = _qkv(gen, dtype=torch.bfloat16)
    pv = torch.full((H,), 6.0, device=DEV)

    def call():
        return sparge_attn(q, k, v, mode="topk", topk=0.5, pv_threshold=pv, return_stats=True)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (compiles the kernels) outside the capture
        call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_out, g_stats = call()
    for _ in range(2):  # new inputs into the captured buffers, then replay
        _, gen2 = _gen()
        q2, k2, v2 = _qkv(gen2, dtype=torch.bfloat16)
        q.copy_(q2), k.copy_(k2), v.copy_(v2)
        g_out.fill_(float("nan"))
        graph.replay()
        want, want_stats = call()
        torch.cuda.synchronize()
        assert torch.equal(g_out, want), f"seed {seed}"
        assert torch.equal(g_stats["density"], want_stats["density"])
        assert torch.equal(g_stats["pv_skipped"], want_stats["pv_skipped"])
