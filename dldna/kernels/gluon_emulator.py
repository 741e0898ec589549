"""Run Gluon kernels on the CPU, so that the CPU-only CI can test them.

Gluon (``triton.experimental.gluon``) kernels lay out warps, shared memory, barriers and asynchronous tensor-core
calls themselves, and Triton's interpreter (``TRITON_INTERPRET=1``) cannot run them. :func:`launch` runs one here,
in PyTorch, with the semantics its code relies on:

- each program of the grid, and each partition of ``gl.warp_specialize``, is a thread; one runs at a time, and a
  scheduler picks the next one whenever the running one blocks on an ``mbarrier.wait`` (``schedule``: the lowest
  runnable thread first, the highest first, or a seeded random one at every wait), so every run is reproducible and
  a kernel whose partitions all wait on each other raises :class:`DeadlockError` instead of hanging;
- mbarriers keep their count, transaction bytes and phase as the hardware does (``expect`` is ``arrive.expect_tx``;
  ``wait(bar, p)`` returns once the phase of parity ``p`` has completed);
- TMA copies land either when issued or only when a thread waits on their barrier (``copies``: ``"eager"`` catches a
  producer that overwrites a slot still being read, ``"lazy"`` a consumer that reads a slot before waiting);
  out-of-bounds boxes are zero-filled and stores clipped, as TMA does; shared memory starts as NaN;
- ``warpgroup_mma`` computes in float32 when issued and checks, when ``warpgroup_mma_wait`` retires it, that its
  shared-memory operands did not change in between; a TMA store is written when ``tma.store_wait`` retires it,
  after the same check; a token read before its wait raises;
- runtime integers are int32 with C division (``//`` and ``%`` truncate towards zero) and raise on overflow;
  constexpr arithmetic stays Python's, as in Triton's compiler; loads and stores raise when an unmasked lane is out
  of bounds, and masked-off lanes without ``other`` read NaN.

It is a semantic model, not a timing one: layouts, warps and registers are ignored, and a kernel that passes here
can still fail on the GPU for a reason that only the hardware has (a layout the compiler rejects, a race on memory
that no barrier orders). Only what the FlashAttention kernels of ``dldna`` use is modelled; anything else raises
``NotImplementedError`` with its name.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import random
import threading
import types

import torch
from torch.overrides import TorchFunctionMode

from triton.experimental.gluon import language as _gl
from triton.experimental.gluon.language.nvidia import hopper as _hopper
from triton.experimental.gluon.language.nvidia.hopper import mbarrier as _mbarrier
from triton.experimental.gluon.language.nvidia.hopper import tma as _tma
from triton.runtime.jit import JITFunction

__all__ = ["launch", "run", "options", "DeadlockError", "HazardError"]

LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg", "grid")
SCHEDULES = ("first", "last", "random")
COPIES = ("eager", "lazy")
_INT32_MIN, _INT32_MAX = -2 ** 31, 2 ** 31 - 1


class DeadlockError(RuntimeError):
    """Every live thread of the emulated kernel waits on a barrier phase that nothing can complete."""


class HazardError(RuntimeError):
    """The kernel broke a rule of asynchronous execution: an operand changed while in flight, a token read before
    its wait, more arrivals than a barrier's count."""


# ----------------------------------------------------------------------------------------------------- integers
def _trunc_div(a, b):
    if b == 0:
        raise ZeroDivisionError("integer division by zero in an emulated kernel")
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b >= 0) else -q


class I32(int):
    """A runtime int32 of a kernel: C division and remainder, and an error instead of a silent wrap-around."""

    def __new__(cls, value):
        value = int(value)
        if not _INT32_MIN <= value <= _INT32_MAX:
            raise OverflowError(f"int32 overflow in an emulated kernel: {value}")
        return super().__new__(cls, value)

    def to(self, dtype):
        return I32(self) if dtype in (torch.int32, _gl.int32) else int(self)


def _int_op(name, fn):
    def op(self, other):
        if isinstance(other, bool) or not isinstance(other, int):
            return NotImplemented
        return I32(fn(int(self), int(other)))

    op.__name__ = name
    return op


