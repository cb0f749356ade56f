"""What a piece of code would cost a GPU's host, counted: ops dispatched, device kernels launched
and host syncs, by phase.

A step whose kernels are small is host-bound: its time is the host's, per op dispatched and kernel
launched (tens of µs each), and at every sync the host waits until the device has drained its
queue. These counts do not depend on the machine, so CI can hold budgets on them on a CPU, under
the device guard (``runtime.device_guard``: the GPU code path on an emulated ``cuda:0``); on a
real GPU the same counter counts the same code::

    with LaunchCounter() as counter:
        with counter.phase("decode"):  # PhaseTimer phases (runtime.timing) are entered too
            ...
    counter.counts["decode"]   # Counts(ops, kernels, syncs, async_copies, sync_kinds, sync_sites)
    counter.total              # everything counted, in a phase or not
    counter.outside            # what ran in no phase
    counter.sync_sites("decode")  # {kind: the first few lines that made one}
    counter.as_dict()          # all of it, for a JSON file

Counts go to the innermost phase open, or to ``outside``, and to the total.

- ops: every op dispatched (aten and others, after torch has split composite ops into what a
  device runs).
- kernels: those ops that touch a GPU tensor and put work on the device, that is, not views,
  metadata or allocations (``empty*``, ``_unsafe_view``, ``set_``, ``sym_*``, ...) and not the read
  of a value (``_local_scalar_dense``: a sync); a copy is one (a memcpy on the stream), and so is
  the copy that ``torch.tensor(host data, device=gpu)`` makes without dispatching it. Every
  collective is one.
- syncs, where the host waits for the device. Only tensors on the GPU make them (on CUDA
  ``t.is_cuda``, under the guard ``device_guard.on_gpu(t)``), so without CUDA and without the
  guard there are none:
  - ops that read device values on the host: ``_local_scalar_dense`` (``.item()``, ``float``/
    ``int``/``bool`` of a tensor, ``if t``), ``nonzero``, ``masked_select``, ``unique*``,
    ``equal``, ``is_nonzero``, ``allclose``, ``index``/``index_put(_)`` with a bool mask,
    ``repeat_interleave`` with tensor repeats and no ``output_size``, ``linalg_svd``;
  - copies to the host (``.cpu()``, ``.to(host)``, ``.tolist()``, ``.numpy()``, ``copy_``), and
    GPU values read by ``torch.tensor([...])`` (one each);
  - blocking copies to the GPU: ``.to(gpu)``/``.cuda()``/``copy_`` from a host tensor that is not
    pinned or without ``non_blocking``, ``torch.tensor``/``as_tensor`` of host data;
  - ``runtime.device.synchronize`` and ``torch.cuda.synchronize`` (stream and event waits are
    not counted).
  A move made by a function (``.to``, ``.tolist()``, ``torch.tensor``) is counted there once,
  whatever it dispatches (a real GPU dispatches the copy inside ``.tolist()``, the guard none).
- async_copies: non-blocking copies between pinned host memory and the GPU: no wait, counted
  apart.

Overhead: a dispatch mode and a function mode in Python, about 8 µs per op on one CPU core (the
guard itself costs about 16); a sync's place is looked up only while its phase holds fewer than
``SITES_KEPT`` places for its kind.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from ebft_megatron.runtime import backward_modes, device_guard

SITES_KEPT = 3  # places kept per phase and kind of sync
# frames that are not where a sync is made: the counter's own, and the runtime's one way to wait
# and one way to copy a batch (their callers are)
_NOT_CALLERS = (Path(__file__).name, "backward_modes.py", "contextlib.py", "runtime/device.py")


@dataclass
class Counts:
    ops: int = 0
    kernels: int = 0
    syncs: int = 0
    async_copies: int = 0
    sync_kinds: dict[str, int] = field(default_factory=dict)  # kind -> syncs of that kind
    # kind -> the first few places that made one (file:line in function, and the library line beneath)
    sync_sites: dict[str, list[str]] = field(default_factory=dict)
    kernels_by_op: dict[str, int] = field(default_factory=dict)  # aten op -> kernels (when asked for)

    def as_dict(self) -> dict:
        return {"ops": self.ops, "kernels": self.kernels, "syncs": self.syncs, "async_copies": self.async_copies,
                "sync_kinds": dict(self.sync_kinds), "sync_sites": {k: list(v) for k, v in self.sync_sites.items()},
                **({"kernels_by_op": dict(self.kernels_by_op)} if self.kernels_by_op else {})}


_active: "LaunchCounter | None" = None
_thread = threading.local()  # .accounted: a move or wait counted by the function that made it


class LaunchCounter:
    """Counts ops, kernels and syncs while entered (one counter at a time); see the module.

    Entering it puts a dispatch mode and a function mode on top of those active, and carries the
    function mode into custom backwards (``runtime.backward_modes``). Under the device guard the
    guard's modes must be below them (the counter sees calls as the code makes them, before the
    guard rewrites devices): entering the counter enters the guard first when it is asked for."""

    def __init__(self, by_op: bool = False):
        self.by_op = by_op  # also count kernels by aten op (Counts.kernels_by_op), to find where they come from
        self.counts: dict[str, Counts] = {}
        self.total = Counts()
        self.outside = Counts()
        self._open: list[Counts] = []  # the phases entered, the innermost last
        self._modes = ()

    # --- phases ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def phase(self, name: str):
        """Count what runs inside under ``name`` (and not under the phase around it)."""
        if name in ("outside", "total"):
            raise ValueError(f"{name!r} names the counts outside phases or of everything, not a phase")
        self._open.append(self.counts.setdefault(name, Counts()))
        try:
            yield
        finally:
            self._open.pop()

    def sync_sites(self, phase: str | None = None) -> dict[str, list[str]]:
        """The first few places (``file:line in function``: the project's line, and the library
        line beneath it) that made each kind of sync in ``phase`` (None: anywhere)."""
        counts = self.total if phase is None else self.counts.get(phase, Counts())
        return {kind: list(places) for kind, places in counts.sync_sites.items()}

    def as_dict(self) -> dict:
        """The counts by phase, ``outside`` (when anything ran there) and ``total``, for a JSON
        file."""
        outside = {"outside": self.outside} if self.outside.ops or self.outside.syncs else {}
        return {name: counts.as_dict() for name, counts in {**self.counts, **outside, "total": self.total}.items()}

    # --- counting -------------------------------------------------------------------------------
    def _counted_in(self) -> list[Counts]:
        return [self.total, self._open[-1] if self._open else self.outside]

    def _op(self, kernel: bool, func=None) -> None:
        for counts in self._counted_in():
            counts.ops += 1
            counts.kernels += kernel
            if kernel and self.by_op:
                name = str(func.overloadpacket)
                counts.kernels_by_op[name] = counts.kernels_by_op.get(name, 0) + 1

    def _hidden_copy(self) -> None:  # a copy torch makes without dispatching it
        for counts in self._counted_in():
            counts.kernels += 1

    def _async_copy(self) -> None:
        for counts in self._counted_in():
            counts.async_copies += 1

    def _sync(self, kind: str, times: int = 1) -> None:
        place = None
        for counts in self._counted_in():
            counts.syncs += times
            counts.sync_kinds[kind] = counts.sync_kinds.get(kind, 0) + times
            places = counts.sync_sites.setdefault(kind, [])
            if len(places) < SITES_KEPT:  # the frames are walked only while a phase lacks places
                place = place or device_guard.call_site(_NOT_CALLERS)
                if place not in places:
                    places.append(place)

    # --- entering -------------------------------------------------------------------------------
    def __enter__(self) -> "LaunchCounter":
        global _active
        if _active is not None:
            raise RuntimeError("a LaunchCounter is counting already (one at a time)")
        if device_guard.active():
            device_guard.enter()  # below the counter's modes: they see calls as the code makes them
        emulated = device_guard.active()
        self._on_gpu = device_guard.on_gpu if emulated else _is_cuda
        self._pinned = device_guard.pinned if emulated else _is_pinned
        self._modes = (_CountedOps(self), _CountedMoves(self))
        for mode in self._modes:
            mode.__enter__()
        backward_modes.carry(self._moves_mode)
        self._synchronize = torch.cuda.synchronize
        torch.cuda.synchronize = _counted_synchronize(self._synchronize)
        _active = self
        return self

    def __exit__(self, *exc) -> None:
        global _active
        _active = None
        if getattr(torch.cuda.synchronize, "__wrapped__", None) is self._synchronize:
            torch.cuda.synchronize = self._synchronize  # (unless something has replaced it since)
        backward_modes.drop(self._moves_mode)
        for mode in reversed(self._modes):
            mode.__exit__(None, None, None)

    def _moves_mode(self) -> "_CountedMoves":
        return _CountedMoves(self)


def _is_cuda(tensor) -> bool:
    return isinstance(tensor, torch.Tensor) and tensor.is_cuda


def _is_pinned(tensor) -> bool:
    return isinstance(tensor, torch.Tensor) and not tensor.is_cuda and tensor.is_pinned()


def phase(name: str):
    """The active counter's phase ``name`` (for ``PhaseTimer``), or nothing when none counts."""
    return _active.phase(name) if _active is not None else contextlib.nullcontext()


