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

#: The largest FP8 e4m3 magnitude. V is divided per channel by
#: ``max(sampled_amax / V_SAMPLE_TARGET, amax / V_FP8_MAX)`` before the FP8 (or FP16) cast.
V_FP8_MAX = 448.0

#: Where the per-channel |max| of the sampled tokens lands: 16x below the FP8 maximum, so that any token
#: up to 16x larger than the sampled ones still fits. The relative precision of a floating-point format
#: does not depend on the scale, so the headroom costs nothing but the range below 2^-6 (subnormals, values
#: < 1/1800 of the sampled maximum). A larger token makes its channel's scale ``amax / V_FP8_MAX``
#: (``quant._v_fix_kernel`` requantizes that head).
V_SAMPLE_TARGET = V_FP8_MAX / 16

#: The token mean of K (the smoothing vector) and the per-channel V scale come from every
#: ``stats_stride(N)``-th token (tokens 0, s, 2s, ...), ~STATS_SAMPLES of them; all tokens below
#: 2 * STATS_SAMPLES. The smoothing needs *a* common vector (q.mu is the same for every key of a row and
#: cancels in the softmax), so a sampled mean changes the result only through the INT8 rounding of K
#: and the self-similarity of the centred K blocks; it saves reading K once (Wan 480p: 335 MB).
STATS_SAMPLES = 512


def stats_stride(n: int) -> int:
    """Token stride of the sampled statistics for a sequence of ``n`` keys."""
    return max(1, n // STATS_SAMPLES)

#: Head dims the kernel computes natively; any other D <= MAX_HEAD_DIM is zero-padded.
NATIVE_HEAD_DIMS = (64, 128)
MAX_HEAD_DIM = 256