_INT_OPS = {
    "add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
    "floordiv": _trunc_div, "mod": lambda a, b: a - b * _trunc_div(a, b),
    "and": lambda a, b: a & b, "or": lambda a, b: a | b, "xor": lambda a, b: a ^ b,
    "lshift": lambda a, b: a << b, "rshift": lambda a, b: a >> b,
}
for _name, _fn in _INT_OPS.items():
    setattr(I32, f"__{_name}__", _int_op(f"__{_name}__", _fn))
    setattr(I32, f"__r{_name}__", _int_op(f"__r{_name}__", lambda a, b, _fn=_fn: _fn(b, a)))
I32.__neg__ = lambda self: I32(-int(self))
I32.__pos__ = lambda self: self
I32.__abs__ = lambda self: I32(abs(int(self)))


class _CDivision(TorchFunctionMode):
    """Integer tensors' ``//`` and ``%`` truncate towards zero, as on the GPU (PyTorch floors)."""

    _DIV = {torch.Tensor.__floordiv__, torch.Tensor.__ifloordiv__, torch.floor_divide, torch.Tensor.floor_divide}
    _RDIV = {torch.Tensor.__rfloordiv__}
    _MOD = {torch.Tensor.__mod__, torch.Tensor.__imod__, torch.remainder, torch.Tensor.remainder}
    _RMOD = {torch.Tensor.__rmod__}

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self._DIV or func in self._RDIV or func in self._MOD or func in self._RMOD:
            a, b = args[:2]
            if func in self._RDIV or func in self._RMOD:
                a, b = b, a
            if func in self._DIV or func in self._RDIV:
                if not _is_float(a) and not _is_float(b):
                    return torch.div(torch.as_tensor(a), b, rounding_mode="trunc")
            else:
                return torch.fmod(torch.as_tensor(a), b)
        return func(*args, **kwargs)


def _is_float(x):
    return isinstance(x, float) or (isinstance(x, torch.Tensor) and x.dtype.is_floating_point)