@contextlib.contextmanager
def _accounted(kind: str | None = None, times: int = 1):
    """Count ``times`` syncs of ``kind`` (if any) once for what runs inside: a move or wait that
    copies or waits again further down (a real GPU's ``.tolist()`` dispatches its copy) is not
    counted twice."""
    if _active is None or getattr(_thread, "accounted", False):
        yield
        return
    if kind is not None and times:
        _active._sync(kind, times)
    _thread.accounted = True
    try:
        yield
    finally:
        _thread.accounted = False


def host_wait(kind: str):
    """Count one sync of ``kind`` for a wait on the device made inside (``device.synchronize``)."""
    return _accounted(kind)


def _counted_synchronize(synchronize):
    def counted(*args, **kwargs):
        with host_wait("synchronize"):
            return synchronize(*args, **kwargs)

    counted.__wrapped__ = synchronize
    return counted


# --- ops: what is a kernel, what syncs --------------------------------------------------------
_aten = torch.ops.aten
# allocations, metadata and views the schema does not call views: no work on the device
_NO_KERNEL = {_aten.empty, _aten.empty_like, _aten.empty_strided, _aten.empty_permuted, _aten.new_empty,
              _aten.new_empty_strided, _aten._unsafe_view, _aten.resize_, _aten.resize_as_, _aten.set_,
              _aten.sym_size, _aten.sym_stride, _aten.sym_numel, _aten.sym_storage_offset, _aten.record_stream,
              _aten._has_compatible_shallow_copy_type, _aten.is_same_size, _aten.is_pinned,
              _aten._local_scalar_dense}
