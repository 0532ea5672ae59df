"""How the pack's Triton kernels are launched with little host time.

A Flux-size call does ~0.3 ms of GPU work in 8 launches; through Triton's JIT entry point each
launch costs ~25 us of Python (argument binding, specialization, cache lookup), and the call's own
bookkeeping (checks, 15 allocations, argument lists) as much again, so the GPU waited for the host.
Two layers remove that:

* :class:`_Fast` launches a compiled kernel through its launcher directly once Triton has
  compiled it (the cache key holds everything Triton specializes on).
* :class:`Plan`: the first call with a given *plan key* (shapes, strides, dtypes, alignment and
  options: everything the launch arguments are computed from) runs normally while a
  :class:`Recorder` notes its launches and buffer allocations. The plan keeps the launches as
  argument templates in which every tensor is either one of the call's inputs or an offset into
  one workspace; later calls with the same key allocate that workspace and replay the launches
  with raw pointers (the launcher accepts ints for pointer arguments). A launch argument that is
  neither an input nor a recorded buffer means no plan for that key (such calls keep the normal
  path), so a plan never replays a stale tensor.

A replay whose inputs and workspace sit at the addresses of the replay before reuses that replay's
argument lists; with :data:`Plan.direct` they are also kept in the form Triton's C launch function takes
(TMA descriptors encoded once, no per-launch Python wrapper), see :func:`_direct_launcher`.

In the Triton interpreter (the CPU tests) plans replay with tensor views of the workspace instead
of raw pointers, so the CPU tests exercise the same templates.
"""

from __future__ import annotations

import copy
import os
import threading
from typing import Optional

import torch

try:
    from triton import knobs as _KNOBS
except ImportError:  # Triton < 3.4 (or none): no knobs, so no fast launch (the JIT path is used)
    _KNOBS = None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_TLS = threading.local()  # .recorder: the Recorder of this thread's call being recorded, if any


class _Fast:
    """``_Fast(kernel)[grid](*args, **meta)`` launches like ``kernel[grid](*args, **meta)``, minus most of
    Triton's per-launch Python (~25 us of host time per launch, which made Flux-size calls host-bound).

    The first launch of each specialization goes through Triton's JIT, which compiles and returns
    the compiled kernel; later launches call that kernel's launcher directly. The cache key holds
    everything Triton 3.x specializes a compiled kernel on: per tensor its dtype and 16-byte
    alignment; per int whether it is 1, a multiple of 16 and its integer width; the constexprs and
    launch options by value. Any surprise from the launcher (another Triton's API) turns the fast
    path off for the process and falls back to the JIT. Not used in the interpreter.
    Every launch is also reported to this thread's :class:`Recorder` while one is active."""

    enabled = True
    cache: dict = {}
    wrappers: dict = {}  # id(kernel) -> _Fast (a JITFunction's own hash recomputes its cache key)

    @classmethod
    def get(cls, fn) -> "_Fast":
        w = cls.wrappers.get(id(fn))
        if w is None:
            w = cls.wrappers[id(fn)] = cls(fn)
        return w

    def __init__(self, fn):
        self.fn = fn
        names = getattr(fn, "arg_names", None)  # None: not a JITFunction (e.g. tests/compile_check.py)
        self.names = list(names) if names is not None else None

    def __getitem__(self, grid):
        return lambda *args, **meta: self.launch(grid, args, meta)

    @staticmethod
    def _spec(a):
        if isinstance(a, torch.Tensor):
            return a.dtype, (a.data_ptr() & 15) == 0
        if type(a) is int:
            return a == 1, (a & 15) == 0, -0x80000000 <= a <= 0x7FFFFFFF
        return type(a)

    def launch(self, grid, args, meta):
        kernel, tail = self._launch(grid, args, meta)
        rec = getattr(_TLS, "recorder", None)
        if rec is not None:
            rec.launches.append((self.fn, tuple(grid), args, meta, kernel, tail))
        return kernel

    def _launch(self, grid, args, meta):
        """(compiled kernel or None, the constexpr values that follow ``args`` in its launcher's
        signature, or None when unknown)."""
        fn = self.fn
        if not _Fast.enabled or self.names is None or _KNOBS is None or interpreting():
            return fn[grid](*args, **meta), None
        dev = torch.cuda.current_device()
        key = (id(fn), dev, tuple(meta.items()), tuple(map(_Fast._spec, args)))
        hit = _Fast.cache.get(key)
        if hit is None:
            kernel = fn[grid](*args, **meta)
            rest = self.names[len(args):]
            if all(n in meta for n in rest) and all(
                    hasattr(kernel, a) for a in ("run", "function", "packed_metadata", "launch_metadata")):
                hit = _Fast.cache[key] = (kernel, tuple(meta[n] for n in rest))
                return hit
            return kernel, None
        kernel, tail = hit
        full = args + tail
        g0, g1, g2 = (tuple(grid) + (1, 1))[:3]
        stream = torch._C._cuda_getCurrentRawStream(dev)
        if _hooked():
            enter, leave = _KNOBS.runtime.launch_enter_hook, _KNOBS.runtime.launch_exit_hook
            meta_l = kernel.launch_metadata(grid, stream, *full)
        else:  # the launcher calls no hook and needs no metadata
            enter = leave = meta_l = None
        try:
            kernel.run(g0, g1, g2, stream, kernel.function, kernel.packed_metadata, meta_l, enter, leave, *full)
        except (TypeError, AttributeError):  # a launcher this code does not know: argument parsing failed
            _Fast.enabled = False
            return fn[grid](*args, **meta), None
        return hit