def _scalar(value):
    """A 0-d integer result (a reduction, a scalar load) as a runtime int32, as the kernel would hold it."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.dtype.is_floating_point \
            and value.dtype != torch.bool:
        return I32(value.item())
    return value


# ------------------------------------------------------------------------------------------------------ memory
_TORCH_DTYPES = {_gl.bfloat16: torch.bfloat16, _gl.float16: torch.float16, _gl.float32: torch.float32,
                 _gl.int32: torch.int32, _gl.int64: torch.int64, _gl.int8: torch.int8, _gl.int16: torch.int16,
                 _gl.float64: torch.float64}


def _torch_dtype(dtype):
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _TORCH_DTYPES:
        raise NotImplementedError(f"dtype {dtype} is not emulated")
    return _TORCH_DTYPES[dtype]


def _poison(shape, dtype):
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype)
    return torch.full(shape, torch.iinfo(dtype).min, dtype=dtype)


class Pointer:
    """A global-memory pointer (or a tensor of them): a flat view of the argument and element offsets."""

    def __init__(self, storage: torch.Tensor, offset=0, name="pointer"):
        self.storage, self.offset, self.name = storage, offset, name

    def __add__(self, other):
        if isinstance(other, Pointer):
            raise TypeError("cannot add two pointers")
        return Pointer(self.storage, self.offset + other, self.name)

    __radd__ = __add__

    def __sub__(self, other):
        return Pointer(self.storage, self.offset - other, self.name)

    def _lanes(self, mask):
        offsets = torch.as_tensor(self.offset, dtype=torch.int64)
        active = torch.ones_like(offsets, dtype=torch.bool) if mask is None else torch.as_tensor(mask).bool()
        offsets, active = torch.broadcast_tensors(offsets, active)
        bad = active & ((offsets < 0) | (offsets >= self.storage.numel()))
        if bad.any():
            raise IndexError(f"{self.name}: an unmasked lane reads or writes element {int(offsets[bad][0])} "
                             f"outside its {self.storage.numel()} elements")
        return offsets, active


def _load(pointer, mask=None, other=None, **_):
    offsets, active = pointer._lanes(mask)
    fill = _poison((), pointer.storage.dtype) if other is None else torch.as_tensor(other)
    values = torch.where(active, pointer.storage[offsets.clamp(0, pointer.storage.numel() - 1)],
                         fill.to(pointer.storage.dtype))
    return _scalar(values)


def _store(pointer, value, mask=None, **_):
    offsets, active = pointer._lanes(mask)
    value = torch.as_tensor(value).to(pointer.storage.dtype).broadcast_to(offsets.shape)
    pointer.storage[offsets[active]] = value[active]


def _atomic_add(pointer, value, mask=None, **_):
    offsets, active = pointer._lanes(mask)
    old = pointer.storage[offsets.clamp(0, pointer.storage.numel() - 1)].clone()
    value = torch.as_tensor(value).to(pointer.storage.dtype).broadcast_to(offsets.shape)
    pointer.storage.index_put_((offsets[active],), value[active], accumulate=True)
    return _scalar(old)


class SharedMemory:
    """A shared-memory buffer or a view of one (``index``, ``permute``, ``slice``)."""

    def __init__(self, data: torch.Tensor):
        self.data = data

    @property
    def shape(self):
        return list(self.data.shape)

    @property
    def dtype(self):
        return self.data.dtype

    def index(self, i):
        return SharedMemory(self.data[int(i)])

    def permute(self, order):
        return SharedMemory(self.data.permute(*order))

    def slice(self, start, length, dim=0):
        return SharedMemory(self.data.narrow(dim, int(start), int(length)))

    def load(self, layout=None):
        return self.data.clone()

    def store(self, value):
        value = torch.as_tensor(value)
        if list(value.shape) != self.shape:
            raise ValueError(f"shared-memory store of shape {list(value.shape)} into a buffer of {self.shape}")
        self.data.copy_(value.to(self.data.dtype))


class Barrier:
    """One mbarrier: arrivals left in the phase, transaction bytes outstanding, the phase bit."""

    def __init__(self, name):
        self.name, self.count, self.pending, self.tx, self.phase = name, None, 0, 0, 0
        self.copies = []  # lazy TMA copies that land when a thread waits here

    def init(self, count):
        if self.count is not None:
            raise HazardError(f"{self.name} initialised twice")
        self.count = self.pending = int(count)

    def _check(self):
        if self.count is None:
            raise HazardError(f"{self.name} used before mbarrier.init")

    def arrive(self, count=1):
        self._check()
        self.pending -= int(count)
        if self.pending < 0:
            raise HazardError(f"{self.name}: more arrivals than its count ({self.count}) in one phase")
        self._maybe_complete()

    def deliver(self, nbytes):
        self.tx -= nbytes
        self._maybe_complete()

    def _maybe_complete(self):
        if self.pending == 0 and self.tx == 0:
            self.phase ^= 1
            self.pending = self.count

    def completed(self, parity):
        """Whether the phase of parity ``parity`` has completed (the current phase has the other parity)."""
        return self.phase != (int(parity) & 1)


class Barriers:
    def __init__(self, shape, name):
        self.items = [Barrier(f"{name}[{i}]") for i in range(shape[0])]

    def index(self, i):
        return self.items[int(i)]


class Descriptor:
    """A TMA tensor descriptor of the host: the tensor it views, and the box it moves."""

    def __init__(self, desc):
        self.view = torch.as_strided(desc.base, tuple(desc.shape), tuple(desc.strides))
        self.block_shape = [int(b) for b in desc.block_shape]
        self.layout = desc.layout
        self.padding = getattr(desc, "padding", "zero")
        self.dtype = desc.base.dtype
        nbytes = self.view.element_size()
        for b in self.block_shape:
            nbytes *= b
        self.block_type = types.SimpleNamespace(shape=self.block_shape, nbytes=nbytes, dtype=self.dtype)
        self.nbytes_per_cta = nbytes

    def _region(self, coord):
        """Slices of the box at ``coord`` clipped to the tensor, and the matching slices of the box."""
        if len(coord) != len(self.block_shape):
            raise ValueError(f"coordinate {list(coord)} for a {len(self.block_shape)}-D descriptor")
        src, dst = [], []
        for c, b, n in zip(coord, self.block_shape, self.view.shape):
            c = int(c)
            lo, hi = max(c, 0), min(c + b, n)
            hi = max(hi, lo)
            src.append(slice(lo, hi))
            dst.append(slice(lo - c, hi - c))
        return tuple(src), tuple(dst)

    def read(self, coord):
        src, dst = self._region(coord)
        fill = float("nan") if self.padding == "nan" else 0
        box = torch.full(self.block_shape, fill, dtype=self.dtype)
        box[dst] = self.view[src]
        return box

    def write(self, coord, box):
        src, dst = self._region(coord)
        self.view[src] = box[dst].to(self.dtype)


# --------------------------------------------------------------------------------------------------- scheduler
class _Thread:
    def __init__(self, scheduler, fn, args, pid, label):
        self.scheduler, self.fn, self.args, self.pid, self.label = scheduler, fn, args, pid, label
        self.resume = threading.Event()
        self.blocked_on, self.waiting_for = None, ""
        self.done, self.error, self.result = False, None, None
        self.wgmma, self.stores = [], []
        self.thread = threading.Thread(target=self._body, daemon=True, name=label)

    def _body(self):
        self.resume.wait()
        self.resume.clear()
        try:
            if self.scheduler.aborted:
                return
            _local.thread = self
            with torch.no_grad(), _CDivision():  # a kernel is not differentiated (grad mode is per thread)
                self.result = self.fn(*self.args)
                _retire_wgmma(self, 0)
                if self.stores:
                    raise HazardError(f"{self.label} ended with {len(self.stores)} TMA store(s) not waited for "
                                      f"(tma.store_wait)")
        except _Abort:
            pass
        except BaseException as error:  # noqa: BLE001 - handed to the launching thread
            self.error = error
        finally:
            self.done = True
            self.scheduler.back.set()


class _Abort(BaseException):
    pass


_local = threading.local()


def _current():
    thread = getattr(_local, "thread", None)
    if thread is None:
        raise RuntimeError("a Gluon builtin was called outside an emulated kernel")
    return thread


class _Scheduler:
    def __init__(self, schedule, copies, seed):
        self.schedule, self.copies = schedule, copies
        self.rng = random.Random(seed)
        self.threads, self.back, self.aborted = [], threading.Event(), False

    def spawn(self, fn, args, pid, label):
        thread = _Thread(self, fn, args, pid, label)
        self.threads.append(thread)
        thread.thread.start()
        return thread

    def block(self, ready, what):
        """Hand the turn back to the scheduler until ``ready()`` holds."""
        me = _current()
        me.blocked_on, me.waiting_for = ready, what
        self.back.set()
        me.resume.wait()
        me.resume.clear()
        if self.aborted:
            raise _Abort

    def run(self, programs, programs_at_once):
        pending = list(programs)
        roots = []
        try:
            while True:
                live_roots = [t for t in roots if not t.done]
                while pending and len(live_roots) < programs_at_once:
                    fn, args, pid = pending.pop(0)
                    live_roots.append(self.spawn(fn, args, pid, f"program {pid}"))
                    roots.append(live_roots[-1])
                live = [t for t in self.threads if not t.done]
                if not live:
                    return
                runnable = [t for t in live if t.blocked_on is None or t.blocked_on()]
                if not runnable:
                    if self._land_all():
                        continue
                    waits = [f"{t.label} on {t.waiting_for}" for t in live if t.fn is not None and
                             not t.waiting_for.startswith("its warp_specialize")]
                    raise DeadlockError("every thread waits: " + "; ".join(waits))
                if self.schedule == "first":
                    chosen = runnable[0]
                elif self.schedule == "last":
                    chosen = runnable[-1]
                else:
                    chosen = self.rng.choice(runnable)
                chosen.blocked_on = None
                self.back.clear()
                chosen.resume.set()
                self.back.wait()
                if chosen.error is not None:
                    raise chosen.error
        finally:
            self.aborted = True
            for t in self.threads:
                if not t.done:
                    t.resume.set()

    def _land_all(self):
        landed = False
        for t in self.threads:
            for bar in getattr(t, "barriers", ()):
                landed |= _land(bar)
        return landed


def _land(bar):
    landed = bool(bar.copies)
    while bar.copies:
        desc, coord, dst = bar.copies.pop(0)
        dst.data.copy_(desc.read(coord))
        bar.deliver(desc.nbytes_per_cta)
    return landed


# ------------------------------------------------------------------------------------------------- the builtins
def _program_id(axis):
    return I32(_current().pid[int(axis)])


def _num_programs(axis):
    return I32(_current().scheduler.grid[int(axis)])


def _where(cond, a, b):
    if not any(isinstance(x, torch.Tensor) for x in (cond, a, b)):
        return a if cond else b
    return torch.where(torch.as_tensor(cond), a, b)


def _binary(scalar_fn, tensor_fn):
    def op(a, b, *_, **__):
        if not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor):
            return scalar_fn(a, b)
        like = a if isinstance(a, torch.Tensor) else b
        return tensor_fn(torch.as_tensor(a, dtype=like.dtype), torch.as_tensor(b, dtype=like.dtype))
    return op


def _reduce(fn):
    def op(x, axis=None, keep_dims=False, **_):
        return _scalar(fn(x, axis, keep_dims))
    return op


def _allocate_shared_memory(dtype, shape, layout, value=None):
    shape = [int(s) for s in shape]
    if isinstance(layout, _mbarrier.MBarrierLayout):
        me = _current()
        name = f"mbarrier {len(getattr(me, 'barriers', ()))} of {me.label}"
        bars = Barrier(name) if len(shape) == 1 else Barriers(shape, name)
        me.barriers = getattr(me, "barriers", []) + ([bars] if len(shape) == 1 else bars.items)
        return bars
    memory = SharedMemory(_poison(shape, _torch_dtype(dtype)))
    if value is not None:
        memory.store(value)
    return memory


def _warp_specialize(functions_and_args, worker_num_warps, worker_num_regs=None):
    if len(worker_num_warps) != len(functions_and_args) - 1:
        raise ValueError(f"{len(functions_and_args) - 1} worker partitions but {len(worker_num_warps)} warp counts")
    me = _current()
    scheduler = me.scheduler
    children = []
    for k, (fn, args) in enumerate(functions_and_args):
        child = scheduler.spawn(_emulated(fn), tuple(args), me.pid, f"{me.label}, partition {k}")
        child.barriers = getattr(me, "barriers", [])
        children.append(child)
    scheduler.block(lambda: all(c.done for c in children), "its warp_specialize partitions")
    return children[0].result


class _Token:
    """An asynchronous ``warpgroup_mma``'s result, readable after ``warpgroup_mma_wait``."""

    def __init__(self, value, operands):
        self.value, self.operands, self.retired = value, operands, False

    def _read(self, *_):
        raise HazardError("an asynchronous warpgroup_mma's token was read before warpgroup_mma_wait")

    __add__ = __radd__ = __mul__ = __rmul__ = __sub__ = __truediv__ = __getitem__ = _read

    def to(self, *_):
        self._read()