_COLLECTIVE_NAMESPACES = {"c10d", "_c10d_functional", "c10d_functional"}
_NO_KERNEL_NAMESPACES = {"profiler"}


def _bool_mask_index(args, kwargs) -> bool:
    indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


def _no_output_size(args, kwargs) -> bool:
    return kwargs.get("output_size") is None


# op -> (kind of sync, and when it syncs beyond touching a GPU tensor)
_SYNCS = {_aten._local_scalar_dense: ("item", None), _aten.nonzero: ("nonzero", None),
          _aten.masked_select: ("masked_select", None), _aten._unique: ("unique", None),
          _aten._unique2: ("unique", None), _aten.unique_dim: ("unique", None),
          _aten.unique_consecutive: ("unique", None), _aten.unique_dim_consecutive: ("unique", None),
          _aten.equal: ("equal", None), _aten.is_nonzero: ("is_nonzero", None), _aten.allclose: ("allclose", None),
          _aten._linalg_svd: ("linalg_svd", None), _aten.linalg_svd: ("linalg_svd", None),
          _aten.index: ("bool mask index", _bool_mask_index), _aten.index_put: ("bool mask index", _bool_mask_index),
          _aten.index_put_: ("bool mask index", _bool_mask_index),
          _aten._index_put_impl_: ("bool mask index", _bool_mask_index),
          _aten.repeat_interleave: ("repeat_interleave", _no_output_size)}
