"""How evaluation spreads validation chunks over data-parallel replicas and pools the result.

Every rank of a replica (its TP and PP ranks) walks the same chunks in lockstep, because each
forward is a collective over the replica. Replicas take interleaved shares of the chunks, and the
per-replica sums are added over the data-parallel group at the end, so the pooled number does not
depend on the parallel layout (up to float64 summation order).
"""

from __future__ import annotations

import math

import torch

from ebft_megatron.evaluation.statistics import standard_error_from_sums
from ebft_megatron.runtime import device
from ebft_megatron.runtime.distributed import sum_over_data_parallel


def _data_parallel() -> tuple[int, int]:
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return 0, 1
    return ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()


def replica_share(num_chunks: int) -> list[int]:
    """Indices of the chunks this data-parallel replica evaluates (every dp_size-th one)."""
    rank, size = _data_parallel()
    return list(range(rank, num_chunks, size))


def gather_items(local: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """{metric: {item: value}} of every replica's share merged, on every rank (collective over the
    data-parallel group; a Python-object gather, as the values are few and keyed by name)."""
    _, size = _data_parallel()
    if size == 1:
        return {metric: dict(values) for metric, values in local.items()}
    from megatron.core import parallel_state as ps

    shares = [None] * size
    torch.distributed.all_gather_object(shares, local, group=ps.get_data_parallel_group())
    merged: dict[str, dict[str, float]] = {}
    for share in shares:
        for metric, values in share.items():
            merged.setdefault(metric, {}).update(values)
    return merged


def mean_and_error(values: list[float]) -> tuple[float, float, int]:
    """(mean, standard error of the mean, count) of per-item values (chunks, blocks, differences),
    each replica holding its own share (collective over the data-parallel group)."""
    local = [math.fsum(values), math.fsum(value * value for value in values), float(len(values))]
    sums = sum_over_data_parallel(torch.tensor(local, dtype=torch.float64, device=device.current()))
    total, squares, count = sums.tolist()
    return (*standard_error_from_sums(total, squares, count), int(count))
