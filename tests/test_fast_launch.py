"""The fast launch path's cache key (``kernels.launch._Fast``) must separate every pair of arguments
that Triton compiles differently; otherwise a later call would run a kernel specialized for
another argument (e.g. an int assumed divisible by 16). Checked against Triton's own
specialization function; the launches themselves run in the GPU tier of the kernel tests."""

import random

import pytest
import torch

from sparge_pack.kernels.launch import _Fast


def _native():
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import BaseBackend
    except ImportError as exc:  # older or newer Triton without this function
        pytest.skip(f"Triton has no native_specialize_impl: {exc}")
    return lambda a: native_specialize_impl(BaseBackend, a, False, True, True)


def _values(rng):
    ints = [0, 1, 2, 15, 16, 17, 31, 32, 48, 64, 127, 128, 4608, 32760, 119056, -1, -16, -17,
            2**31 - 16, 2**31 - 1, 2**31, 2**31 + 16, 2**40, 24 * 119056 * 128, -(2**31), -(2**31) - 16]
    ints += [rng.randrange(-2**34, 2**34) for _ in range(300)] + [16 * rng.randrange(1, 2**28) for _ in range(100)]
    base = torch.empty(4096, dtype=torch.uint8)
    tensors = []
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.int8, torch.int32):
        t = torch.empty(1024, dtype=dtype)
        tensors += [t, t[1:], t[8:], t[16:]]
    tensors += [base[i:] for i in range(0, 64, 3)]
    return ints + [0.5, 1.0, 1e30] + [True, False] + tensors


def test_fast_key_is_at_least_as_fine_as_tritons_specialization():
    native = _native()
    rng = random.Random()
    groups = {}
    for a in _values(rng):
        groups.setdefault(_Fast._spec(a), set()).add(repr(native(a)))
    mixed = {k: v for k, v in groups.items() if len(v) > 1}
    assert not mixed, f"one fast-launch key covers several Triton specializations: {mixed}"
    assert len(groups) > 5  # the values did spread over several keys