_COPIES = {_aten.copy_, _aten._to_copy}


@dataclass(frozen=True)
class _Rule:
    kernel: bool  # when it touches a GPU tensor
    collective: bool = False
    sync: tuple | None = None  # (kind, condition or None)
    copy: bool = False


def _is_view(func) -> bool:
    returns = func._schema.returns
    return torch.Tag.inplace_view in func.tags or any(
        r.alias_info is not None and not r.alias_info.is_write for r in returns)


def _rule_of(func) -> _Rule:
    packet = getattr(func, "overloadpacket", None)
    if func.namespace in _COLLECTIVE_NAMESPACES:
        return _Rule(kernel=True, collective=True)
    kernel = func.namespace not in _NO_KERNEL_NAMESPACES and packet not in _NO_KERNEL and not _is_view(func)
    return _Rule(kernel=kernel, sync=_SYNCS.get(packet), copy=packet in _COPIES)


_RULES: dict = {}


class _CountedOps(TorchDispatchMode):
    def __init__(self, counter: LaunchCounter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        rule = _RULES.get(func)
        if rule is None:
            rule = _RULES[func] = _rule_of(func)
        counter, on_gpu = self.counter, self.counter._on_gpu
        if not (rule.kernel or rule.sync):  # a view, allocation or metadata: no device work to look for
            counter._op(False)
            return result
        gpu_inputs = any(on_gpu(t) for t in device_guard.tensors_in((*args, *kwargs.values())))
        if rule.collective:
            counter._op(True, func)
        elif rule.kernel:  # an op on host tensors launches nothing; a factory's output tells
            outputs = result if isinstance(result, (list, tuple)) else (result,)
            counter._op(gpu_inputs or any(on_gpu(t) for t in device_guard.tensors_in(outputs)), func)
        else:
            counter._op(False)
        if getattr(_thread, "accounted", False):
            return result
        if rule.sync is not None and gpu_inputs:
            kind, condition = rule.sync
            if condition is None or condition(args, kwargs):
                counter._sync(kind)
        elif rule.copy:
            self._copy(func, args, kwargs, result)
        return result

    def _copy(self, func, args, kwargs, result) -> None:
        """A copy dispatched by no counted function (``copy_``, or torch's own ``_to_copy``)."""
        counter = self.counter
        if func.overloadpacket is _aten.copy_:
            target, source = args[0], args[1]
            to_gpu, from_gpu = counter._on_gpu(target), counter._on_gpu(source)
            host = target if from_gpu else source
            non_blocking = kwargs.get("non_blocking", args[2] if len(args) > 2 else False)
        else:
            source = args[0]
            from_gpu = counter._on_gpu(source)
            device = kwargs.get("device")
            to_gpu = from_gpu if device is None else torch.device(device).type == "cuda"
            # torch's composite ops (a CPU build's RMSNorm, say) cast with .to(dtype, device=<the
            # tensor's own device>), which under the device guard names the host the data is on;
            # the guard keeps such a result on the GPU, and so would CUDA: no move
            to_gpu = to_gpu or (from_gpu and counter._on_gpu(result))
            host = None if from_gpu else source  # to the host non-blocking, torch pins the target
            non_blocking = kwargs.get("non_blocking", False)
        if to_gpu != from_gpu:
            _count_move(counter, from_gpu, non_blocking and (host is None or counter._pinned(host)))


def _count_move(counter: LaunchCounter, from_gpu: bool, asynchronous: bool) -> None:
    if asynchronous:
        counter._async_copy()
    else:
        counter._sync("device-to-host copy" if from_gpu else "host-to-device copy")


# --- functions: moves that dispatch what a GPU would not, or nothing ---------------------------
def _place(value) -> bool | None:
    """Whether a ``.to()`` argument names the GPU (True), the host (False), or no device (None)."""
    if isinstance(value, torch.Tensor):
        return value.is_cuda
    if isinstance(value, (str, torch.device)):
        return torch.device(value).type == "cuda"
    if isinstance(value, int) and not isinstance(value, bool):
        return True  # a CUDA device's index
    return None


def _non_blocking(args, kwargs) -> bool:
    """``non_blocking`` by name, or the first bool given by position (so in every signature)."""
    return bool(kwargs.get("non_blocking", next((a for a in args if isinstance(a, bool)), False)))


def _moved(counter, func, args, kwargs):
    tensor = args[0]
    if func is torch.Tensor.cuda:
        to_gpu = True
    elif func is torch.Tensor.cpu:
        to_gpu = False
    else:
        to_gpu = _place(kwargs.get("device")) if kwargs.get("device") is not None else \
            next((p for p in map(_place, args[1:2]) if p is not None), None)
    from_gpu = tensor.is_cuda
    if to_gpu is None or to_gpu == from_gpu:
        # no move: what it dispatches (a dtype change; under the guard a ``_to_copy`` the guard
        # points at the host, where its data lives) is not one
        with _accounted():
            return func(*args, **kwargs)
    non_blocking = _non_blocking(args[1:], kwargs)
    if not getattr(_thread, "accounted", False):
        _count_move(counter, from_gpu, non_blocking and (from_gpu or counter._pinned(tensor)))
    with _accounted():
        return func(*args, **kwargs)


def _read(counter, func, args, kwargs):
    if not args[0].is_cuda:
        return func(*args, **kwargs)
    with _accounted(func.__name__):
        return func(*args, **kwargs)


def _gpu_values(data) -> int:
    """How many GPU tensors a (nested) list holds, judged by its first element: a list of numbers
    is not walked through."""
    if not isinstance(data, (list, tuple)) or not data:
        return 0
    first = data[0]
    while isinstance(first, (list, tuple)) and first:
        first = first[0]
    if not isinstance(first, torch.Tensor):
        return 0
    return sum(_gpu_values(item) if isinstance(item, (list, tuple)) else int(_is_cuda(item)) for item in data)


def _from_data(counter, func, args, kwargs):
    """``torch.tensor``/``as_tensor``/``asarray``/``Tensor.new_tensor``: torch copies host data to
    the GPU, and reads GPU values in a list, without dispatching either."""
    if getattr(_thread, "accounted", False):
        return func(*args, **kwargs)
    new_tensor = func is torch.Tensor.new_tensor
    data = args[1] if new_tensor else (args[0] if args else kwargs.get("data", kwargs.get("obj")))
    device = kwargs.get("device")
    to_gpu = _place(device) if device is not None else (new_tensor and args[0].is_cuda)
    if isinstance(data, torch.Tensor):  # moved by a dispatched copy, if at all
        if to_gpu != data.is_cuda and device is not None:
            _count_move(counter, data.is_cuda, False)
    else:
        reads = _gpu_values(data)
        if reads:
            counter._sync("GPU values read by torch.tensor", reads)
        if to_gpu:
            counter._hidden_copy()
            counter._sync("host-to-device copy")
    with _accounted():
        return func(*args, **kwargs)


_FUNCTIONS = {torch.Tensor.to: _moved, torch.Tensor.cuda: _moved, torch.Tensor.cpu: _moved,
              torch.Tensor.tolist: _read, torch.Tensor.numpy: _read,
              torch.tensor: _from_data, torch.as_tensor: _from_data, torch.asarray: _from_data,
              torch.Tensor.new_tensor: _from_data}


class _CountedMoves(TorchFunctionMode):
    def __init__(self, counter: LaunchCounter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handle = _FUNCTIONS.get(func)
        if handle is None:
            return func(*args, **kwargs)
        return handle(self.counter, func, args, kwargs)
