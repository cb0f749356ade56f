"""The strided block-parallel layout, defined once.

Everything that needs to know where a rollout token sits, which position id it carries, which
logit predicts it, or what it may attend to, asks this module: the sampler, the attention module,
the feature network and the loss.

Symbols (reference §1.2): P = ``chunk_len``, C = ``first_anchor``, s = ``stride``, G = ``rollout_len``,
n = ``num_samples``. Block b = 0..NB-1 has anchor a_b = C + b*s with NB = (P - G - C)/s + 1.
Block b continues the ground-truth prefix x[:a_b]; its ground-truth window is x[a_b : a_b + G].

Packed sequence (our order, not the reference's step-interleaved one): the chunk once, then every
rollout token, block-major: token t of sample i of block b sits at

    P + (b * n + i) * G + t            (``rollout_index``)

and carries position id a_b + t, so each block looks like an ordinary causal continuation of its
own prefix. Block-major order keeps each (block, sample) rollout contiguous, which is what the
real-pair attention wants; the reference's interleaving has the same semantics.

Which logit predicts which token: token t of (b, i) is predicted by the logit at ground-truth
index a_b - 1 when t == 0, and at its predecessor ``rollout_index(b, i, t - 1)`` otherwise.

Document masking (``doc_ids`` [B, P], -1 on padding; reference §1.4), as the reference does it:
a rollout token belongs to the document of the ground-truth token it is scored against,
x[a_b + t], so the steps of one block may belong to different documents.
- Positions restart at every document start: chunk token k carries k - start(doc(k)), rollout
  token (b, i, t) the position of x[a_b + t].
- Chunk token k sees chunk tokens <= k of its document.
- Rollout token (b, i, t) sees the prefix keys j < a_b of the document of x[a_b + t] (none when
  that document starts at or after a_b), and its own tokens t' <= t of the same document.
Without ``doc_ids`` everything is one document and the rules above reduce to the plain ones.

The index maps (anchors, positions, windows, predictor indices) are made once, on the run's device
(``runtime.device``), where the sampler, the attention and the loss use them; what is computed from
an input (valid blocks from chunk lengths, document masks) lives where that input lives.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Optional

import torch

from ebft_megatron.errors import UserError
from ebft_megatron.runtime import device


class LayoutError(UserError, ValueError):
    """Rollout settings that do not define a valid layout."""


# --- the chunk under document masking (any forward of chunks alone uses these too) -------------
def document_position_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """[B, P] document ids -> [B, P] positions k - start(doc(k)): they restart at every document
    start (a run of equal ids is one document)."""
    index = torch.arange(doc_ids.shape[-1], device=doc_ids.device)
    starts_here = torch.ones_like(doc_ids, dtype=torch.bool)
    starts_here[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return index - torch.where(starts_here, index, 0).cummax(dim=-1).values


def document_causal_visibility(doc_ids: torch.Tensor) -> torch.Tensor:
    """[B, P] document ids -> [B, P, P] bool: token k sees tokens <= k of its own document."""
    P = doc_ids.shape[-1]
    causal = torch.ones(P, P, dtype=torch.bool, device=doc_ids.device).tril()
    return causal & (doc_ids[:, :, None] == doc_ids[:, None, :])


@dataclass(frozen=True)
class BlockLayout:
    chunk_len: int
    first_anchor: int
    stride: int
    rollout_len: int
    num_samples: int

    def __post_init__(self):
        P, C, s, G, n = self.chunk_len, self.first_anchor, self.stride, self.rollout_len, self.num_samples
        if min(P, C, s, G, n) < 1:
            raise LayoutError(
                f"rollout settings must be positive: chunk_len={P}, first_anchor={C}, stride={s}, "
                f"rollout_len={G}, num_samples={n}"
            )
        if P < C + G:
            raise LayoutError(
                f"chunk_len={P} is shorter than first_anchor + rollout_len = {C + G}; "
                "no block fits in the chunk"
            )
        if (P - G - C) % s:
            lo = C + G + ((P - G - C) // s) * s
            raise LayoutError(
                f"(chunk_len - rollout_len - first_anchor) = {P - G - C} is not divisible by "
                f"stride={s}; use chunk_len={lo} or {lo + s}, or another stride"
            )

    # --- sizes ------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return (self.chunk_len - self.rollout_len - self.first_anchor) // self.stride + 1

    @property
    def rollout_tokens_per_sample(self) -> int:
        return self.num_blocks * self.rollout_len

    @property
    def num_rollout_tokens(self) -> int:
        return self.num_blocks * self.num_samples * self.rollout_len

    @property
    def packed_len(self) -> int:
        return self.chunk_len + self.num_rollout_tokens

    # --- index maps -------------------------------------------------------------------------
    @cached_property
    def anchors(self) -> tuple[int, ...]:
        """a_b = C + b*s as Python ints: what host code loops and slices by (reading them from
        :attr:`anchor_positions` on a GPU would wait for the device)."""
        return tuple(range(self.first_anchor, self.first_anchor + self.stride * self.num_blocks, self.stride))

    @cached_property
    def anchor_positions(self) -> torch.Tensor:
        """[NB] a_b = C + b*s, on the run's device."""
        return self.first_anchor + self.stride * torch.arange(self.num_blocks, device=device.current())

    def rollout_index(self, block, sample, step):
        """Packed index of rollout token ``step`` of ``sample`` in ``block`` (ints or tensors)."""
        return self.chunk_len + (block * self.num_samples + sample) * self.rollout_len + step

    @cached_property
    def position_ids(self) -> torch.Tensor:
        """[packed_len] position ids: 0..P-1 for the chunk, a_b + t for rollout token (b, i, t)."""
        return torch.cat([torch.arange(self.chunk_len, device=device.current()),
                          self._rollout_rows(self.ground_truth_windows)])

    def chunk_position_ids(self, doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[P] 0..P-1, or with ``doc_ids`` [B, P] the [B, P] positions k - start(doc(k)), which
        restart at every document start."""
        if doc_ids is None:
            return torch.arange(self.chunk_len, device=device.current())
        return document_position_ids(doc_ids)

    def batch_position_ids(self, batch: int, doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[batch, packed_len] position ids of packed sequences: :attr:`position_ids` on every row,
        or with ``doc_ids`` [batch, P] per row: chunk token k at k - start(doc(k)), rollout token
        (b, i, t) at the position of x[a_b + t], the token it is scored against."""
        if doc_ids is None:
            return self.position_ids.expand(batch, -1)
        chunk = self.chunk_position_ids(doc_ids)
        rollout = self._rollout_rows(chunk[:, self.ground_truth_windows.to(chunk.device)])
        return torch.cat([chunk, rollout], dim=-1)

    def _rollout_rows(self, per_step: torch.Tensor) -> torch.Tensor:
        """[..., NB, G] per (block, step) -> [..., NB*n*G] per rollout token, in packed order."""
        *lead, NB, G = per_step.shape
        return per_step.unsqueeze(-2).expand(*lead, NB, self.num_samples, G).reshape(*lead, NB * self.num_samples * G)

    def window_doc_ids(self, doc_ids: torch.Tensor) -> torch.Tensor:
        """[B, P] -> [B, NB, G]: the document of each rollout step, that of x[a_b + t]."""
        return doc_ids[:, self.ground_truth_windows.to(doc_ids.device)]

    @cached_property
    def rollout_predictor_index(self) -> torch.Tensor:
        """[NB, n, G] packed index of the logit that predicts each rollout token."""
        NB, n, G = self.num_blocks, self.num_samples, self.rollout_len
        where = device.current()
        index = torch.empty(NB, n, G, dtype=torch.long, device=where)
        index[:, :, 0] = (self.anchor_positions - 1)[:, None]
        if G > 1:
            b = torch.arange(NB, device=where)[:, None, None]
            i = torch.arange(n, device=where)[None, :, None]
            t = torch.arange(G - 1, device=where)[None, None, :]
            index[:, :, 1:] = self.rollout_index(b, i, t)
        return index

    @cached_property
    def ground_truth_windows(self) -> torch.Tensor:
        """[NB, G] chunk indices of each block's ground-truth continuation x[a_b : a_b + G]."""
        return self.anchor_positions[:, None] + torch.arange(self.rollout_len, device=device.current())[None, :]

    def valid_blocks(self, lengths: torch.Tensor) -> torch.Tensor:
        """[B] real (unpadded) chunk lengths -> [B, NB] bool: the block's ground-truth window
        x[a_b : a_b + G] lies inside the real tokens. Blocks that reach into the padding of a
        last, short chunk are still sampled (shapes stay static) but carry no reward or loss."""
        window_end = (self.anchor_positions + self.rollout_len).to(lengths.device)
        return window_end[None, :] <= lengths[:, None]

    # --- who attends to whom ---------------------------------------------------------------
    # The pieces below define the attention pattern once; the dense mask assembles them, and the
    # fused attention uses them piece by piece (chunk rows, rollout rows against the chunk prefix
    # in tiles of blocks, rollout rows against their own block), never building the whole.
    # All are bool, True where the query may attend the key (torch SDPA convention); with
    # ``doc_ids`` [B, P] (document masking) they gain a leading batch dimension.

    def chunk_visibility(self, doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[P, P] (or [B, P, P]): chunk token k sees chunk tokens <= k (in its own document)."""
        if doc_ids is None:
            return torch.ones(self.chunk_len, self.chunk_len, dtype=torch.bool, device=device.current()).tril()
        return document_causal_visibility(doc_ids)

    def prefix_visibility(self, first_block: int, stop_block: int, key_len: int,
                          doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[blocks, G, key_len] (or [B, blocks, G, key_len]): what rollout step t of blocks
        [first_block, stop_block) sees of chunk keys [0, key_len). Block b sees x[:a_b], every step
        alike; with document masking step t sees only the keys in the document of x[a_b + t], so a
        step whose document starts at or after a_b sees no prefix key at all. The n samples of a
        block see the same (:meth:`rollout_rows`)."""
        where = device.current() if doc_ids is None else doc_ids.device
        anchors = self.anchor_positions[first_block:stop_block].to(where)
        keys = torch.arange(key_len, device=where)
        visible = keys[None, :] < anchors[:, None]  # [blocks, key_len]
        if doc_ids is None:
            return visible.unsqueeze(-2).expand(*visible.shape[:-1], self.rollout_len, key_len)
        scored = self.window_doc_ids(doc_ids)[:, first_block:stop_block]  # [B, blocks, G]
        return visible[:, None, :] & (doc_ids[:, None, None, :key_len] == scored[..., None])

    def rollout_rows(self, per_step: torch.Tensor) -> torch.Tensor:
        """[..., blocks, G, X] per (block, step) -> [..., blocks*n*G, X] per packed rollout row
        (``rollout_index`` order: block, sample, step)."""
        *lead, blocks, G, X = per_step.shape
        expanded = per_step.unsqueeze(-3).expand(*lead, blocks, self.num_samples, G, X)
        return expanded.reshape(*lead, blocks * self.num_samples * G, X)

    def own_visibility(self, where=None, doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[G, G]: rollout token t of a (block, sample) sees its own tokens 0..t. With ``doc_ids``
        [B, NB, G, G]: only those t' <= t whose ground-truth token x[a_b + t'] lies in the document
        of x[a_b + t] (itself always); the n samples of a block see the same."""
        G = self.rollout_len
        where = doc_ids.device if doc_ids is not None else (where or device.current())
        causal = torch.ones(G, G, dtype=torch.bool, device=where).tril()
        if doc_ids is None:
            return causal
        scored = self.window_doc_ids(doc_ids)  # [B, NB, G]
        return causal & (scored[..., :, None] == scored[..., None, :])

    def prefix_tiles(self, tile_blocks: int) -> list[tuple[int, int]]:
        """Consecutive blocks grouped for the prefix attention: [(first_block, stop_block)]. A tile
        attends to keys [0, a_last) and masks the staircase inside it, so a tile of k blocks
        wastes about (k - 1) * stride / 2 keys per query."""
        return [(start, min(start + tile_blocks, self.num_blocks)) for start in range(0, self.num_blocks, tile_blocks)]

    def dense_attention_mask(self, doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[packed_len, packed_len] (or [B, packed_len, packed_len] with ``doc_ids``) bool, True
        where query may attend key: the pieces above, assembled.

        Used as the reference that the real-pair attention is tested against, and by the dense
        path; its size is quadratic in the packed length.
        """
        S, P, G = self.packed_len, self.chunk_len, self.rollout_len
        lead = () if doc_ids is None else (len(doc_ids),)
        where = device.current() if doc_ids is None else doc_ids.device
        allowed = torch.zeros(*lead, S, S, dtype=torch.bool, device=where)
        allowed[..., :P, :P] = self.chunk_visibility(doc_ids)
        allowed[..., P:, :P] = self.rollout_rows(self.prefix_visibility(0, self.num_blocks, P, doc_ids))
        own = self.own_visibility(where, doc_ids)
        for row, start in enumerate(range(P, S, G)):
            allowed[..., start:start + G, start:start + G] = own if doc_ids is None else own[:, row // self.num_samples]
        return allowed

    # --- convenience ------------------------------------------------------------------------
    def pack(self, chunk: torch.Tensor, rollouts: torch.Tensor) -> torch.Tensor:
        """chunk [B, P] + rollouts [B, NB, n, G] -> packed token ids [B, packed_len]."""
        B = chunk.shape[0]
        return torch.cat([chunk, rollouts.reshape(B, -1)], dim=1)

    def unpack_rollouts(self, packed_values: torch.Tensor) -> torch.Tensor:
        """[B, packed_len, ...] -> rollout part [B, NB, n, G, ...]."""
        B = packed_values.shape[0]
        tail = packed_values[:, self.chunk_len:]
        return tail.reshape(B, self.num_blocks, self.num_samples, self.rollout_len, *tail.shape[2:])