def new_buffer(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """``torch.empty`` for the call's internal buffers; reported to an active :class:`Recorder`."""
    t = torch.empty(shape, dtype=dtype, device=device)
    rec = getattr(_TLS, "recorder", None)
    if rec is not None:
        rec.buffers.append(t)
    return t


class Recorder:
    """Collects the launches and internal buffers of one call (``with Recorder(inputs) as rec:``).

    ``inputs``: the call's tensors in a fixed slot order (None for an unused slot); every tensor
    argument of a launch must start at one of their data pointers or lie inside a buffer allocated
    by :func:`new_buffer` during the call."""

    def __init__(self, inputs):
        self.inputs = list(inputs)
        self.launches: list = []
        self.buffers: list = []

    def __enter__(self):
        if getattr(_TLS, "recorder", None) is not None:
            raise RuntimeError("internal: nested launch recording")
        _TLS.recorder = self
        return self

    def __exit__(self, *exc):
        _TLS.recorder = None
        return False

    def plan(self) -> Optional["Plan"]:
        """The replayable plan of the recorded call, or None when some argument cannot be placed."""
        ptrs = [t.data_ptr() if t is not None else None for t in self.inputs]
        live = [p for p in ptrs if p is not None]
        if len(set(live)) != len(live):  # two inputs share an address: slots would be ambiguous
            return None
        offsets, size = [], 0
        for t in self.buffers:
            offsets.append(size)
            size += -(-t.numel() * t.element_size() // 256) * 256
        spans = [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size(), off)
                 for t, off in zip(self.buffers, offsets)]

        def place(t: torch.Tensor):
            """(slot, byte offset): slot -1 is the workspace; None when the tensor is unknown."""
            p = t.data_ptr()
            for slot, q in enumerate(ptrs):
                if q == p:
                    return slot, 0
            for lo, hi, off in spans:
                if lo <= p < hi:
                    return -1, off + p - lo
            return None

        launches = []
        for fn, grid, args, meta, kernel, tail in self.launches:
            fixed, ptr_args, descs, views = list(args), [], [], []
            for i, a in enumerate(args):
                if isinstance(a, torch.Tensor):
                    where = place(a)
                    if where is None:
                        return None
                    ptr_args.append((i, *where))
                    views.append((i, *where, a.dtype, tuple(a.shape), a.stride()))
                    fixed[i] = None
                elif hasattr(a, "base") and isinstance(getattr(a, "base"), torch.Tensor):  # a TMA descriptor
                    where = place(a.base)
                    if where is None or where[0] != -1:
                        return None
                    tmpl = copy.copy(a)
                    tmpl.base = None  # the plan must not keep the recorded call's buffer alive
                    descs.append((i, where[1], tmpl))
                    fixed[i] = None
            if interpreting():
                launches.append(_Replay(fn, grid, fixed, meta, None, ptr_args, descs, views))
            else:
                if tail is None:  # launched without the fast path: no launcher to call directly
                    return None
                launches.append(_Replay(fn, grid, fixed + list(tail), meta, kernel, ptr_args, descs, views))
        return Plan(size, launches)


class _Ptr:
    """A device address with the one method Triton's launcher asks a tensor for."""

    __slots__ = ("p",)

    def __init__(self, p: int):
        self.p = p

    def data_ptr(self) -> int:
        return self.p


def _direct_launcher(run):
    """(C launch function, (coop, pdl), {argument index: tensordesc metadata}, descriptor encoder) behind the
    launcher ``run`` of a Triton 3.6 CUDA kernel (``CudaLauncher``), or None when it is not laid out as
    expected or needs scratch memory. ``CudaLauncher.__call__`` allocates the scratch buffers (none for our
    kernels) and, for a kernel with TMA descriptor arguments, a Python wrapper encodes every descriptor
    (``cuTensorMapEncodeTiled``) on every launch before calling the C function; a replay at unchanged
    addresses can encode them once."""
    try:
        if run.global_scratch_size or run.profile_scratch_size or getattr(run, "num_ctas", 1) != 1:
            return None
        fn = run.launch
        flags = (int(run.launch_cooperative_grid), int(run.launch_pdl))
        if type(fn).__name__ == "builtin_function_or_method":  # no descriptor arguments: the C function itself
            return fn, flags, {}, None
        cells = dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in fn.__closure__ or ())))
        if set(cells) != {"launcher", "tensordesc_indices", "tensordesc_meta"}:
            return None
        meta = dict(zip(sorted(cells["tensordesc_indices"]), cells["tensordesc_meta"]))
        if any(m is None for m in meta.values()):  # descriptors lowered to pointers: left to Triton's wrapper
            return None
        from triton.backends.nvidia.driver import make_tensordesc_arg  # what the wrapper calls per launch

        return cells["launcher"], flags, meta, make_tensordesc_arg
    except (AttributeError, TypeError, ValueError, ImportError):
        return None