def _snapshot(memory):
    return memory, memory.data.clone()


def _unchanged(snapshots):
    return all(torch.equal(m.data.contiguous().view(torch.uint8), before.contiguous().view(torch.uint8))
               for m, before in snapshots)


def _warpgroup_mma(a, b, acc, *, use_acc=True, precision=None, max_num_imprecise_acc=None, is_async=False):
    if not isinstance(b, SharedMemory):
        raise TypeError("warpgroup_mma's b must be in shared memory")
    if isinstance(acc, _Token):  # a chain of products on one accumulator: the hardware runs them in order
        acc = acc.value
    lhs = a.data if isinstance(a, SharedMemory) else a
    product = lhs.float() @ b.data.float()
    if list(product.shape) != list(acc.shape):
        raise ValueError(f"warpgroup_mma: a @ b is {list(product.shape)}, the accumulator {list(acc.shape)}")
    result = acc + product if use_acc else product
    if not is_async:
        return result
    token = _Token(result, [_snapshot(m) for m in (a, b) if isinstance(m, SharedMemory)])
    _current().wgmma.append(token)
    return token


def _retire_wgmma(thread, num_outstanding):
    while len(thread.wgmma) > num_outstanding:
        token = thread.wgmma.pop(0)
        if not _unchanged(token.operands):
            raise HazardError("a shared-memory operand of an in-flight warpgroup_mma changed before "
                              "warpgroup_mma_wait retired it")
        token.retired = True


