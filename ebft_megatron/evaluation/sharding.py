"""How evaluation spreads validation chunks over data-parallel replicas and pools the result.

Every rank of a replica (its TP and PP ranks) walks the same chunks in lockstep, because each
forward is a collective over the replica. Replicas take interleaved shares of the chunks, and the
per-replica sums are added over the data-parallel group at the end, so the pooled number does not
depend on the parallel layout (up to float64 summation order).

A mixture of experts split over EP > 1 ranks makes every forward a collective over replicas too:
the expert-parallel group spans data-parallel replicas, and each MoE layer exchanges tokens among
them. Replicas then walk as many micro-batches as the largest share (:func:`replica_batches`); a
replica with fewer repeats one whose results it drops.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch

from ebft_megatron.data.dataset import micro_batches
from ebft_megatron.evaluation.statistics import standard_error_from_sums
from ebft_megatron.runtime import device
from ebft_megatron.runtime.distributed import expert_parallel_size, sum_over_data_parallel


def _data_parallel() -> tuple[int, int]:
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return 0, 1
    return ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()


def replica_share(num_chunks: int) -> list[int]:
    """Indices of the chunks this data-parallel replica evaluates (every dp_size-th one)."""
    rank, size = _data_parallel()
    return list(range(rank, num_chunks, size))


def in_lockstep() -> bool:
    """Whether every forward is a collective over the data-parallel replicas (experts split over
    EP > 1 ranks), so that replicas must run the same number of them."""
    return expert_parallel_size() > 1


def replica_batches(num_chunks: int, micro_batch_size: int) -> Iterator[tuple[list[int], bool]]:
    """This replica's share (:func:`replica_share`) in micro-batches, each with whether its results
    count. In lockstep (:func:`in_lockstep`) every replica runs as many micro-batches as the largest
    share has; a shorter share ends with repeats of a batch whose results do not count."""
    batches = list(micro_batches(replica_share(num_chunks), micro_batch_size))
    yield from ((batch, True) for batch in batches)
    if in_lockstep():
        _, size = _data_parallel()
        most = -(-math.ceil(num_chunks / size) // micro_batch_size)
        filler = batches[0] if batches else [0]
        yield from ((filler, False) for _ in range(most - len(batches)))


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