class _Replay:
    __slots__ = ("fn", "grid", "g", "args", "meta", "run", "function", "packed", "ptr_args", "descs", "views",
                 "direct")

    def __init__(self, fn, grid, args, meta, kernel, ptr_args, descs, views):
        self.fn, self.grid, self.args, self.meta = fn, grid, args, meta
        self.g = (tuple(grid) + (1, 1))[:3]
        self.run = getattr(kernel, "run", None)
        self.function = getattr(kernel, "function", None)
        self.packed = getattr(kernel, "packed_metadata", None)
        self.ptr_args, self.descs, self.views = ptr_args, descs, views
        self.direct = _direct_launcher(self.run) if self.run is not None else None

    def c_args(self, a: list) -> tuple:
        """The argument tuple of the C launch function for the kernel arguments ``a``, after the stream
        (filled in per launch), with the TMA descriptors encoded."""
        _, (coop, pdl), meta, encode = self.direct
        out = []
        for i, x in enumerate(a):
            if i in meta:
                out.extend(encode(x, meta[i]))
            else:
                out.append(x)
        return (self.function, coop, pdl, None, None, self.packed, None, None, None, *out)


class Plan:
    """The recorded launches of one plan key, replayable on new inputs (see the module docstring).
    ``Plan.enabled = False`` keeps every call on the normal path (for A/B measurements)."""

    enabled = True
    #: launch through the C function with the argument tuples kept between replays (``_direct_launcher``)
    direct = True
    replays = 0  # calls served by a replay in this process (a diagnostic for benchmarks and tests)

    def __init__(self, size: int, launches: list):
        self.size = size
        self.launches = launches
        # (input and workspace addresses, the launch argument lists built for them): the caching
        # allocator often hands a replay the same addresses as the one before (the same layer shapes
        # in every block of a model), and then the argument lists are reused as they are
        self._last = None

    def run(self, inputs, device: torch.device) -> None:
        """Launch everything on ``inputs`` (tensors in the recorded slot order, None where unused)."""
        Plan.replays += 1
        ws = torch.empty(max(self.size, 1), dtype=torch.uint8, device=device)
        if interpreting():
            self._run_views(inputs, ws)
            return
        base = ws.data_ptr()
        ptrs = [t.data_ptr() if t is not None else 0 for t in inputs]
        ptrs.append(base)  # slot -1
        key = tuple(ptrs)
        direct = Plan.direct
        last = self._last
        if last is not None and last[0] == key and last[1] == direct:
            arg_lists = last[2]
        else:
            arg_lists = [self._args(r, ptrs, base) for r in self.launches]
            if direct:  # the C launch function's tuples where the launcher allows it, else the lists
                arg_lists = [r.c_args(a) if r.direct is not None else a for r, a in zip(self.launches, arg_lists)]
            self._last = (key, direct, arg_lists)
        stream = torch._C._cuda_getCurrentRawStream(device.index)
        for r, a in zip(self.launches, arg_lists):
            if direct and r.direct is not None:
                r.direct[0](r.g[0], r.g[1], r.g[2], stream, *a)
            else:
                r.run(r.g[0], r.g[1], r.g[2], stream, r.function, r.packed, None, None, None, *a)

    @staticmethod
    def _args(r: "_Replay", ptrs: list, base: int) -> list:
        """Launch ``r``'s arguments with its tensors placed at ``ptrs`` (slot -1: the workspace at ``base``)."""
        a = r.args.copy()
        for i, slot, off in r.ptr_args:
            a[i] = ptrs[slot] + off
        for i, off, desc in r.descs:
            d = copy.copy(desc)
            d.base = _Ptr(base + off)
            a[i] = d
        return a

    def _run_views(self, inputs, ws: torch.Tensor) -> None:
        """The interpreter's replay: each tensor argument rebuilt as a view of an input or of ``ws``."""
        for r in self.launches:
            a = list(r.args)
            for i, slot, off, dtype, shape, stride in r.views:
                if slot >= 0:
                    src = inputs[slot]
                    storage, start = src.untyped_storage(), src.storage_offset() * src.element_size() + off
                else:
                    storage, start = ws.untyped_storage(), off
                a[i] = torch.empty(0, dtype=dtype, device=ws.device).set_(storage, start // dtype.itemsize, shape, stride)
            r.fn[r.grid](*a, **r.meta)


def _hooked() -> bool:
    """Whether something (a profiler such as Proton) hooks Triton's kernel launches. The hooks are
    None when unset in older Triton releases, empty ``HookChain`` objects in Triton 3.6."""
    rt = _KNOBS.runtime
    for hook in (rt.launch_enter_hook, rt.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return True
    return False


def replay_allowed() -> bool:
    """Plans replay through Triton's launcher when nothing hooks launches, and in the interpreter."""
    if not Plan.enabled:
        return False
    if interpreting():
        return True
    return _Fast.enabled and _KNOBS is not None and not _hooked()
