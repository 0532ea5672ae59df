"""SpargeAttn kernels in Triton (torch + triton only; never imports ComfyUI).

>>> from kernels import sparge_attn
>>> out = sparge_attn(q, k, v, mode="topk", topk=0.5)            # (B, H, N, D) in, same out
>>> out, stats = sparge_attn(q, k, v, return_stats=True)          # stats["density"]: (H,)

Supported: NVIDIA GPUs sm_80 and newer (FP8 P.V on sm_89+, FP16 P.V on sm_80/86/87); on a CPU only
through the Triton interpreter (``TRITON_INTERPRET=1``), which the tests use.
"""

from .api import block_sparse_attn, default_pv_dtype, predict_block_mask, sparge_attn, unavailable_reason
from .config import BLOCK_K, BLOCK_Q, MAX_HEAD_DIM, NATIVE_HEAD_DIMS
from .op import sparge_attn_op  # registers torch.ops.spargeattn.sparge_attn (used under torch.compile)

SUPPORTED_HEAD_DIMS = tuple(range(1, MAX_HEAD_DIM + 1))

__all__ = [
    "sparge_attn",
    "predict_block_mask",
    "block_sparse_attn",
    "sparge_attn_op",
    "unavailable_reason",
    "default_pv_dtype",
    "BLOCK_Q",
    "BLOCK_K",
    "NATIVE_HEAD_DIMS",
    "MAX_HEAD_DIM",
    "SUPPORTED_HEAD_DIMS",
]
