"""Programmatic dependent launch (PDL, sm_90 and newer) between the launches of one call.

A call is 6-7 short launches (one more with statistics); at Flux size each boundary costs ~1-2 us of launch
latency and ramp-up in which the GPU does nothing. With PDL the next kernel of the call is launched with
``launch_pdl=True`` and its programs are scheduled as soon as every program of the current kernel
has started (``griddepcontrol.launch_dependents``); they wait in ``griddepcontrol.wait`` until the
current kernel has completed and its writes are visible, then run. Every kernel of the call waits
first thing, so each one also completes after all earlier ones (their writes are visible
transitively). The first kernel of a call is launched without PDL: it must not start before the
work queued before the call (which may still read the memory the call's buffers reuse) is done.
"""

import triton
import triton.language as tl

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    AVAILABLE = True
except ImportError:  # a Triton without grid dependency control: no PDL
    AVAILABLE = False


@triton.jit
def pdl_start(PDL: tl.constexpr):
    """With PDL: wait for the previous kernel of the stream (a no-op when this launch had no PDL
    attribute), then let the next kernel's programs be scheduled."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
