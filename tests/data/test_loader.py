"""ChunkLoader: seeded order per epoch, drop_last, disjoint DP slices, exact resume."""

import pytest

from ebft_megatron.data.dataset import ChunkLoader
from ebft_megatron.data.sources import DataError


def take(loader, steps):
    return [next(loader) for _ in range(steps)]


def test_epochs_are_seeded_permutations_with_drop_last():
    loader = ChunkLoader(num_chunks=10, chunks_per_step=4, dp_rank=0, dp_size=1, seed=7)
    assert loader.steps_per_epoch == 2
    steps = take(loader, 6)  # three epochs of two steps
    for epoch in range(3):
        seen = steps[2 * epoch] + steps[2 * epoch + 1]
        assert len(seen) == 8 and len(set(seen)) == 8 and set(seen) <= set(range(10))
        assert seen == loader.epoch_order(epoch)[:8].tolist()
    assert steps[0:2] != steps[2:4]  # every epoch is reshuffled
    assert take(ChunkLoader(10, 4, 0, 1, seed=7), 6) == steps  # same seed, same order
    assert take(ChunkLoader(10, 4, 0, 1, seed=8), 6) != steps
    assert loader.state_dict()["epoch"] == 2 and loader.state_dict()["position"] == 2


def test_data_parallel_ranks_split_the_global_batch():
    single = take(ChunkLoader(64, 16, 0, 1, seed=3), 8)
    ranks = [take(ChunkLoader(64, 16, rank, 4, seed=3), 8) for rank in range(4)]
    for step in range(8):
        parts = [ranks[rank][step] for rank in range(4)]
        assert all(len(part) == 4 for part in parts)
        assert sum(parts, []) == single[step]  # rank r gets the r-th slice of the same global batch
        assert len(set(sum(parts, []))) == 16  # disjoint


def test_resume_from_state_dict_gives_the_same_indices():
    reference = ChunkLoader(23, 6, dp_rank=1, dp_size=2, seed=11)
    take(reference, 5)
    state = reference.state_dict()
    expected = take(reference, 9)  # crosses two epoch boundaries (3 steps per epoch)
    resumed = ChunkLoader(23, 6, dp_rank=1, dp_size=2, seed=11)
    resumed.load_state_dict(dict(state))
    assert take(resumed, 9) == expected
    fresh = ChunkLoader(23, 6, dp_rank=1, dp_size=2, seed=11)
    assert take(fresh, 14)[5:] == expected


def test_loader_errors():
    with pytest.raises(DataError, match=r"chunks per step \(16\) must be divisible by the data-parallel size \(3\)"):
        ChunkLoader(100, 16, 0, 3, seed=0)
    with pytest.raises(DataError, match="only 5 chunks, fewer than the 8 chunks of one step"):
        ChunkLoader(5, 8, 0, 1, seed=0)
    with pytest.raises(DataError, match="dp_rank 2 is not below dp_size 2"):
        ChunkLoader(8, 4, 2, 2, seed=0)
    with pytest.raises(DataError, match="seed must be an integer >= 0"):
        ChunkLoader(8, 4, 0, 1, seed=-1)
    loader = ChunkLoader(8, 4, 0, 1, seed=0)
    with pytest.raises(DataError, match="the saved state has num_chunks=9, this run has 8"):
        loader.load_state_dict({"epoch": 0, "position": 1, "seed": 0, "num_chunks": 9, "chunks_per_step": 4})
