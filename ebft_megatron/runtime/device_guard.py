"""The device guard: CUDA's device rules, enforced on a CPU-only machine.

On a CPU every tensor lives on the one device, so code that a GPU would refuse (a model never
moved to the GPU, a batch never copied there, a tensor made without its device, a collective on a
host tensor) runs there without complaint. With ``EBFT_DEVICE_GUARD=1`` on a machine without CUDA,
the run's device (``runtime.device``) becomes an emulated ``cuda:0`` and the guard tracks which
tensors would live on it:

- *on the GPU*: what is made with a CUDA device (``device="cuda"``, megatron's
  ``torch.cuda.current_device()``, ``device=x.device`` of such a tensor), what ``.cuda()`` and
  ``.to(<cuda>)`` return, and what an op computes from such tensors; views share their base's
  place. These tensors report ``device == cuda:0`` and ``is_cuda``.
- *on the host*: everything else, and what ``.cpu()`` / ``.to("cpu")`` return; what
  ``.pin_memory()`` returns (the tensor itself: pinning needs a CUDA build) is *pinned*
  (``is_pinned()``), so that a copy from it counts as CUDA's asynchronous one
  (``runtime.launch_count``).

and fails, with a :class:`DeviceRuleViolation` naming the op and the line that called it, wherever
CUDA would:
- an op that mixes GPU and host tensors (a 0-dim host tensor is a scalar and allowed, as on CUDA;
  copies between the two, and host index tensors into a GPU tensor, are allowed);
- a random op with a host ``torch.Generator`` that makes or reads GPU tensors;
- ``.numpy()`` of a GPU tensor;
- a collective on a host tensor (NCCL's rule), except the object collectives (torch moves their
  bytes to the GPU itself) and collectives on groups created with ``backend="gloo"``.

Tracking is by storage (the data itself), so views, ``param.data = x`` and in-place updates keep
their place; a weak set forgets storages as they are freed. The data stays on the CPU and every
value is exact, so whole training steps run under the guard. It is a check for CI: a no-op where
CUDA exists, off unless the variable is set.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import sys
import threading
import weakref
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from ebft_megatron.runtime import backward_modes

ENV = "EBFT_DEVICE_GUARD"
EMULATED_GPU = torch.device("cuda", 0)
_HOST = torch.device("cpu")


def active() -> bool:
    """Whether the guard is asked for (``EBFT_DEVICE_GUARD=1``) and can run (no CUDA)."""
    return os.environ.get(ENV, "") not in ("", "0") and not torch.cuda.is_available()


class DeviceRuleViolation(RuntimeError):
    """What a GPU would have refused, found on a CPU."""


_gpu_storages: "weakref.WeakSet[torch.UntypedStorage]" = weakref.WeakSet()
_pinned_storages: "weakref.WeakSet[torch.UntypedStorage]" = weakref.WeakSet()
_state = threading.local()  # .target: force outputs onto the GPU (True) or host (False); .exempt


def on_gpu(tensor) -> bool:
    """Whether ``tensor`` would live on the GPU."""
    # plain tensors and parameters only: subclasses with a dispatch of their own (torch's
    # ShardedTensor in checkpoints) hold plain tensors, which are tracked
    if not isinstance(tensor, torch.Tensor) or not (type(tensor) is torch.Tensor or isinstance(tensor, torch.nn.Parameter)):
        return False
    if tensor.is_meta:
        return False
    try:
        return tensor.untyped_storage() in _gpu_storages
    except (RuntimeError, NotImplementedError):  # no storage (e.g. a sparse or nested tensor)
        return False


def pinned(tensor) -> bool:
    """Whether ``tensor`` would be in pinned host memory (it went through ``pin_memory()``)."""
    if not isinstance(tensor, torch.Tensor) or tensor.is_meta or on_gpu(tensor):
        return False
    try:
        return tensor.untyped_storage() in _pinned_storages
    except (RuntimeError, NotImplementedError):
        return False


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)  # an index is a CUDA device


def _is_device(value) -> bool:
    return isinstance(value, (torch.device, str)) or (isinstance(value, int) and not isinstance(value, bool))


def cuda_type_name(name: str) -> str:
    """``Tensor.type()`` as CUDA says it (megatron's optimizer and gradient clipping branch on
    ``torch.cuda.*Tensor``)."""
    if name.startswith("torch.") and not name.startswith("torch.cuda."):
        return "torch.cuda." + name[len("torch."):]
    return name


_ROOT = str(Path(__file__).resolve().parents[2])


def call_site(skipping: tuple[str, ...] = ()) -> str:
    """The innermost line of this project's code that led here, and the library line beneath it.
    Frames in torch, in this module and in files whose names end with one of ``skipping`` (the
    runtime's other modules that stand between a caller and torch) are not callers."""
    frame = sys._getframe(1)
    skipped = ("device_guard.py", *skipping)
    innermost = None
    while frame is not None:
        path = frame.f_code.co_filename
        if "/torch/" not in path and not path.endswith(skipped):
            place = f"{os.path.relpath(path, _ROOT) if path.startswith(_ROOT) else path}:{frame.f_lineno} " \
                    f"in {frame.f_code.co_name}"
            if path.startswith(_ROOT) and "site-packages" not in path:
                return place if innermost is None else f"{place} (in {innermost})"
            innermost = innermost or place
        frame = frame.f_back
    return innermost or "an unknown place"


def _violation(what: str) -> DeviceRuleViolation:
    return DeviceRuleViolation(f"device guard: {what}, at {call_site()} (a GPU run fails here)")


@contextlib.contextmanager
def _within(name: str, value):
    """Set the thread's ``name`` state for the block: ``target`` (outputs go to the GPU, True, or the
    host, False, whatever the inputs) or ``exempt`` (collectives may take host tensors: object
    collectives, gloo groups)."""
    saved = getattr(_state, name, None)
    setattr(_state, name, value)
    try:
        yield
    finally:
        setattr(_state, name, saved)


# --- what Python code sees: devices, moves, factories ---------------------------------------
# a property's getter reaches the mode as a fresh method-wrapper each time: compare its owner
_DEVICE_PROPERTY = torch.Tensor.device
_IS_CUDA_PROPERTY = torch.Tensor.is_cuda


def _moved(func, tensor, gpu: bool, args, kwargs):
    """``tensor.to(...)``/``.cuda()``/``.cpu()`` towards ``gpu``, or a factory (``tensor`` None)
    making a tensor there: a new tensor there, as on CUDA (or the tensor itself when it is there
    already)."""
    with _within("target", gpu):
        if func is None:
            result = tensor
        else:
            result = func(*args, **kwargs) if tensor is None else func(tensor, *args, **kwargs)
        if isinstance(result, torch.Tensor) and on_gpu(result) != gpu:
            if gpu and _copied_from_host_data(func, tensor, args):
                # CUDA copies the data there without dispatching a copy: neither does the guard
                _gpu_storages.add(result.untyped_storage())
            else:
                result = result.clone()
    return result


def _copied_from_host_data(func, tensor, args) -> bool:
    """Whether a factory made its tensor by copying data that is no tensor: ``torch.tensor``
    always copies, ``as_tensor``/``asarray`` copy Python lists and numbers (they may share a
    numpy array's memory)."""
    if tensor is not None or not args or isinstance(args[0], torch.Tensor):
        return False
    return func is torch.tensor or isinstance(args[0], (list, tuple, int, float, bool, complex))


class _GuardMode(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        owner = getattr(func, "__self__", None)
        if owner is _DEVICE_PROPERTY:
            return EMULATED_GPU if on_gpu(args[0]) else _HOST
        if owner is _IS_CUDA_PROPERTY:
            return on_gpu(args[0])
        if func is torch.Tensor.get_device:
            return 0 if on_gpu(args[0]) else -1
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return cuda_type_name(name) if on_gpu(args[0]) else name
        if func is torch.Tensor.cuda:
            return _moved(None, args[0], True, (), {})
        if func is torch.Tensor.cpu:
            return _moved(None, args[0], False, (), {})
        if func is torch.Tensor.numpy and on_gpu(args[0]):
            raise _violation("numpy() of a GPU tensor (move it to the host with .cpu() first)")
        if func is torch.Tensor.pin_memory:
            if on_gpu(args[0]):
                raise _violation("pin_memory() of a GPU tensor")
            _pinned_storages.add(args[0].untyped_storage())
            return args[0]  # host memory; pinning needs a CUDA build
        if func is torch.Tensor.is_pinned:
            return pinned(args[0])
        if func is torch.Tensor.to:
            return self._to(func, args, kwargs)
        if "device" in kwargs and kwargs["device"] is not None:
            gpu = _is_cuda_device(kwargs["device"])
            kwargs["device"] = "cpu"
            return _moved(func, None, gpu, args, kwargs)
        return func(*args, **kwargs)

    @staticmethod
    def _to(func, args, kwargs):
        tensor, rest = args[0], list(args[1:])
        target = None
        if "device" in kwargs and kwargs["device"] is not None:
            target = _is_cuda_device(kwargs["device"])
            kwargs["device"] = "cpu"
        elif rest and isinstance(rest[0], torch.Tensor):  # .to(other): other's device and dtype
            target = on_gpu(rest[0])
            rest = [rest[0].dtype, *rest[1:]]
        elif rest and _is_device(rest[0]) and not isinstance(rest[0], torch.dtype):
            target = _is_cuda_device(rest[0])
            rest[0] = "cpu"
        if target is None or target == on_gpu(tensor):
            return func(tensor, *rest, **kwargs)
        kwargs.pop("non_blocking", None)  # a copy either way
        return _moved(func, tensor, target, rest, kwargs)


# --- what every op does: the rules ------------------------------------------------------------
_aten = torch.ops.aten
# ops that may take GPU and host tensors together on CUDA: copies across devices, and indexing a
# GPU tensor with host indices (the values must still be on the GPU, checked below)
_COPIES = {_aten.copy_.default, _aten._to_copy.default, _aten._has_compatible_shallow_copy_type.default,
           _aten.lift_fresh.default, _aten.lift_fresh_copy.default}
_INDEXING = {_aten.index.Tensor, _aten.index_put_.default, _aten.index_put.default, _aten._index_put_impl_.default}


def tensors_in(values):
    """The tensors among ``values`` and inside the lists and tuples among them (an op's arguments)."""
    for value in values:
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (list, tuple)):
            yield from (item for item in value if isinstance(item, torch.Tensor))


def _has_generator(args, kwargs) -> bool:
    return isinstance(kwargs.get("generator"), torch.Generator) or any(isinstance(a, torch.Generator) for a in args)


def _storages(tensors) -> list:
    return [t.untyped_storage() for t in tensors if not t.is_meta]


class _RuleMode(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = list(tensors_in((*args, *kwargs.values())))
        if func.namespace == "c10d":
            if not getattr(_state, "exempt", False) and not all(on_gpu(t) for t in inputs):
                raise _violation(f"collective {func.__name__} on a host tensor (NCCL takes GPU tensors only)")
            return func(*args, **kwargs)
        checked = inputs
        if func in _INDEXING:  # host index tensors are fine; self and the values must agree
            indices = list(tensors_in(args[1:2]))
            if not on_gpu(args[0]) and any(on_gpu(t) for t in indices):
                raise _violation(f"{func} indexes a host tensor with GPU indices")
            checked = [args[0], *tensors_in(args[2:3])]
        gpu_inputs = any(on_gpu(t) for t in checked)
        target = getattr(_state, "target", None)
        if gpu_inputs and func not in _COPIES:
            # empty ones hold nothing to move: autograd makes the gradient of an output that got
            # none (an expert that received no tokens) from the tensor's metadata, which under
            # emulation names the host, where CUDA would name the GPU
            host = [tuple(t.shape) for t in checked if not on_gpu(t) and t.dim() > 0 and t.numel() > 0]
            if host:
                raise _violation(f"{func} mixes GPU tensors with host tensors of shape {', '.join(map(str, host))}")
        if _has_generator(args, kwargs) and (gpu_inputs or target):
            raise _violation(f"{func} draws GPU numbers from a host torch.Generator")
        result = func(*args, **kwargs)
        gpu = target if target is not None else gpu_inputs
        if gpu:  # new storages only: views and in-place results keep their storage's place
            known = _storages(inputs)
            for tensor in tensors_in(result if isinstance(result, (list, tuple)) else (result,)):
                storage = None if tensor.is_meta else tensor.untyped_storage()
                if storage is not None and not any(storage is seen for seen in known):
                    _gpu_storages.add(storage)
        return result


# --- collectives that may see host tensors ------------------------------------------------------
_gloo_groups: set[int] = set()
_OBJECT_COLLECTIVES = ("broadcast_object_list", "all_gather_object", "gather_object", "scatter_object_list",
                       "send_object_list", "recv_object_list", "barrier", "monitored_barrier")
# (point-to-point sends are left unwrapped: P2POp checks its op is torch's isend/irecv itself; the
# pipeline's sends run on NCCL groups anyway)
_TENSOR_COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
                       "reduce", "gather", "scatter", "all_to_all_single", "reduce_scatter", "all_to_all",
                       "_all_gather_base", "_reduce_scatter_base")


def _exempt_always(function):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with _within("exempt", True):
            return function(*args, **kwargs)

    return wrapper


def _exempt_on_gloo(function):
    signature = inspect.signature(function)

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        group = signature.bind_partial(*args, **kwargs).arguments.get("group")
        if group is not None and id(group) in _gloo_groups:
            with _within("exempt", True):
                return function(*args, **kwargs)
        return function(*args, **kwargs)

    return wrapper


def _recording_gloo_groups(function):
    signature = inspect.signature(function)

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        group = function(*args, **kwargs)
        if signature.bind_partial(*args, **kwargs).arguments.get("backend") == "gloo" and group is not None:
            _gloo_groups.add(id(group))
        return group

    return wrapper


_ENTERED = False


def enter() -> None:
    """Start guarding this process (once); the caller has checked :func:`active`."""
    global _ENTERED
    if _ENTERED:
        return
    _ENTERED = True
    for name in _OBJECT_COLLECTIVES:
        if hasattr(dist, name):
            setattr(dist, name, _exempt_always(getattr(dist, name)))
    for name in _TENSOR_COLLECTIVES:
        if hasattr(dist, name):
            setattr(dist, name, _exempt_on_gloo(getattr(dist, name)))
    dist.new_group = _recording_gloo_groups(dist.new_group)
    torch.cuda.current_device = lambda: EMULATED_GPU.index
    backward_modes.carry(_GuardMode)  # custom backwards (ours, megatron's recompute) make tensors, ask devices
    _RuleMode().__enter__()
    _GuardMode().__enter__()