def _warpgroup_mma_wait(num_outstanding=0, deps=None):
    if deps is None:
        raise ValueError("warpgroup_mma_wait deps must be given")
    _retire_wgmma(_current(), int(num_outstanding))
    results = []
    for dep in deps:
        if isinstance(dep, _Token):
            if not dep.retired:
                raise HazardError(f"warpgroup_mma_wait({num_outstanding}) returned a product still in flight")
            results.append(dep.value)
        else:
            results.append(dep)
    return results[0] if len(results) == 1 else tuple(results)


def _mbarrier_wait(bar, phase, pred=True, deps=()):
    if not pred:
        return
    bar._check()
    me = _current()
    if not bar.completed(phase) and me.scheduler.copies == "lazy":
        _land(bar)
    if me.scheduler.schedule == "random" or not bar.completed(phase):
        me.scheduler.block(lambda: bar.completed(phase), f"{bar.name} phase {int(phase) & 1}")


def _mbarrier_expect(bar, nbytes, pred=True):
    if pred:
        bar._check()
        bar.tx += int(nbytes)
        bar.arrive(1)


def _mbarrier_arrive(bar, *, count=1, pred=True):
    if pred:
        bar.arrive(count)
        # a switch right after a release, so that a thread that waited for it can run before this one goes on
        # (and, say, overwrite an operand this one still has in flight)
        _current().scheduler.block(lambda: True, "its turn")


