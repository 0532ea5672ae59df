"""The rotary embedding fused into the preparation (``sparge_attn(..., rope=F)``).

A call with ``rope`` must be the call on q and k rotated beforehand (``reference.apply_rope``, in
fp32): the same block mask and the same output up to the rounding of the output dtype. Both sides
run our kernels, so these tests also compare against dense attention on the rotated inputs, and
check that a rotation which is not the identity changes the result (a kernel that ignored ``rope``
fails). Inputs are fresh random draws (the seed is in each failure message); outputs are poisoned.
"""

import pytest
import torch

from conftest import random_seed as _seed
from sparge_pack.kernels import predict_block_mask, sparge_attn
from sparge_pack.kernels import op as OP
from sparge_pack.kernels import reference as R

ON_GPU = torch.cuda.is_available()
DEV = "cuda" if ON_GPU else "cpu"
N = 4608 if ON_GPU else 200
HEADS = 4 if ON_GPU else 2


def _freqs(b, h, n, d, gen, kind="rotation", layout="HND", dtype=torch.float32):
    """ComfyUI-style rope matrices: ``[[cos, -sin], [sin, cos]]`` per channel pair of random angles
    (``kind="rotation"``, as Flux's ``pe``), the same with a few tokens scaled (``"mixed"``), or arbitrary
    2x2 matrices (``"general"``), in ``layout``."""
    if kind in ("rotation", "mixed"):
        a = torch.rand(b, h, n, d // 2, generator=gen, dtype=torch.float64) * 200.0
        # cos and sin rounded to fp16 first: the kernel's table holds them in fp16 (exact then), so a rotation
        # done first in fp32 gives the same values and the comparison below stays tight
        cos, sin = a.cos().half().double(), a.sin().half().double()
        f = torch.stack([cos, -sin, sin, cos], dim=-1).reshape(b, h, n, d // 2, 2, 2)
        if kind == "mixed":  # every 37th token scaled: read from F itself, its neighbours from the table
            f[:, :, ::37] *= 1.25
    else:
        f = torch.randn(b, h, n, d // 2, 2, 2, generator=gen, dtype=torch.float64)
    f = f.to(device=DEV, dtype=dtype)
    return f.transpose(1, 2) if layout == "NHD" else f


def _qkv(b, h, n, d, gen, layout="HND", dtype=torch.bfloat16):
    shape = (b, h, n, d) if layout == "HND" else (b, n, h, d)
    # a shared offset per channel (as real keys have) so that the K smoothing mean matters
    off = torch.randn(d, generator=gen)
    return [(torch.randn(*shape, generator=gen) + (i == 1) * off).to(DEV, dtype) for i in range(3)]


def _poisoned(q):
    return torch.full_like(q, float("nan"))


def _pair(q, k, f, layout):
    """q and k rotated beforehand, in fp32."""
    return (R.apply_rope(q, f, layout).float(), R.apply_rope(k, f, layout).float())


@pytest.mark.parametrize("layout,d,kind,fb,fh,pv", [
    ("HND", 128, "rotation", 1, 1, "fp8"),      # Flux: pe of shape (1, 1, N, 64, 2, 2)
    ("NHD", 128, "rotation", 2, 1, "fp16"),     # Wan: freqs (B, N, 1, 64, 2, 2)
    ("HND", 64, "general", 2, 2, "fp16"),       # one matrix per head, arbitrary matrices
    ("NHD", 72, "mixed", 1, 2, "fp8"),          # padded head dim; a few tokens' matrices are not rotations
])
def test_rope_is_rotation_first(layout, d, kind, fb, fh, pv):
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    b = 2
    q, k, v = _qkv(b, HEADS, N, d, gen, layout)
    f = _freqs(fb, HEADS if fh > 1 else 1, N + 5, d, gen, kind, layout)  # N' > N: the first N rows count
    qr, kr = _pair(q, k, f, layout)
    opts = dict(layout=layout, mode="topk", topk=0.5, pv_dtype=pv)

    mask = predict_block_mask(q, k, layout=layout, mode="topk", topk=0.5, rope=f)
    mask_r = predict_block_mask(qr, kr, layout=layout, mode="topk", topk=0.5)
    assert torch.equal(mask, mask_r), f"seed {seed}: block masks differ"
    mask_plain = predict_block_mask(q, k, layout=layout, mode="topk", topk=0.5)
    assert not torch.equal(mask, mask_plain), f"seed {seed}: the rotation did not change the selection"

    out = sparge_attn(q, k, v, out=_poisoned(q), **opts)  # without rope (warms nothing up for the next)
    fused = sparge_attn(q, k, v, rope=f, out=_poisoned(q), **opts)
    first = sparge_attn(qr, kr, v.float(), **opts)
    m = R.metrics(fused.float(), first)
    # the two differ by the rounding of the output dtype, int8 rounding flips (from the order of the fp32
    # operations), and the FP8 roundings of P and V that those flips move. FP8 amplifies any change of the
    # inputs: rounding the rotated q, k to bf16 moves the output by ~0.02 at 200 tokens (CPU) and ~0.015 at
    # 4608 (H200), which is also what fp16 cos/sin against exact ones gives; with fp16-exact ones 1.4e-3
    bound = 6e-3 if pv == "fp16" else 0.015
    assert m["rel_l1"] < bound and m["cos"] > 0.9998, f"seed {seed}: fused rope vs rotated first {m}"
    assert R.metrics(out.float(), first)["rel_l1"] > 0.1, f"seed {seed}: rope made no difference"

    if kind == "general":
        return  # arbitrary matrices make the scores peakier than gaussian ones: the error bounds below do not hold
    # against dense attention: test_kernels' full-density bounds (0.042 / 0.015 on gaussian inputs) plus a
    # margin, since the keys' shared offset, rotated differently per token, is no longer removed by K's
    # smoothing mean (measured 0.0159 with fp16 at 4608 tokens on the H200)
    full = sparge_attn(q, k, v, rope=f, layout=layout, mode="topk", topk=1.0, pv_dtype=pv)
    truth = R.dense_attention(qr, kr, v, layout=layout)
    m = R.metrics(R.to_hnd(full, layout), truth)
    assert m["rel_l1"] < {"fp8": 0.05, "fp16": 0.02}[pv], f"seed {seed}: full density vs dense {m}"


def test_rope_with_full_precision_angles_keeps_the_error_bound():
    """Cos and sin that fp16 does not hold exactly (as ComfyUI's ``pe``): the table's rounding stays well inside
    the full-density error bound against dense attention on q, k rotated in float64."""
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    q, k, v = _qkv(1, HEADS, N, 128, gen)
    a = torch.rand(1, 1, N, 64, generator=gen, dtype=torch.float64) * 1000.0
    f = torch.stack([a.cos(), -a.sin(), a.sin(), a.cos()], dim=-1).reshape(1, 1, N, 64, 2, 2).float().to(DEV)
    full = sparge_attn(q, k, v, rope=f, mode="topk", topk=1.0, pv_dtype="fp16")
    qr, kr = R.apply_rope(q, f.double() if DEV == "cpu" else f), R.apply_rope(k, f.double() if DEV == "cpu" else f)
    m = R.metrics(full, R.dense_attention(qr, kr, v))
    assert m["rel_l1"] < 0.02, f"seed {seed}: {m}"


def test_rope_replayed_plan_reads_new_rope():
    """Calls with one plan key replay recorded launches: the rope tensor is an input of the replay,
    not a value of the recording."""
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    q, k, v = _qkv(1, HEADS, N, 128, gen)
    f1, f2 = (_freqs(1, 1, N, 128, gen) for _ in range(2))
    opts = dict(mode="topk", topk=0.5, return_stats=True)
    for _ in range(2):  # record, then replay
        sparge_attn(q, k, v, rope=f1, **opts)
    out, stats = sparge_attn(q, k, v, rope=f2, out=_poisoned(q), **opts)
    qr, kr = _pair(q, k, f2, "HND")
    ref = sparge_attn(qr, kr, v.float(), mode="topk", topk=0.5)
    assert R.metrics(out.float(), ref)["rel_l1"] < 0.015, f"seed {seed}: replay used a stale rope"
    assert float(stats["density"].mean()) == pytest.approx(0.5, abs=0.1)


def test_rope_through_the_custom_op():
    """The op that ``torch.compile`` sees takes rope too and gives the eager call's output."""
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    q, k, v = _qkv(1, HEADS, N, 64, gen)
    f = _freqs(1, 1, N, 64, gen)
    opts = dict(layout="HND", scale=None, causal=False, mode="topk", cdf_threshold=0.98, sim_threshold=None,
                pv_threshold=None, topk=0.5, keep_ranges=None, return_stats=False, pv_dtype="fp16")
    via_op = OP.call(q, k, v, out=None, rope=f, **opts)
    eager = sparge_attn(q, k, v, rope=f, **{k_: v_ for k_, v_ in opts.items()})
    assert torch.equal(via_op, eager), f"seed {seed}"


def test_rope_bad_input_errors():
    gen = torch.Generator().manual_seed(0)
    q, k, v = _qkv(1, 2, 64, 64, gen)
    f = _freqs(1, 1, 64, 64, gen)
    with pytest.raises(ValueError, match=r"\(B or 1, H or 1, N, D/2, 2, 2\)"):
        sparge_attn(q, k, v, rope=f[..., 0])
    with pytest.raises(ValueError, match="N >= 64"):
        sparge_attn(q, k, v, rope=f[:, :, :32])
    with pytest.raises(ValueError, match="expected"):
        sparge_attn(q, k, v, rope=_freqs(1, 1, 64, 32, gen))
    with pytest.raises(TypeError, match="float"):
        sparge_attn(q, k, v, rope=f.to(torch.int32))
    q5, k5, v5 = _qkv(1, 2, 64, 65, gen)
    with pytest.raises(ValueError, match="even head dim"):
        sparge_attn(q5, k5, v5, rope=_freqs(1, 1, 64, 64, gen))
    qg = q
    kg, vg = k[:, :1], v[:, :1]
    with pytest.raises(ValueError, match="one rotation for all heads"):
        sparge_attn(qg, kg, vg, rope=_freqs(1, 2, 64, 64, gen))
