"""torch.distributed + megatron parallel state from torchrun's environment, and seeding.

One entry, :func:`initialize`, used by every command-line tool and test:
- reads RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT (torchrun), or runs as a single
  process when they are absent (plain ``python``, pytest);
- the run's device, decided once (``runtime.device``), and gloo on CPU, nccl on GPU;
- megatron's tensor/pipeline/data parallel groups;
- every RNG seeded (python, numpy, torch, and megatron's model-parallel tracker).
"""

from __future__ import annotations

import datetime
import os
import random
import socket
import sys
from dataclasses import dataclass

import numpy as np
import torch

from ebft_megatron.errors import UserError
from ebft_megatron.runtime import cpu_fallbacks, device, multi_tensor, watchdog


class ParallelLayoutError(UserError, ValueError):
    """The requested TP/PP does not fit the number of processes or the model."""


@dataclass(frozen=True)
class ParallelInfo:
    rank: int
    world_size: int
    tp_size: int
    pp_size: int
    dp_size: int
    tp_rank: int
    pp_rank: int
    dp_rank: int

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# The collectives wait this much longer than the stall watchdog (``runtime.watchdog``), so that
# it is the watchdog, which names the rank and phase, that reports a stalled rank.
COLLECTIVE_GRACE_MINUTES = 1.0


def _launcher_store(timeout: datetime.timedelta):
    """The key-value store the processes meet in, fresh for each of torchrun's restarts.

    torchrun's agent keeps one store for the whole job, and the processes of a restarted attempt
    would find the addresses the dead attempt left there (a restarted rank then connects to a
    port nobody listens on any more). Keys are therefore kept under the attempt's number.
    """
    import torch.distributed as dist

    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":  # the agent serves the store
        store = dist.TCPStore(host, port, is_master=False, timeout=timeout)
    else:  # rank 0 serves it (as env:// would)
        store = dist.TCPStore(host, port, int(os.environ["WORLD_SIZE"]), os.environ["RANK"] == "0", timeout=timeout,
                              multi_tenant=True)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"ebft_megatron/attempt_{attempt}", store)


def _job_store(timeout: datetime.timedelta):
    """The job's key-value store: the process group's once it exists, else torchrun's; None when
    there is none to reach."""
    store = watchdog.default_store()  # the process group's
    if store is not None:
        return store
    if "MASTER_ADDR" not in os.environ or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None  # before initialisation only torchrun's agent serves a store
    try:
        return _launcher_store(timeout)
    except Exception:  # noqa: BLE001 (no store: the caller falls back to printing)
        return None


def print_once_per_job(line: str, wait_seconds: float = 30.0) -> None:
    """Print ``line`` (a user error) on stderr once for the whole job, from whichever rank gets here
    first; the others wait until it is printed before they return (and exit).

    Whichever rank fails first ends the job: torchrun stops the other ranks as soon as one exits,
    so a line left to rank 0 alone is lost when another rank gets there first, and a line from
    every rank is one line per rank. With no store to agree through, every rank prints."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        print(line, file=sys.stderr, flush=True)
        return
    store = _job_store(datetime.timedelta(seconds=wait_seconds))
    if store is None:
        print(line, file=sys.stderr, flush=True)
        return
    try:
        first = store.add("user_error/count", 1) == 1
        if first:
            print(line, file=sys.stderr, flush=True)
            store.set("user_error/printed", "1")
        else:
            store.wait(["user_error/printed"], datetime.timedelta(seconds=wait_seconds))
    except Exception:  # noqa: BLE001 (the store went away: say it here rather than not at all)
        print(line, file=sys.stderr, flush=True)


def initialize(tp: int = 1, pp: int = 1, seed: int = 1234, timeout_minutes: float = 20.0, ep: int = 1) -> ParallelInfo:
    """Set up torch.distributed and megatron's parallel groups; seed every RNG. Every process group
    times out its collectives ``timeout_minutes`` (+ a grace minute) after they start. ``ep``
    splits a mixture of experts' experts over that many ranks; each expert is split over the TP
    ranks as a dense MLP is, so tp * ep * pp must divide the world too.

    Idempotent for the same layout within a process (tests call it repeatedly).
    """
    cpu_fallbacks.apply()
    multi_tensor.apply()
    device.decide()  # before any collective: NCCL binds each rank to its current CUDA device
    import torch.distributed as dist
    from megatron.core import parallel_state

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        timeout = datetime.timedelta(minutes=timeout_minutes + COLLECTIVE_GRACE_MINUTES)
        if "RANK" in os.environ:  # launched by torchrun
            dist.init_process_group(backend=backend, timeout=timeout, store=_launcher_store(timeout),
                                    rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
        else:
            # Single process (python script or pytest): a private rendezvous on loopback. The
            # environment is left alone so that child processes do not inherit a taken port.
            dist.init_process_group(
                backend=backend, timeout=timeout, init_method=f"tcp://127.0.0.1:{_free_port()}",
                rank=0, world_size=1,
            )

    world = dist.get_world_size()
    if tp < 1 or pp < 1 or world % (tp * pp) != 0:
        raise ParallelLayoutError(
            f"tensor parallel size {tp} x pipeline parallel size {pp} must divide the number of "
            f"processes ({world}); launch with torchrun --nproc_per_node=<a multiple of {tp * pp}>"
        )
    if ep < 1 or world % (tp * ep * pp) != 0:
        raise ParallelLayoutError(
            f"tensor parallel size {tp} x expert parallel size {ep} x pipeline parallel size {pp} must divide the "
            f"number of processes ({world}); launch with torchrun --nproc_per_node=<a multiple of {tp * ep * pp}>"
        )

    if parallel_state.model_parallel_is_initialized():
        same = (
            parallel_state.get_tensor_model_parallel_world_size() == tp
            and parallel_state.get_pipeline_model_parallel_world_size() == pp
            and parallel_state.get_expert_model_parallel_world_size() == ep
        )
        if not same:
            parallel_state.destroy_model_parallel()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            expert_model_parallel_size=ep,
            distributed_timeout_minutes=timeout_minutes + COLLECTIVE_GRACE_MINUTES,
        )
    info = parallel_info()
    seed_everything(seed, info)
    return info


def parallel_info() -> ParallelInfo:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    return ParallelInfo(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        tp_size=ps.get_tensor_model_parallel_world_size(),
        pp_size=ps.get_pipeline_model_parallel_world_size(),
        dp_size=ps.get_data_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
    )


def seed_everything(seed: int, info: ParallelInfo | None = None) -> None:
    """Seed python, numpy and torch identically on every rank, and megatron's TP tracker."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if info is None:
        return
    if torch.cuda.is_available():
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    else:
        cpu_fallbacks.seed_model_parallel_rng(seed, tp_rank=info.tp_rank)