def _copy_global_to_shared(desc, coord, bar, result, pred=True, multicast=False):
    if not pred:
        return
    if list(result.shape) != desc.block_shape:
        raise ValueError(f"TMA box {desc.block_shape} into a buffer of {result.shape}")
    bar._check()
    if _current().scheduler.copies == "lazy":
        bar.copies.append((desc, list(coord), result))
    else:
        result.data.copy_(desc.read(coord))
        bar.deliver(desc.nbytes_per_cta)


def _copy_shared_to_global(desc, coord, src):
    if list(src.shape) != desc.block_shape:
        raise ValueError(f"TMA store of a buffer of {src.shape} as a box of {desc.block_shape}")
    _current().stores.append((desc, list(coord), _snapshot(src)))


def _store_wait(pendings):
    me = _current()
    while len(me.stores) > int(pendings):
        desc, coord, (src, before) = me.stores.pop(0)
        if not _unchanged([(src, before)]):
            raise HazardError("the shared-memory source of a TMA store changed before tma.store_wait")
        desc.write(coord, before)


def _static_range(*args):
    return range(*(int(a) for a in args))


def _runtime_range(*args, **_):
    """``range`` in a kernel: a runtime loop, whose counter is an int32 of the kernel."""
    return (I32(i) for i in range(*(int(a) for a in args)))


def _cdiv(a, b):
    return (a + b - 1) // b


def _namespace(name, real, **members):
    """A stand-in for the module ``real``: ``members``, and its layout classes; other names raise."""

    class Namespace(types.SimpleNamespace):
        def __getattr__(self, attr):
            value = getattr(real, attr)
            if isinstance(value, type) or attr == "constexpr":
                return value
            raise NotImplementedError(f"{name}.{attr} is not emulated")

    return Namespace(**members)


