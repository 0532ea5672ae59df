"""Constants shared by the kernels, the reference and the callers.

One block geometry on every GPU: the stage-1 mask, the LUT and ``block_sparse_attn`` all use
``BLOCK_Q`` query rows by ``BLOCK_K`` key rows.
"""

import math

BLOCK_Q = 128
BLOCK_K = 64

#: P is computed as ``exp2(s - m + P_SCALE_LOG2)`` so that it spans [0, 448], the FP8 e4m3 range;
#: the factor cancels in ``acc / l``.
P_SCALE_LOG2 = math.log2(448.0)

#: V is divided by ``amax_over_tokens / V_FP8_MAX`` per channel before the FP8 (or FP16) cast.
V_FP8_MAX = 448.0

#: Head dims the kernel computes natively; any other D <= MAX_HEAD_DIM is zero-padded.
NATIVE_HEAD_DIMS = (64, 128)
MAX_HEAD_DIM = 256