def destroy() -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def is_rank0() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def data_parallel_size() -> int:
    """Data-parallel replicas (1 before the parallel groups exist)."""
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_world_size() if ps.model_parallel_is_initialized() else 1


def expert_parallel_size() -> int:
    """Expert-parallel ranks a mixture of experts is split over (1 before the parallel groups exist)."""
    from megatron.core import parallel_state as ps

    return ps.get_expert_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1


def sum_over_data_parallel(tensor):
    """All-reduce (sum, in place) over the data-parallel group; a no-op with one replica or before
    the parallel groups exist. ``tensor`` is on the run's device (NCCL takes nothing else)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized() and ps.get_data_parallel_world_size() > 1:
        dist.all_reduce(tensor, group=ps.get_data_parallel_group())
    return tensor


def sum_over_pipeline(tensor):
    """All-reduce (sum, in place) over the pipeline group; a no-op without pipeline parallelism.
    ``tensor`` is on the run's device."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(tensor, group=ps.get_pipeline_model_parallel_group())
    return tensor


def mean_over_data_parallel(values: dict[str, float]) -> dict[str, float]:
    """Each DP rank saw its own chunks; the mean over all of them (same keys on every rank)."""
    from megatron.core import parallel_state as ps

    dp_size = ps.get_data_parallel_world_size()
    if dp_size == 1:
        return values
    keys = sorted(values)
    summed = sum_over_data_parallel(torch.tensor([values[key] for key in keys], dtype=torch.float64,
                                                 device=device.current()))
    return {key: float(value) / dp_size for key, value in zip(keys, summed.tolist())}


class ReplicaLeaderFailed(RuntimeError):
    """What the other ranks of a replica raise when its leader's computation failed."""


def once_per_replica(compute, shape, dtype=torch.float64) -> torch.Tensor:
    """``compute()`` on the first rank of this model replica (its TP x PP group) only, the result
    ([shape], ``dtype``, on the run's device) broadcast to the replica's other ranks.

    For what must be identical on every rank of a replica and need not be computed on each: a
    verifiable reward that runs programs (a timeout on one loaded rank and not on another would
    otherwise give the shards of one model different advantages). If ``compute`` raises, the
    leader raises it and the others raise :class:`ReplicaLeaderFailed` instead of waiting."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return compute().to(device=device.current(), dtype=dtype)
    group = ps.get_model_parallel_group()
    if dist.get_world_size(group) == 1:
        return compute().to(device=device.current(), dtype=dtype)
    leader = dist.get_global_rank(group, 0)
    failed = torch.zeros(1, device=device.current())
    result = torch.empty(tuple(shape), dtype=dtype, device=device.current())
    error = None
    if dist.get_rank() == leader:
        try:
            value = compute()
            if tuple(value.shape) != tuple(shape):
                raise ValueError(f"expected a result of shape {tuple(shape)}, got {tuple(value.shape)}")
            result.copy_(value)  # from wherever compute() made it
        except Exception as err:  # tell the others before raising, so that they do not wait for it
            error = err
            failed.fill_(1)
    dist.broadcast(failed, src=leader, group=group)
    if error is not None:
        raise error
    if failed.item():
        raise ReplicaLeaderFailed(f"the computation failed on rank {leader}, the first of this model replica; its "
                                  "error is in that rank's output")
    dist.broadcast(result, src=leader, group=group)
    return result


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any rank."""
    import torch.distributed as dist

    value = torch.tensor([1.0 if flag else 0.0], device=device.current())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