_GL = _namespace(
    "gl", _gl,
    bfloat16=torch.bfloat16, float16=torch.float16, float32=torch.float32, float64=torch.float64,
    int8=torch.int8, int16=torch.int16, int32=torch.int32, int64=torch.int64,
    program_id=_program_id, num_programs=_num_programs,
    arange=lambda start, end, layout=None: torch.arange(int(start), int(end), dtype=torch.int32),
    zeros=lambda shape, dtype, layout=None: torch.zeros([int(s) for s in shape], dtype=_torch_dtype(dtype)),
    full=lambda shape, value, dtype, layout=None: torch.full([int(s) for s in shape], value,
                                                             dtype=_torch_dtype(dtype)),
    expand_dims=lambda x, axis: x.unsqueeze(int(axis)),
    convert_layout=lambda x, layout, assert_trivial=False: x,
    where=_where,
    maximum=_binary(max, torch.maximum), minimum=_binary(min, torch.minimum),
    cdiv=_cdiv,
    max=_reduce(lambda x, axis, keep: x.amax() if axis is None else x.amax(int(axis), keepdim=keep)),
    min=_reduce(lambda x, axis, keep: x.amin() if axis is None else x.amin(int(axis), keepdim=keep)),
    sum=_reduce(lambda x, axis, keep: x.sum() if axis is None else x.sum(int(axis), keepdim=keep)),
    exp=torch.exp, exp2=torch.exp2, log=torch.log, log2=torch.log2, sqrt=torch.sqrt,
    static_range=_static_range,
    load=_load, store=_store, atomic_add=_atomic_add,
    allocate_shared_memory=_allocate_shared_memory,
    warp_specialize=_warp_specialize,
)
_MBARRIER = _namespace("mbarrier", _mbarrier, init=lambda bar, count: bar.init(count), wait=_mbarrier_wait,
                       expect=_mbarrier_expect, arrive=_mbarrier_arrive, MBarrierLayout=_mbarrier.MBarrierLayout)
_TMA = _namespace("tma", _tma, async_copy_global_to_shared=_copy_global_to_shared,
                  async_copy_shared_to_global=_copy_shared_to_global, store_wait=_store_wait)
_STAND_INS = {
    id(_gl): _GL, id(_mbarrier): _MBARRIER, id(_tma): _TMA,
    id(_hopper.warpgroup_mma): _warpgroup_mma, id(_hopper.warpgroup_mma_wait): _warpgroup_mma_wait,
    id(_hopper.fence_async_shared): lambda cluster=False: None,
}


# ------------------------------------------------------------------------------------------- functions, launch
_patched_globals: dict[int, tuple[dict, dict]] = {}
_patched_functions: dict[object, types.FunctionType] = {}


def _unwrap(value):
    if isinstance(value, _gl.constexpr):
        return _unwrap(value.value)
    if isinstance(value, _gl.dtype):
        return _torch_dtype(value)
    return value


def _emulated(fn):
    """``fn`` (a Gluon JIT function, or its Python function) with the stand-ins in place of Gluon's builtins."""
    raw = fn.fn if isinstance(fn, JITFunction) else fn
    if raw in _patched_functions:
        return _patched_functions[raw]
    if not isinstance(raw, types.FunctionType):
        raise TypeError(f"cannot emulate {fn!r}")
    key = id(raw.__globals__)
    entry = _patched_globals.get(key)
    scope = entry[1] if entry is not None and entry[0] is raw.__globals__ else None
    if scope is None:
        scope = {}
        _patched_globals[key] = (raw.__globals__, scope)  # holding the module's dict: its id is not reused
        for name, value in raw.__globals__.items():
            if id(value) in _STAND_INS:
                value = _STAND_INS[id(value)]
            scope[name] = _unwrap(value)
        scope["range"] = _runtime_range
    defaults = tuple(_unwrap(d) for d in raw.__defaults__) if raw.__defaults__ else None
    patched = types.FunctionType(raw.__code__, scope, raw.__name__, defaults, raw.__closure__)
    _patched_functions[raw] = patched
    for name, value in list(scope.items()):  # the module's other JIT functions, called from this one
        if isinstance(value, JITFunction) and value.fn.__globals__ is raw.__globals__:
            scope[name] = _emulated(value) if value.fn is not raw else patched
        elif isinstance(value, JITFunction):
            scope[name] = _emulated(value)
    return patched


