"""Public entry points: :func:`sparge_attn`, :func:`predict_block_mask`, :func:`block_sparse_attn`.

Launch sequence of one ``sparge_attn`` call (no host synchronisation anywhere):

0. ``_rope_table_kernel`` with ``rope=``: the rotations as an fp16 cos/sin table (+ a flag per token that is not)
1. ``_colstats_kernel``  K column sums and V column |max| over ~512 sampled tokens, in chunks
2. ``_qk_prep_kernel``   Q blocks: pool, self-similarity, INT8 per token (sm_scale*log2e folded in), and
                         K blocks: centred by the sampled token mean, pool, self-similarity, INT8 per block
                         (no pool or self-similarity when no selection follows: ``_prep_qk(stats=False)``)
                         (and the V blocks of step 3 when there are few: ``FUSE_V_MAX``)
3. ``_v_prep_kernel``    V / per-channel scale -> FP8 e4m3 (transposed) or fp16; records overflows
4. ``_v_fix_kernel``     requantizes the heads whose V overflowed its sampled scale (others exit at once)
5. ``_scores_kernel``    pooled map pool_q @ pool_k^T * scale in fp32
6. ``_select_kernel``    TopCdf / TopK per row -> sorted LUT of kept K blocks + counts
                         (5-6 are skipped when top-k 1 keeps every block: ``_keeps_all``)
7. ``_attn_kernel``      the attention over the LUT (or over every K block in order) (``_attn_kernel_sm90``, the Gluon kernel of
                         ``attention_sm90.py``, on sm_90 GPUs without causal mask or P.V skip)
8. ``_stats_kernel``     with ``return_stats=True``: per-head density and P.V skip fraction

``sparge_attn`` records the launches of the first call with a given plan key and replays them on
later calls with one workspace allocation and raw pointers (``launch.py``): ~120 us of host time per
Flux-size call instead of ~480 on the H100 machine, so such calls are GPU-bound.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch

from .launch import Recorder, _Fast, interpreting as _interpreting, new_buffer, replay_allowed
from .config import BLOCK_K, BLOCK_Q, MAX_HEAD_DIM, P_SCALE_LOG2, V_FP8_MAX, V_SAMPLE_TARGET, stats_stride

try:
    import triton

    from .attention import _attn_kernel
    from .gdc import AVAILABLE as _GDC
    from .predict import _scores_kernel, _select_kernel, _stats_kernel
    from .quant import _colstats_kernel, _qk_prep_kernel, _rope_table_kernel, _v_fix_kernel, _v_prep_kernel

    try:  # the Hopper kernel is written in Triton's Gluon language, experimental and changing between
        # releases: it is used with the Triton it was written and tested for, others get the portable kernel
        if tuple(int(x) for x in triton.__version__.split(".")[:2]) != (3, 6):
            raise ImportError(f"the Gluon kernel is tested with Triton 3.6, this is {triton.__version__}")
        from triton.experimental.gluon import language as _gl
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as _TensorDescriptor

        from .attention_sm90 import _attn_kernel_sm90

        _SM90_ERROR = None
    except Exception as exc:  # noqa: BLE001 (any failure here only means: use the portable kernel)
        _attn_kernel_sm90 = None
        _SM90_ERROR = exc
    _TRITON_ERROR = None
except ImportError as exc:  # the pack still loads; calls explain what is missing
    triton = None
    _TRITON_ERROR = exc

LOG2E = 1.4426950408889634
Threshold = Union[float, torch.Tensor]

__all__ = [
    "sparge_attn", "predict_block_mask", "block_sparse_attn", "unavailable_reason", "default_pv_dtype", "walk_options",
]


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> Tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def unavailable_reason(device: Union[torch.device, str]) -> Optional[str]:
    """Why the sparse kernel cannot run on ``device``, or None when it can.

    On a CPU it runs only under the Triton interpreter (``TRITON_INTERPRET=1``, for tests).
    """
    device = torch.device(device)
    if triton is None:
        return f"Triton is not installed ({_TRITON_ERROR}); install it with 'pip install triton' (Windows: triton-windows)"
    if device.type == "cpu" and _interpreting():
        return None
    if device.type != "cuda":
        return f"not CUDA (tensors are on {device.type})"
    major, minor = _capability(device.index if device.index is not None else torch.cuda.current_device())
    if major < 8:
        return f"GPU sm_{major}{minor} is older than sm_80 (Ampere); the INT8 tensor-core kernel needs sm_80 or newer"
    return None


def default_pv_dtype(device: Union[torch.device, str]) -> str:
    """"fp8" on GPUs with FP8 tensor cores (sm_89 and newer), "fp16" on sm_80/86/87; "fp8" in the interpreter."""
    device = torch.device(device)
    if device.type != "cuda":
        return "fp8"
    major, minor = _capability(device.index if device.index is not None else torch.cuda.current_device())
    return "fp8" if (major, minor) >= (8, 9) else "fp16"


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _p2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


@dataclass
class _Geom:
    b: int
    h: int
    hk: int
    nq: int
    nk: int
    d: int
    dp: int
    nqb: int
    nkb: int
    layout: str
    pdl: bool = False  # launch with programmatic dependent launch (see gdc.py)

    def chained(self) -> dict:
        """Launch keywords of a kernel that follows another of the call (PDL when enabled)."""
        return {"PDL": True, "launch_pdl": True} if self.pdl else {"PDL": False}

    @property
    def nq_pad(self) -> int:
        return self.nqb * BLOCK_Q

    @property
    def nk_pad(self) -> int:
        return self.nkb * BLOCK_K

    def visible_blocks(self, causal: bool) -> int:
        """Blocks of one (batch, head) map that hold at least one visible (query, key) pair."""
        if not causal:
            return self.nqb * self.nkb
        total = 0
        for i in range(self.nqb):
            last_q = min((i + 1) * BLOCK_Q, self.nq) - 1
            total += min(self.nkb, last_q // BLOCK_K + 1)
        return total


def _hnd(x: torch.Tensor, layout: str) -> torch.Tensor:
    return x.transpose(1, 2) if layout == "NHD" else x


def _check(q: torch.Tensor, k: torch.Tensor, v: Optional[torch.Tensor], layout: str) -> _Geom:
    if layout not in ("HND", "NHD"):
        raise ValueError(f"layout must be 'HND' (B, H, N, D) or 'NHD' (B, N, H, D), got {layout!r}")
    tensors = (q, k) if v is None else (q, k, v)
    for name, t in zip("qkv", tensors):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor in layout {layout}, got {getattr(t, 'shape', type(t))}")
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise TypeError(f"{name} has dtype {t.dtype}; use float16, bfloat16 or float32")
        if t.device != q.device:
            raise ValueError(f"q, k, v must be on one device; {name} is on {t.device}, q on {q.device}")
    reason = unavailable_reason(q.device)
    if reason is not None:
        raise RuntimeError(f"SpargeAttn kernel unavailable: {reason}. Use torch SDPA on this device.")
    qh, kh = _hnd(q, layout), _hnd(k, layout)
    b, h, nq, d = qh.shape
    _, hk, nk, dk = kh.shape
    if kh.shape[0] != b or dk != d:
        raise ValueError(f"k {tuple(k.shape)} does not match q {tuple(q.shape)} (batch and head dim must agree)")
    if v is not None:
        vh = _hnd(v, layout)
        if tuple(vh.shape) != tuple(kh.shape):
            raise ValueError(f"v {tuple(v.shape)} must have the shape of k {tuple(k.shape)}")
    if hk == 0 or h % hk:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({hk}) for GQA")
    if d > MAX_HEAD_DIM:
        raise ValueError(f"head dim {d} > {MAX_HEAD_DIM} is not supported; use torch SDPA for it")
    if nq < 1 or nk < 1 or b < 1:
        raise ValueError(f"empty input: q {tuple(q.shape)}, k {tuple(k.shape)}")
    dp = _padded_dim(d)
    return _Geom(b, h, hk, nq, nk, d, dp, _cdiv(nq, BLOCK_Q), _cdiv(nk, BLOCK_K), layout, _pdl_ok(q.device))


def _rope_arg(rope: Optional[torch.Tensor], g: _Geom, device) -> Optional[tuple]:
    """(F, batch stride, head stride, token stride) of a ``rope`` argument in the kernel's (B, H, N, ...) order,
    or None without one. See :func:`sparge_attn` for the format."""
    if rope is None:
        return None
    want = f"(B or 1, H or 1, N, D/2, 2, 2) for layout 'HND', (B or 1, N, H or 1, D/2, 2, 2) for 'NHD' (D = {g.d})"
    if not isinstance(rope, torch.Tensor) or rope.dim() != 6:
        raise ValueError(f"rope must be a 6-D tensor {want}, got {getattr(rope, 'shape', type(rope))}")
    if not rope.is_floating_point():
        raise TypeError(f"rope has dtype {rope.dtype}; give the rotation matrices as float tensors")
    if rope.device != device:
        raise ValueError(f"rope is on {rope.device}, q on {device}; move it to q's device")
    if g.d % 2:
        raise ValueError(f"rope needs an even head dim, q has {g.d}")
    f = _hnd(rope, g.layout)
    fb, fh, fn = f.shape[:3]
    if tuple(f.shape[3:]) != (g.d // 2, 2, 2) or fb not in (1, g.b) or fh not in (1, g.h) or fn < max(g.nq, g.nk):
        raise ValueError(f"rope has shape {tuple(rope.shape)}; expected {want} with N >= {max(g.nq, g.nk)} tokens")
    if fh > 1 and g.hk != g.h:
        raise ValueError("rope with one rotation per head needs as many K/V heads as query heads; "
                         "give one rotation for all heads (size 1 in the head dim)")
    if f.stride()[3:] != (4, 2, 1):
        f = f.contiguous()
    return f, (f.stride(0) if fb > 1 else 0), (f.stride(1) if fh > 1 else 0), f.stride(2)


#: Programmatic dependent launch between the kernels of a call (``gdc.py``) on sm_90+ GPUs; the
#: environment variable ``SPARGEATTN_PDL=0`` (read at import) or setting this to False turns it off.
PDL = os.environ.get("SPARGEATTN_PDL", "1") != "0"


def _pdl_ok(device: torch.device) -> bool:
    if not PDL or device.type != "cuda" or _interpreting() or not _GDC:
        return False
    return _capability(device.index if device.index is not None else torch.cuda.current_device()) >= (9, 0)


def _threshold(value: Threshold, name: str, g: _Geom, device, lo: float, hi: float):
    """(scalar, tensor-or-None) for a float or per-head threshold, validated to lie in [lo, hi]."""
    if isinstance(value, torch.Tensor):
        if value.numel() == 1:
            value = float(value.reshape(()).item()) if value.device.type == "cpu" else value.reshape(1).expand(g.h)
        else:
            if value.numel() != g.h:
                raise ValueError(f"{name} has {value.numel()} values; give a float or one value per query head ({g.h})")
    if isinstance(value, torch.Tensor):
        t = value.reshape(g.h).to(device=device, dtype=torch.float32).contiguous()
        if t.device.type == "cpu" or _interpreting():
            if bool(((t < lo) | (t > hi) | torch.isnan(t)).any()):
                raise ValueError(f"{name} values must lie in [{lo}, {hi}], got {t.tolist()}")
        return 0.0, t
    value = float(value)
    if not (lo <= value <= hi):
        raise ValueError(f"{name} must lie in [{lo}, {hi}], got {value}")
    return value, None


def _ranges(keep_ranges: Optional[Sequence[Tuple[int, int]]]):
    rs = [] if keep_ranges is None else [(int(a), int(b)) for a, b in keep_ranges]
    rs = [(a, b) for a, b in rs if b > a]
    if len(rs) > 4:
        raise ValueError(f"at most 4 keep_ranges are supported, got {len(rs)}; merge adjacent ranges")
    for a, b in rs:
        if a < 0:
            raise ValueError(f"keep_ranges must be non-negative token ranges (start, end), got {(a, b)}")
    rs += [(0, 0)] * (4 - len(rs))
    return [x for r in rs for x in r]


def _launch_guard(device: torch.device):
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return _Null()


class _Null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


#: Warps per program of the preparation kernels and rows per piece of the Q/K blocks (which are
#: streamed in pieces of that many rows), measured on an H100 (bench/NOTES.md #12, #18): small
#: programs are faster here (more programs resident per SM overlap their loads with the reductions).
#: "qk": the Q and K blocks (one launch); "k64": K blocks at padded head dim 64; "rope": Q and K pieces (at most)
#: and the column statistics' pieces of K when RoPE is applied on the way (its loads need ~4 live values per
#: element). Benchmarks may change them.
PREP_WARPS = {"colstats": 2, "qk": 1, "v": 2}
PREP_ROWS = {"q": 16, "k": 16, "k64": 64, "v": 32, "rope": 8}
#: V blocks go into the Q/K preparation launch (one-warp programs, ``PREP_ROWS["v"]`` rows per piece)
#: instead of a launch of their own (``PREP_WARPS["v"]`` warps, whole blocks) when there are at most this
#: many. H100 (bench/NOTES.md #26): Flux (1728 V blocks) -2% per call; Wan and CogVideoX preparation +4-7%.
FUSE_V_MAX = 4096
#: Compute the pooled blocks and self-similarities in calls that do not select (every block kept, or
#: ``block_sparse_attn``'s mask), which never read them. False (the default) saves their arithmetic in the
#: preparation launch (bench/NOTES.md #50); True only for A/B measurements.
DENSE_STATS = False
#: Programs per (batch, KV head) of ``_v_fix_kernel``: they only read the head's overflow record unless
#: V overflowed its sampled scale there; then each requantizes every V_FIX_PROGRAMS-th block.
V_FIX_PROGRAMS = 16


def _prep_qk(q, k, v, g: _Geom, scale: float, pv_dtype: Optional[str], sm90: Optional[bool] = None, rope=None,
             stats: bool = True):
    """Launches 1-4. Returns a dict of the prepared buffers (V parts only when ``v`` is given).
    ``sm90``: V is stored in the token order of the Hopper kernel (``buf["v_order"]`` says which);
    None: as ``_use_sm90`` decides for a call without causal mask and without P.V skip.
    ``rope``: ``_rope_arg``'s tuple, or None: Q and K are rotated as they are read.
    ``stats=False`` (no selection follows: every block kept, or a caller's block mask): the pooled blocks and
    self-similarities are not computed and the dict has no ``pool_*`` / ``sim_*`` entries."""
    if sm90 is None:
        sm90 = v is not None and _use_sm90(q.device, g.dp, pv_dtype, False, False)
    dev = q.device
    qh, kh = _hnd(q, g.layout), _hnd(k, g.layout)
    vh = _hnd(v, g.layout) if v is not None else kh
    r = 64
    stride = stats_stride(g.nk)
    ns = _cdiv(g.nk, stride)
    nchunk = _cdiv(ns, r)
    f32 = torch.float32
    # without rope the kernels never read F, T or BAD: any tensor stands in
    if rope is not None:
        f, fsb, fsh, fsn = rope
        fb, fh, nf = (f.shape[0] if fsb else 1), (f.shape[1] if fsh else 1), max(g.nq, g.nk)
        table = new_buffer((fb * fh, nf, g.dp), torch.float16, dev)
        bad = new_buffer((fb * fh, nf), torch.int8, dev)
        # strides of T and BAD (per batch, per head; 0 where F broadcasts)
        tst = (fh * nf * g.dp if fsb else 0, nf * g.dp if fh > 1 else 0, fh * nf if fsb else 0, nf if fh > 1 else 0)
        ft = (f, fsb, fsh, fsn, table, bad, *tst, True)
        rt = 32
        _Fast.get(_rope_table_kernel)[(_cdiv(nf, rt), fb * fh)](
            f, fsb, fsh, fsn, table, bad, *tst, fh, nf, g.d, DP=g.dp, RT=rt, PDL=g.pdl, num_warps=4)
        pdl_first = g.chained()
    else:
        ft = (kh, 0, 0, 0, kh, kh, 0, 0, 0, 0, False)
        pdl_first = {"PDL": g.pdl}
    rows_rope = (PREP_ROWS["rope"],) if rope is not None else ()
    ksum = new_buffer((g.b * g.hk, nchunk, g.dp), f32, dev)
    vmax = new_buffer(ksum.shape, f32, dev)
    vfix = new_buffer((g.b * g.hk, g.dp), f32, dev)
    _Fast.get(_colstats_kernel)[(g.b * g.hk, nchunk)](
        kh, *kh.stride(), vh, *vh.stride(), ksum, vmax, vfix,
        g.hk, g.nk, g.d, stride, ns, nchunk, *ft[:10],
        DP=g.dp, R=r, EVEN_D=g.d == g.dp, ROPE=ft[10], RS=min(r, PREP_ROWS["rope"]), INTERPRET=_interpreting(),
        num_warps=PREP_WARPS["colstats"], **pdl_first,
    )
    buf = {}
    buf["q8"] = new_buffer((g.b * g.h, g.nq_pad, g.dp), torch.int8, dev)
    buf["qs"] = new_buffer((g.b * g.h, g.nq_pad), f32, dev)
    buf["k8"] = new_buffer((g.b * g.hk, g.nk_pad, g.dp), torch.int8, dev)
    buf["ks"] = new_buffer((g.b * g.hk, g.nkb), f32, dev)
    if stats:
        buf["pool_q"] = new_buffer((g.b * g.h, g.nqb, g.dp), f32, dev)
        buf["sim_q"] = new_buffer((g.b * g.h, g.nqb), f32, dev)
        buf["pool_k"] = new_buffer((g.b * g.hk, g.nkb, g.dp), f32, dev)
        buf["sim_k"] = new_buffer((g.b * g.hk, g.nkb), f32, dev)
        st_q, st_k = (buf["pool_q"], buf["sim_q"]), (buf["pool_k"], buf["sim_k"])
    else:  # without STATS the kernel never writes them: any float tensor stands in
        st_q = st_k = (ksum, ksum)
    fp8 = pv_dtype == "fp8"
    # not with a single key token: on the H100 (Triton 3.6), 16-bit V with an odd head dim (masked columns)
    # and Nk == 1 (an argument Triton specializes) came out of the 32-row pieces with some padded token
    # positions unwritten (bench/NOTES.md #30); the V kernel of its own writes them
    fuse_v = v is not None and g.nkb * g.b * g.hk <= FUSE_V_MAX and g.nk > 1
    if v is not None:
        if fp8:
            buf["v8"] = new_buffer((g.b * g.hk, g.dp, g.nk_pad), torch.float8_e4m3fn, dev)
        else:
            buf["v8"] = new_buffer((g.b * g.hk, g.nk_pad, g.dp), torch.float16, dev)
        buf["vs"] = new_buffer((g.b * g.hk, g.dp), f32, dev)
    q_programs, k_programs = g.nqb * g.b * g.h, g.nkb * g.b * g.hk
    # the V arguments; without HAS_V the kernel never reads them, so any tensors stand in
    vt = (vh, *vh.stride(), vmax, vfix, buf["v8"], buf["vs"]) if fuse_v else (kh, *kh.stride(), vmax, vfix, ksum, ksum)
    _Fast.get(_qk_prep_kernel)[(q_programs + k_programs * (2 if fuse_v else 1),)](
        qh, *qh.stride(), buf["q8"], buf["qs"], *st_q, g.h, g.nq, g.nq_pad, g.nqb,
        scale * LOG2E,
        kh, *kh.stride(), buf["k8"], buf["ks"], *st_k, g.hk, g.nk, g.nk_pad, g.nkb,
        ksum, g.d, nchunk, ns, q_programs, k_programs, *vt, V_SAMPLE_TARGET, V_FP8_MAX, *ft[:10],
        BQ=BLOCK_Q, BK=BLOCK_K, DP=g.dp, NCHUNK_P2=_p2(nchunk), EVEN_D=g.d == g.dp,
        SUB_Q=min(PREP_ROWS["q"], BLOCK_Q, *rows_rope),
        SUB_K=min(PREP_ROWS["k64" if g.dp <= 64 else "k"], BLOCK_K, *rows_rope),
        HAS_V=fuse_v, SUB_V=PREP_ROWS["v"], FP8=fp8, INTERPRET=_interpreting(), SM90_ORDER=bool(sm90 and fp8),
        ROPE=ft[10], STATS=stats, num_warps=PREP_WARPS["qk"], **g.chained(),
    )
    if v is not None:
        vargs = (vh, *vh.stride(), vmax, vfix, buf["v8"], buf["vs"], g.hk, g.nk, g.d, g.nk_pad)
        vmeta = dict(BLK=BLOCK_K, DP=g.dp, NCHUNK_P2=_p2(nchunk), FP8=fp8, INTERPRET=_interpreting(),
                     EVEN_D=g.d == g.dp, SM90_ORDER=sm90 and fp8, num_warps=PREP_WARPS["v"], **g.chained())
        if not fuse_v:
            _Fast.get(_v_prep_kernel)[(g.nkb, g.b * g.hk)](*vargs, V_SAMPLE_TARGET, V_FP8_MAX, nchunk, **vmeta)
        _Fast.get(_v_fix_kernel)[(g.b * g.hk, min(g.nkb, V_FIX_PROGRAMS))](
            *vargs, g.nkb, V_SAMPLE_TARGET, V_FP8_MAX, nchunk, **vmeta)
        buf["v_order"] = "sm90" if sm90 and fp8 else "tokens"
    return buf


def _select(buf, g: _Geom, scale: float, causal: bool, mode: str, cdf_threshold, sim_threshold, topk,
            keep_ranges, block_mask: Optional[torch.Tensor] = None, write_mask: bool = False):
    """Launches 5-6. Returns (lut, cnt, cnt_full, mask-or-None)."""
    dev = buf["q8"].device
    rows = g.b * g.h
    lut = new_buffer((rows, g.nqb, g.nkb), torch.int32, dev)
    cnt = new_buffer((rows, g.nqb), torch.int32, dev)
    cnt_full = new_buffer(cnt.shape, torch.int32, dev)
    mask_out = new_buffer((g.b, g.h, g.nqb, g.nkb), torch.bool, dev) if write_mask else cnt
    nkb_p2 = max(16, _p2(g.nkb))
    # the bisection is 32 dependent row reductions: one warp per row keeps them in shuffles
    warps = 1 if nkb_p2 <= 1024 else (2 if nkb_p2 <= 4096 else 4)
    if block_mask is not None:
        mode_id, scores = 0, cnt
        sims = (cnt, cnt)  # not read from a caller's mask (and not computed: ``_prep_qk(stats=False)``)
        tau, theta, frac = (0.0, None), (0.0, None), (0.0, None)
        mask_in, mstr = block_mask, block_mask.stride()
    else:
        if mode not in ("cdf", "topk"):
            raise ValueError(f"mode must be 'cdf' or 'topk', got {mode!r}")
        mode_id = 1 if mode == "cdf" else 2
        tau = _threshold(cdf_threshold, "cdf_threshold", g, dev, 0.0, 1.0)
        theta = _threshold(sim_threshold, "sim_threshold", g, dev, -math.inf, math.inf)
        frac = _threshold(topk, "topk", g, dev, 0.0, 1.0)
        scores = new_buffer((rows, g.nqb, g.nkb), torch.float32, dev)
        sims = (buf["sim_q"], buf["sim_k"])
        tm = 64 if g.dp <= 128 else 32
        _Fast.get(_scores_kernel)[(_cdiv(g.nqb, tm), _cdiv(g.nkb, tm), rows)](
            buf["pool_q"], buf["pool_k"], scores, g.h, g.h // g.hk, g.nqb, g.nkb, scale,
            DP=g.dp, TM=tm, TN=tm, PRECISION="ieee" if _interpreting() else "tf32x3", num_warps=4, **g.chained(),
        )
        mask_in, mstr = cnt, (0, 0, 0, 0)
    _Fast.get(_select_kernel)[(g.nqb, rows)](
        scores, *sims, mask_in, *mstr,
        lut, cnt, cnt_full, mask_out,
        g.h, g.h // g.hk, g.nqb, g.nkb, g.nq, g.nk,
        tau[1] if tau[1] is not None else cnt, tau[0],
        theta[1] if theta[1] is not None else cnt, theta[0],
        frac[1] if frac[1] is not None else cnt, frac[0],
        *_ranges(keep_ranges),
        NKB_P2=nkb_p2, BQ=BLOCK_Q, BK=BLOCK_K, MODE=mode_id, CAUSAL=causal, WRITE_MASK=write_mask,
        TAU_PER_HEAD=tau[1] is not None, THETA_PER_HEAD=theta[1] is not None, TOPK_PER_HEAD=frac[1] is not None,
        num_warps=warps, **g.chained(),
    )
    return lut, cnt, cnt_full, (mask_out if write_mask else None)


def _keeps_all(mode: str, topk, causal: bool) -> bool:
    """Whether the selection would keep every K block of every Q block: top-k mode with a plain number 1
    and no causal mask. Such calls skip launches 5-6 (the pooled scores and the selection), and the
    attention kernels walk blocks 0..NKB-1 in order, which is the LUT the selection would have written
    (sorted; the key tail block last), so the output is the same to the bit."""
    return mode == "topk" and not causal and type(topk) in (float, int) and topk == 1


def _blocks(buf, g: _Geom, scale: float, causal: bool, mode: str, cdf_threshold, sim_threshold, topk, keep_ranges):
    """The K blocks a ``sparge_attn`` call computes, as ``_attend`` takes them: (lut, cnt, cnt_full) from
    launches 5-6, or (None, None, None) without a launch when top-k 1 keeps every block (``_keeps_all``;
    the thresholds and keep_ranges are still checked, as ``_select`` checks them)."""
    if _keeps_all(mode, topk, causal):
        _threshold(cdf_threshold, "cdf_threshold", g, buf["q8"].device, 0.0, 1.0)
        _threshold(sim_threshold, "sim_threshold", g, buf["q8"].device, -math.inf, math.inf)
        _ranges(keep_ranges)
        return None, None, None
    return _select(buf, g, scale, causal, mode, cdf_threshold, sim_threshold, topk, keep_ranges)[:3]


def _padded_dim(d: int) -> int:
    return max(64, _p2(d))


#: Benchmarks may set keys of this dict (block_m, num_warps, num_stages, pair) to try other configs.
ATTN_CONFIG_OVERRIDE: dict = {}


def _attention_config(dp: int, q_blocks: int) -> dict:
    """Launch parameters of the attention kernel for a padded head dim and a number of Q blocks
    (batch x heads x ceil(Nq/128)). Measured on an H100 (bench/NOTES.md #4, #5, #15): 64-row programs
    with paired K blocks at head dim 64; at 128, 64-row programs with paired K blocks when there are
    few Q blocks (Flux), else 128-row programs with single K blocks (pairs would spill there)."""
    if dp >= 256:
        cfg = {"block_m": 64, "num_warps": 4, "num_stages": 2, "pair": False}
    elif dp <= 64 or q_blocks < 2048:
        cfg = {"block_m": 64, "num_warps": 4, "num_stages": 3, "pair": True}
    else:
        cfg = {"block_m": 128, "num_warps": 4, "num_stages": 3, "pair": False}
    cfg.update(ATTN_CONFIG_OVERRIDE)
    return cfg


def _sm90_config(dp: int, q_blocks: int, pv16: bool = False, dense: bool = False) -> dict:
    """Launch parameters of the Hopper kernel (kernels/attention_sm90.py), measured on an H100
    (bench/NOTES.md #19, #27): one warpgroup per program, 3 K/V stages; at head dim 128, 128-row
    programs when there are many Q blocks (Wan, HunyuanVideo) or P.V is fp16, else 64 (Flux FP8,
    CogVideoX). ``sum_mma``: the row sums of P from the tensor cores, for FP8 P.V in 64-row programs
    (NOTES #48: 1-5% faster there, slower with 128 rows or fp16 P.V). ``dense`` (every block kept, no LUT):
    4 stages in 64-row FP8 programs, which still fit 3 per SM (H200, NOTES #39, #50: attention -1% at Flux,
    -2.5% at CogVideoX; with a LUT no faster at top-k 0.5 and 1% slower at 0.15, so sparse calls keep 3)."""
    big = dp == 128 and (q_blocks >= 2048 or pv16)
    stages = 4 if dense and not big and not pv16 else 3
    cfg = {"block_m": 128 if big else 64, "num_warps": 4, "num_stages": stages}
    cfg.update({k: v for k, v in ATTN_CONFIG_OVERRIDE.items() if k in cfg or k == "sum_mma"})
    cfg.setdefault("sum_mma", cfg["block_m"] == 64 and not pv16)
    return cfg


def _sm90_covers(dp: int, pv_dtype: str, causal: bool, pv_skip: bool) -> bool:
    """The calls the Hopper kernel implements: FP8 or fp16 P.V, padded head dim 64 or 128, no causal mask,
    no P.V skip."""
    return pv_dtype in ("fp8", "fp16") and dp in (64, 128) and not causal and not pv_skip


def _use_sm90(device: torch.device, dp: int, pv_dtype: str, causal: bool, pv_skip: bool) -> bool:
    """Whether the call's attention runs in the Hopper kernel: an sm_90 GPU, Gluon available,
    head dim 64 or 128 (padded), no causal mask and no stage-2 skip. ``ATTN_CONFIG_OVERRIDE["kernel"]``
    or the environment variable ``SPARGEATTN_KERNEL`` ("auto", "tl" or "sm90") can force a choice."""
    want = ATTN_CONFIG_OVERRIDE.get("kernel") or os.environ.get("SPARGEATTN_KERNEL") or "auto"
    if want not in ("auto", "tl", "sm90"):
        raise ValueError(f"SPARGEATTN_KERNEL must be 'auto', 'tl' or 'sm90', got {want!r}")
    if want == "tl":
        return False
    reason = None
    if _attn_kernel_sm90 is None:
        reason = f"this Triton has no usable Gluon ({_SM90_ERROR})"
    elif _interpreting() or device.type != "cuda":
        reason = "not a CUDA device"
    elif _capability(device.index if device.index is not None else torch.cuda.current_device()) != (9, 0):
        reason = "not an sm_90 GPU"
    elif not _sm90_covers(dp, pv_dtype, causal, pv_skip):
        reason = "it covers head dims <= 128 without causal mask or P.V skip"
    if reason is not None and want == "sm90":
        raise ValueError(f"the sm90 attention kernel cannot run this call: {reason}; set SPARGEATTN_KERNEL=auto")
    return reason is None


def walk_options(head_dim: int, n_q: int, batch_heads: int, *, device=None, pv_dtype: str = "fp8",
                 causal: bool = False, pv_threshold=None) -> dict:
    """How the attention kernel walks the LUT for such a call, in the keywords of
    ``reference.block_sparse_attention``: ``rows_per_decision`` (query rows of one program, which
    share each stage-2 decision), ``pair`` (mask-free blocks taken two at a time) and ``sum_rounded_p``
    (the row sums add the FP8-rounded P: the Hopper kernel's ``sum_mma``). ``device`` (default: the
    current CUDA device when there is one) decides whether the Hopper kernel runs."""
    dp = _padded_dim(head_dim)
    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() and not _interpreting() else torch.device("cpu")
    if _use_sm90(torch.device(device), dp, pv_dtype, causal, pv_threshold is not None):
        cfg = _sm90_config(dp, batch_heads * _cdiv(n_q, BLOCK_Q), pv_dtype == "fp16")
        return {"rows_per_decision": cfg["block_m"], "pair": False, "sum_rounded_p": bool(cfg["sum_mma"])}
    cfg = _attention_config(dp, batch_heads * _cdiv(n_q, BLOCK_Q))
    return {"rows_per_decision": cfg["block_m"], "pair": cfg["pair"], "sum_rounded_p": False}


@functools.lru_cache(maxsize=None)
def _nvmma_layouts(bm: int, dp: int, pv16: bool):
    """Shared-memory layouts of the Q, K and V tiles that the TMA descriptors describe: V^T (DP, BLOCK_K)
    in FP8, V (BLOCK_K, DP) in fp16."""
    get = _gl.NVMMASharedLayout.get_default_for
    lv = get([BLOCK_K, dp], _gl.float16) if pv16 else get([dp, BLOCK_K], _gl.float8e4nv)
    return get([bm, dp], _gl.int8), get([BLOCK_K, dp], _gl.int8), lv


def _attend_sm90(buf, lut, cnt, cnt_full, out, oh, g: _Geom, dense: bool = False):
    pv16 = buf["v8"].dtype == torch.float16
    cfg = _sm90_config(g.dp, g.b * g.h * g.nqb, pv16, dense)
    bm = cfg["block_m"]
    lq, lk, lv = _nvmma_layouts(bm, g.dp, pv16)
    q2, k2 = buf["q8"].view(-1, g.dp), buf["k8"].view(-1, g.dp)
    v2 = buf["v8"].view(-1, g.dp) if pv16 else buf["v8"].view(-1, g.nk_pad)
    dq = _TensorDescriptor(q2, list(q2.shape), list(q2.stride()), [bm, g.dp], lq)
    dk = _TensorDescriptor(k2, list(k2.shape), list(k2.stride()), [BLOCK_K, g.dp], lk)
    dv = _TensorDescriptor(v2, list(v2.shape), list(v2.stride()), [BLOCK_K, g.dp] if pv16 else [g.dp, BLOCK_K], lv)
    _Fast.get(_attn_kernel_sm90)[(g.nqb * (BLOCK_Q // bm), g.b * g.h)](
        dq, dk, dv, buf["qs"], buf["ks"], buf["vs"], lut, cnt, cnt_full,
        oh, *oh.stride(),
        g.h, g.h // g.hk, g.nqb, g.nkb, g.nq, g.nk, g.d, g.nq_pad, g.nk_pad, P_SCALE_LOG2,
        BQ=BLOCK_Q, BM=bm, BN=BLOCK_K, DP=g.dp, CLAMP=out.dtype == torch.float16, STAGES=cfg["num_stages"],
        NW=cfg["num_warps"], num_warps=cfg["num_warps"], PV16=pv16, DENSE=dense, SUM_MMA=cfg["sum_mma"],
        **g.chained(),
    )
    return out, None, BLOCK_Q // bm


def _attend(buf, lut, cnt, cnt_full, q, g: _Geom, causal: bool, pv_threshold: Optional[Threshold], pv_dtype: str,
            out: Optional[torch.Tensor] = None):
    """Launch 7. Returns (out in q's layout and dtype, per-program skip counts or None, rows groups)."""
    if out is None:
        out = torch.empty_like(q)  # keeps q's memory order (dense inputs), so NHD views stay NHD
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(
            f"out must match q: got {tuple(out.shape)} {out.dtype} on {out.device}, "
            f"q is {tuple(q.shape)} {q.dtype} on {q.device}"
        )
    oh = _hnd(out, g.layout)
    sm90 = _use_sm90(q.device, g.dp, pv_dtype, causal, pv_threshold is not None)
    if pv_dtype == "fp8" and sm90 != (buf.get("v_order") == "sm90"):  # fp16 V is the same for both kernels
        raise RuntimeError("internal: V was prepared for the other attention kernel (pass sm90= to _prep_qk)")
    dense = lut is None  # every K block kept (``_keeps_all``): no LUT, the kernels walk 0..NKB-1
    if dense:
        lut = cnt = cnt_full = buf["ks"]  # stand-ins, never read
    if sm90:
        return _attend_sm90(buf, lut, cnt, cnt_full, out, oh, g, dense)
    cfg = _attention_config(g.dp, g.b * g.h * g.nqb)
    bm = cfg["block_m"]
    sub = BLOCK_Q // bm
    pv_skip = pv_threshold is not None
    pv_val, pv_t = _threshold(pv_threshold, "pv_threshold", g, q.device, 0.0, math.inf) if pv_skip else (0.0, None)
    skip = new_buffer((g.b * g.h, g.nqb * sub), torch.int32, q.device) if pv_skip else cnt
    _Fast.get(_attn_kernel)[(g.nqb * sub, g.b * g.h)](
        buf["q8"], buf["qs"], buf["k8"], buf["ks"], buf["v8"], buf["vs"], lut, cnt, cnt_full, skip,
        oh, *oh.stride(),
        g.h, g.h // g.hk, g.nqb, g.nkb, g.nq, g.nk, g.d, g.nq_pad, g.nk_pad,
        pv_t if pv_t is not None else cnt, pv_val, P_SCALE_LOG2,
        BQ=BLOCK_Q, BM=bm, BN=BLOCK_K, DP=g.dp, CAUSAL=causal, PV_SKIP=pv_skip, PV_PER_HEAD=pv_t is not None,
        FP8=pv_dtype == "fp8",
        INTERPRET=_interpreting(), PAIR=cfg["pair"], CLAMP=out.dtype == torch.float16, DENSE=dense,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **g.chained(),
    )
    return out, (skip if pv_skip else None), sub


#: the statistics of ``return_stats=True``, in the row order of the stats kernel's output
STAT_KEYS = ("density", "pv_skipped", "blocks_computed", "blocks_total")


def _stats(g: _Geom, cnt, skip, sub: int, causal: bool, st: Optional[torch.Tensor] = None, device=None) -> dict:
    """Per-head statistics as device tensors (no host sync), computed by one launch into ``st``
    (4 x H float32 on ``device``, allocated here when not given); returns views of its rows by ``STAT_KEYS``.
    ``cnt`` None: every block was computed."""
    if st is None:
        st = torch.empty(4, g.h, device=cnt.device if device is None else device, dtype=torch.float32)
    total = float(g.b * g.visible_blocks(causal))
    nprog = g.nqb * sub
    dense = cnt is None  # every block computed (``_keeps_all``)
    if dense:
        cnt = st  # a stand-in, never read
    _Fast.get(_stats_kernel)[(g.h,)](
        cnt, skip if skip is not None else cnt, st, g.b, g.h, g.nqb, nprog, total, float(sub),
        HAS_SKIP=skip is not None, DENSE=dense, BLK=min(1024, max(16, _p2(max(g.nqb, nprog)))), num_warps=4, **g.chained(),
    )
    return dict(zip(STAT_KEYS, st.unbind(0)))


def _resolve_pv(pv_dtype: str, device) -> str:
    if pv_dtype == "auto":
        return default_pv_dtype(device)
    if pv_dtype not in ("fp8", "fp16"):
        raise ValueError(f"pv_dtype must be 'auto', 'fp8' or 'fp16', got {pv_dtype!r}")
    if pv_dtype == "fp8" and torch.device(device).type == "cuda" and default_pv_dtype(device) != "fp8":
        raise ValueError("pv_dtype='fp8' needs an sm_89+ GPU (FP8 tensor cores); use 'fp16' or 'auto'")
    return pv_dtype


def sparge_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    layout: str = "HND",
    scale: Optional[float] = None,
    causal: bool = False,
    mode: str = "cdf",
    cdf_threshold: Threshold = 0.98,
    sim_threshold: Optional[Threshold] = None,
    pv_threshold: Optional[Threshold] = None,
    topk: Threshold = 0.5,
    keep_ranges: Optional[Sequence[Tuple[int, int]]] = None,
    return_stats: bool = False,
    pv_dtype: str = "auto",
    out: Optional[torch.Tensor] = None,
    rope: Optional[torch.Tensor] = None,
):
    """Sparse + quantized attention (SpargeAttn): a drop-in for ``F.scaled_dot_product_attention``.

    Parameters
    ----------
    q : (B, H, Nq, D) for ``layout="HND"``, (B, Nq, H, D) for ``layout="NHD"``
    k, v : (B, Hk, Nk, D) / (B, Nk, Hk, D); ``H`` must be a multiple of ``Hk`` (GQA). Nq may differ
        from Nk. fp16, bf16 or fp32; the output has q's dtype, shape and layout. Any D <= 256
        (64 and 128 native, others zero-padded; the default scale uses the true D).
    scale : softmax scale; default ``D ** -0.5``.
    causal : top-left aligned causal mask (query m sees keys n <= m), as SDPA's ``is_causal``.
        Blocks on the diagonal are always computed and masked element-wise.
    mode : "cdf" keeps, per Q block, the K blocks holding the top ``cdf_threshold`` of the pooled
        attention probability; "topk" keeps the top ``topk`` fraction of the (causally visible)
        K blocks. At least one block per row is kept.
    cdf_threshold : tau in [0, 1], default 0.98 (probability mass). Higher is denser.
    sim_threshold : theta, mean cosine similarity in [-1, 1] above which a block counts as
        self-similar; blocks that are not are always computed. Default (None): 0.6 in "cdf" mode,
        -0.1 in "topk" mode (the reference's defaults; -0.1 almost never triggers).
    pv_threshold : lambda for stage 2, in log2 units (>= 0): the P.V product of a K block is skipped
        for a group of 128 query rows (64 when D > 128) when every row's maximum score in that block
        is at least ``pv_threshold`` below its running maximum, i.e. every skipped probability is
        below ``2**-pv_threshold`` of the row's largest. 15 skips probabilities < 3e-5; None (default)
        disables stage 2. The paper's lambda is ``-pv_threshold * ln 2``. Per head, ``inf`` turns the
        skip off for that head.
    topk : fraction in [0, 1] of K blocks kept per Q block in "topk" mode, default 0.5.
    keep_ranges : up to 4 token ranges ``(start, end)``, end exclusive, whose Q-block rows and
        K-block columns are always computed (for example the text tokens of joint attention).
    return_stats : also return a dict of device tensors of shape (H,): ``density`` (fraction of
        visible Q.K^T blocks computed), ``pv_skipped`` (fraction of computed blocks whose P.V was
        skipped), ``blocks_computed`` and ``blocks_total``.
    pv_dtype : "auto" (FP8 e4m3 on sm_89+, fp16 on sm_80/86), "fp8" or "fp16". FP16 is more accurate
        (relL1 ~0.013 vs ~0.04 on gaussian inputs), FP8 faster.
    out : optional preallocated output shaped like q (any strides); every element is written.
    rope : optional rotary position embedding applied to q and k inside the kernels (not to v), in
        ComfyUI's format (Flux's ``pe``, Wan's ``freqs``): per token ``D/2`` rotation matrices ``F`` with
        ``q'[2i+r] = F[i, r, 0] * q[2i] + F[i, r, 1] * q[2i+1]``, shape (B or 1, H or 1, N, D/2, 2, 2) for
        layout "HND", (B or 1, N, H or 1, D/2, 2, 2) for "NHD", N >= Nq and Nk (token n of q and of k
        takes row n, as ComfyUI's ``apply_rope``), any float dtype. The rotation is done in fp32 with cos
        and sin rounded to fp16 (a table built per call; tokens whose matrices are not rotations use
        them unrounded), which is closer than ComfyUI's RoPE with its bf16 output, and it saves the
        separate pass over q and k (read and write) that applying RoPE first costs.

    cdf_threshold, sim_threshold, topk and pv_threshold each take a float or a tensor of H values
    (one per query head).

    Non-finite inputs are never hidden: a NaN/Inf in Q makes that query's row NaN; in K, every row
    of that (batch, KV head) NaN; in V, that channel NaN in every row of the (batch, KV head).
    These are the rows and channels SDPA makes non-finite.

    Under ``torch.compile`` the call goes through the custom op ``torch.ops.spargeattn.sparge_attn``
    (see ``kernels/op.py``), which the compiler treats as one opaque node.

    Returns
    -------
    out, or ``(out, stats)`` with ``return_stats=True``.
    """
    args = dict(layout=layout, scale=scale, causal=causal, mode=mode, cdf_threshold=cdf_threshold,
                sim_threshold=sim_threshold, pv_threshold=pv_threshold, topk=topk, keep_ranges=keep_ranges,
                return_stats=return_stats, pv_dtype=pv_dtype, out=out, rope=rope)
    if _OP_CALL is not None and torch.compiler.is_compiling():
        return _OP_CALL(q, k, v, **args)
    return _sparge_attn(q, k, v, **args)


#: set by ``kernels/op.py`` when it registers the custom op
_OP_CALL = None


#: launch plans by plan key (see ``launch.Plan``); None marks a key whose launches could not be
#: recorded (its calls keep the normal path). Cleared when it reaches ``_PLAN_LIMIT`` entries.
_PLANS: dict = {}
_PLAN_LIMIT = 512
#: Plans only for calls with B*H*Nq*Nk up to this. A replay's workspace keeps the pooled score map
#: (B*H*Nq*Nk/2048 bytes: 32 MiB at this limit, 21 MB at Wan 480p, 7 MB at CogVideoX-5B; 166 MB at
#: HunyuanVideo 720p) alive through the attention, where the normal path has freed it before the output
#: is allocated. Above the limit the call's GPU time (~100 ms) hides the normal path's ~0.5 ms of host time.
_PLAN_MAX_WORK = 1 << 36


def _tensor_key(t: torch.Tensor):
    """What a launch takes from a tensor argument: shape, strides, dtype, device, 16-byte alignment."""
    return t.shape, t.stride(), t.dtype, t.device, (t.data_ptr() & 15) == 0


def _plan_part(value, heads: int):
    """A threshold's part of the plan key; ``...`` when the call cannot have a plan."""
    if value is None or type(value) in (float, int, bool):
        return value
    # per-head tensors on the GPU (on the CPU their values are checked per call, which a replay would skip)
    if isinstance(value, torch.Tensor) and value.device.type == "cuda" and value.numel() == heads > 1:
        return _tensor_key(value)
    return ...


def _plan_key(q, k, v, out, layout, scale, causal, mode, thresholds, keep_ranges, return_stats, pv_dtype, rope=None):
    """Everything a call's launch arguments are computed from, or None when the call takes the normal
    path (odd argument types, a device other than the current one)."""
    if not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor) or not isinstance(v, torch.Tensor):
        return None
    dev = q.device
    if dev.type == "cuda":
        if dev.index != torch.cuda.current_device():
            return None
    elif not _interpreting():
        return None
    if q.dim() != 4 or k.dim() != 4 or layout not in ("HND", "NHD"):
        return None
    hd, nd = (1, 2) if layout == "HND" else (2, 1)
    heads = q.shape[hd]
    if q.shape[0] * heads * q.shape[nd] * k.shape[nd] > _PLAN_MAX_WORK:
        return None
    parts = tuple(_plan_part(t, heads) for t in thresholds)
    if ... in parts or not (scale is None or type(scale) in (float, int)):
        return None
    if out is not None:
        if not isinstance(out, torch.Tensor):
            return None
        out = _tensor_key(out)
    if keep_ranges is not None:
        try:
            keep_ranges = tuple((int(a), int(b)) for a, b in keep_ranges)
        except (TypeError, ValueError):
            return None
    if rope is not None and not isinstance(rope, torch.Tensor):
        return None
    tensors = tuple(_tensor_key(t) for t in (q, k, v) + ((rope,) if rope is not None else ()))
    knobs = (os.environ.get("SPARGEATTN_KERNEL"), tuple(ATTN_CONFIG_OVERRIDE.items()), tuple(PREP_WARPS.items()),
             tuple(PREP_ROWS.items()), PDL, FUSE_V_MAX, DENSE_STATS)
    return tensors, out, layout, scale, causal, mode, parts, keep_ranges, return_stats, pv_dtype, rope is not None, knobs


def _sparge_attn(q, k, v, *, layout, scale, causal, mode, cdf_threshold, sim_threshold, pv_threshold, topk,
                 keep_ranges, return_stats, pv_dtype, out, rope=None):
    thresholds = (cdf_threshold, sim_threshold, topk, pv_threshold)
    key = None
    if replay_allowed():
        try:
            key = _plan_key(q, k, v, out, layout, scale, causal, mode, thresholds, keep_ranges, return_stats,
                            pv_dtype, rope)
        except TypeError:  # an unhashable argument: the normal path reports what is wrong with it
            key = None
    plan = _PLANS.get(key, ...) if key is not None else None
    if plan is None:  # no plan for such calls
        return _run(q, k, v, layout, scale, causal, mode, thresholds, keep_ranges, return_stats, pv_dtype, out,
                    rope=rope)
    if out is None:
        out = torch.empty_like(q)  # keeps q's memory order (dense inputs), so NHD views stay NHD
    st = None
    if return_stats:
        st = torch.empty(4, q.shape[1 if layout == "HND" else 2], device=q.device, dtype=torch.float32)
    inputs = (q, k, v, out, st, rope) + tuple(t if isinstance(t, torch.Tensor) else None for t in thresholds)
    if plan is ...:  # first call with this key: the normal path, recorded
        with Recorder(inputs) as rec:
            res = _run(q, k, v, layout, scale, causal, mode, thresholds, keep_ranges, return_stats, pv_dtype, out, st,
                       rope)
        if len(_PLANS) >= _PLAN_LIMIT:
            _PLANS.clear()
        _PLANS[key] = rec.plan()
        return res
    plan.run(inputs, q.device)
    if return_stats:
        return out, dict(zip(STAT_KEYS, st.unbind(0)))
    return out


def _run(q, k, v, layout, scale, causal, mode, thresholds, keep_ranges, return_stats, pv_dtype, out, st=None,
         rope=None):
    """The call through Python (checks, buffers, launches): what a plan records and replays."""
    cdf_threshold, sim_threshold, topk, pv_threshold = thresholds
    g = _check(q, k, v, layout)
    scale = g.d**-0.5 if scale is None else float(scale)
    if sim_threshold is None:
        sim_threshold = 0.6 if mode == "cdf" else -0.1
    pv = _resolve_pv(pv_dtype, q.device)
    f = _rope_arg(rope, g, q.device)
    with _launch_guard(q.device):
        buf = _prep_qk(q, k, v, g, scale, pv, _use_sm90(q.device, g.dp, pv, causal, pv_threshold is not None), f,
                       stats=DENSE_STATS or not _keeps_all(mode, topk, causal))
        lut, cnt, cnt_full = _blocks(buf, g, scale, causal, mode, cdf_threshold, sim_threshold, topk, keep_ranges)
        out, skip, sub = _attend(buf, lut, cnt, cnt_full, q, g, causal, pv_threshold, pv, out)
        if return_stats:
            return out, _stats(g, cnt, skip, sub, causal, st, q.device)
    return out


def predict_block_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    layout: str = "HND",
    scale: Optional[float] = None,
    causal: bool = False,
    mode: str = "cdf",
    cdf_threshold: Threshold = 0.98,
    sim_threshold: Optional[Threshold] = None,
    topk: Threshold = 0.5,
    keep_ranges: Optional[Sequence[Tuple[int, int]]] = None,
    rope: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The stage-1 block mask that :func:`sparge_attn` would use.

    Same arguments as :func:`sparge_attn`. Returns a bool tensor of shape
    (B, H, ceil(Nq / BLOCK_Q), ceil(Nk / BLOCK_K)); True = the block is computed. Causally
    invisible blocks are False.
    """
    g = _check(q, k, None, layout)
    scale = g.d**-0.5 if scale is None else float(scale)
    if sim_threshold is None:
        sim_threshold = 0.6 if mode == "cdf" else -0.1
    with _launch_guard(q.device):
        buf = _prep_qk(q, k, None, g, scale, None, rope=_rope_arg(rope, g, q.device))
        _, _, _, mask = _select(buf, g, scale, causal, mode, cdf_threshold, sim_threshold, topk, keep_ranges,
                                write_mask=True)
    return mask


def block_sparse_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    *,
    layout: str = "HND",
    scale: Optional[float] = None,
    causal: bool = False,
    pv_threshold: Optional[Threshold] = None,
    return_stats: bool = False,
    pv_dtype: str = "auto",
    out: Optional[torch.Tensor] = None,
    rope: Optional[torch.Tensor] = None,
):
    """Attention over a caller-supplied block mask (no prediction).

    ``block_mask``: bool or 0/1 tensor broadcastable to (B, H, ceil(Nq / BLOCK_Q), ceil(Nk / BLOCK_K)),
    True = compute the block. Rows whose kept blocks hold no visible key return zeros (SDPA would
    return NaN for a fully masked row). Other arguments as :func:`sparge_attn`.
    """
    g = _check(q, k, v, layout)
    scale = g.d**-0.5 if scale is None else float(scale)
    want = (g.b, g.h, g.nqb, g.nkb)
    if block_mask.dim() != 4 or block_mask.shape[2:] != want[2:]:
        raise ValueError(
            f"block_mask has shape {tuple(block_mask.shape)}; expected {want} "
            f"(BLOCK_Q={BLOCK_Q} query rows by BLOCK_K={BLOCK_K} key rows per block)"
        )
    try:
        bm = block_mask.to(device=q.device).expand(want)
    except RuntimeError as exc:
        raise ValueError(f"block_mask of shape {tuple(block_mask.shape)} does not broadcast to {want}") from exc
    if bm.dtype != torch.bool:
        bm = bm != 0
    pv = _resolve_pv(pv_dtype, q.device)
    f = _rope_arg(rope, g, q.device)
    with _launch_guard(q.device):
        buf = _prep_qk(q, k, v, g, scale, pv, _use_sm90(q.device, g.dp, pv, causal, pv_threshold is not None), f,
                       stats=DENSE_STATS)
        lut, cnt, cnt_full, _ = _select(buf, g, scale, causal, "cdf", 1.0, 0.0, 1.0, None, block_mask=bm)
        out, skip, sub = _attend(buf, lut, cnt, cnt_full, q, g, causal, pv_threshold, pv, out)
        if return_stats:
            return out, _stats(g, cnt, skip, sub, causal)
    return out
