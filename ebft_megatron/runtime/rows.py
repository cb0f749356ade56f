"""Tensors cut into shares of rows that need not be equal, and gathered back.

Collectives move equal shares (gloo moves nothing else), so a share shorter than the longest is
padded with zero rows at its end, and the padding is cut off again once gathered. Used where TP
ranks share out a mixture of experts' tokens (``models.layers``) and where gloo stands in for
NCCL's uneven gathers (``runtime.cpu_fallbacks``); zero rows also pad a vocabulary
(``checkpoint.hf_mapping``).
"""

from __future__ import annotations

from typing import Sequence

import torch


def pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """``tensor`` with zero rows appended up to ``rows`` rows (itself when it has them already)."""
    if tensor.shape[0] == rows:
        return tensor
    return torch.cat([tensor, tensor.new_zeros(rows - tensor.shape[0], *tensor.shape[1:])])


def gather_rows(share: torch.Tensor, sizes: Sequence[int], group) -> torch.Tensor:
    """Every rank's share of rows joined in rank order: rank r holds ``sizes[r]`` rows (its
    ``share``, possibly padded already); [sum(sizes), ...] on every rank of ``group``."""
    longest = max(sizes)
    gathered = share.new_empty(len(sizes) * longest, *share.shape[1:])
    torch.distributed.all_gather_into_tensor(gathered, pad_rows(share, longest).contiguous(), group=group)
    if all(size == longest for size in sizes):
        return gathered
    return torch.cat([gathered[rank * longest: rank * longest + size] for rank, size in enumerate(sizes)])