def _argument(name, value, is_constexpr):
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    if is_constexpr:
        return _unwrap(value)
    if isinstance(value, TensorDescriptor):
        return Descriptor(value)
    if isinstance(value, torch.Tensor):
        if value.device.type != "cpu":
            raise ValueError(f"{name}: the emulator runs on CPU tensors, got one on {value.device}")
        if not value.is_contiguous():
            raise ValueError(f"{name}: a pointer argument must be contiguous")
        return Pointer(value.view(-1), 0, name)
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return I32(value)
    return _unwrap(value)


_options = threading.local()


@contextlib.contextmanager
def options(schedule="first", copies="eager", seed=0, programs_at_once=4):
    """The emulator's settings for every :func:`launch` inside the ``with`` (see :func:`launch`)."""
    previous = getattr(_options, "value", None)
    _options.value = dict(schedule=schedule, copies=copies, seed=seed, programs_at_once=programs_at_once)
    try:
        yield
    finally:
        _options.value = previous


def launch(kernel, grid, *args, schedule=None, copies=None, seed=None, programs_at_once=None, **kwargs):
    """Run ``kernel[grid](*args, **kwargs)`` on the CPU.

    ``schedule``: which runnable thread goes next when one blocks, ``"first"`` (programs and partitions in the
    order they were started: consumers before the loader), ``"last"`` (the loader first) or ``"random"`` (seeded,
    and a switch at every ``mbarrier.wait``); ``copies``: TMA copies land ``"eager"`` (when issued) or ``"lazy"``
    (when a thread waits on their barrier); ``programs_at_once``: how many programs run concurrently (an SM
    each). The defaults come from :func:`options`. Launch options (``num_warps``, ``maxnreg``, ...) are ignored.
    """
    settings = dict(getattr(_options, "value", None) or dict(schedule="first", copies="eager", seed=0,
                                                               programs_at_once=4))
    for key, value in (("schedule", schedule), ("copies", copies), ("seed", seed),
                       ("programs_at_once", programs_at_once)):
        if value is not None:
            settings[key] = value
    if settings["schedule"] not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {settings['schedule']!r}")
    if settings["copies"] not in COPIES:
        raise ValueError(f"copies must be one of {COPIES}, got {settings['copies']!r}")
    if not isinstance(kernel, JITFunction):
        raise TypeError(f"kernel must be a Gluon JIT function, got {type(kernel).__name__}")
    for key in LAUNCH_OPTIONS:
        kwargs.pop(key, None)
    fn = _emulated(kernel)
    bound = inspect.signature(kernel.fn).bind(*args, **kwargs)
    constexprs = {p.name for p in kernel.params if p.is_constexpr}
    values = {name: _argument(name, value, name in constexprs) for name, value in bound.arguments.items()}
    grid = tuple(int(g) for g in (grid if isinstance(grid, (tuple, list)) else (grid,)))
    grid = grid + (1,) * (3 - len(grid))
    scheduler = _Scheduler(settings["schedule"], settings["copies"], settings["seed"])
    scheduler.grid = grid
    pids = [(x, y, z) for z in range(grid[2]) for y in range(grid[1]) for x in range(grid[0])]
    program = functools.partial(fn, **values)
    scheduler.run([(program, (), pid) for pid in pids], int(settings["programs_at_once"]))



def run(kernel, grid, *args, **kwargs):
    """``kernel[grid](*args, **kwargs)``, or :func:`launch` (the emulator) when the first argument, a tensor or a
    tensor descriptor, is on the CPU. One attribute lookup on the GPU path: it is on every call's host time."""
    first = args[0]
    if getattr(first, "base", first).device.type == "cpu":
        return launch(kernel, grid, *args, **kwargs)
    return kernel[grid](*args, **kwargs)
