"""The run's device, decided once and asked for everywhere else.

:func:`decide` runs in ``runtime.distributed.initialize``, before any model or tensor of the run is
made: ``cuda:LOCAL_RANK`` (made the current CUDA device) when CUDA is available, else the CPU. Under
the device guard (``runtime.device_guard``, CPU only) it is an emulated ``cuda:0``, so that CPU CI
runs every path as it runs on a GPU.

Everything else asks :func:`current`:
- models are moved there once, when built (:func:`move_model`, as Megatron-LM's ``get_model`` does);
- batches cross from the host at one boundary (:func:`to_device`: pinned memory, non-blocking);
- every tensor the runtime creates names this device, or takes it from an input it belongs with.

What stays on the host is a decision written where it is made: the rollout sampler's generator
(one seed draws the same numbers on every device), data indices, and what is written to files.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from ebft_megatron.runtime import device_guard, launch_count

_DEVICE: torch.device | None = None


def decide() -> torch.device:
    """Decide the run's device (idempotent): ``cuda:LOCAL_RANK`` under CUDA, the guard's emulated
    GPU on a CPU under the device guard, else the CPU."""
    global _DEVICE
    if _DEVICE is None:
        if torch.cuda.is_available():
            _DEVICE = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(_DEVICE)
        elif device_guard.active():
            _DEVICE = device_guard.EMULATED_GPU
        else:
            _DEVICE = torch.device("cpu")
    return _DEVICE


def current() -> torch.device:
    """The run's device (decided on first use when nothing has decided it yet)."""
    return _DEVICE if _DEVICE is not None else decide()


def real_cuda(where: torch.device | None = None) -> bool:
    """Whether ``where`` (default: the run's device) is a CUDA device whose data is on a GPU: what
    CUDA-only machinery (its kernels, events, graphs) needs. The device guard's emulated GPU says
    ``cuda`` but holds host data."""
    return (where or current()).type == "cuda" and torch.cuda.is_available()


def synchronize() -> None:
    """Wait for the device's queued work (CUDA runs kernels after the host returns): before a
    clock is read for a phase or a step."""
    if current().type != "cuda":
        return
    with launch_count.host_wait("synchronize"):  # the guard's emulated GPU would wait here too
        if torch.cuda.is_available():
            torch.cuda.synchronize(current())


def move_model(model):
    """Move a freshly built model (its parameters and buffers) to the run's device, once."""
    return model.to(current())


def to_device(value, non_blocking: bool = True):
    """Move a batch (a tensor, or a dataclass, dict, list or tuple of them) from the host to the
    run's device: the one boundary batches cross. On CUDA the copy is from pinned memory and does
    not block the host."""
    device = current()
    if isinstance(value, torch.Tensor):
        if value.device == device:
            return value
        if device.type == "cuda" and value.device.type == "cpu":
            value = value.pin_memory()  # under the device guard: marked pinned, not copied
        return value.to(device, non_blocking=non_blocking)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{field.name: to_device(getattr(value, field.name), non_blocking)
                                             for field in dataclasses.fields(value) if field.init})
    if isinstance(value, dict):
        return {key: to_device(item, non_blocking) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(item, non_blocking) for item in value)
    return value
