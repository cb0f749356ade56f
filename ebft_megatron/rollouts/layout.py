"""The strided block-parallel layout, defined once.

Everything that needs to know where a rollout token sits, which position id it carries, which
logit predicts it, or what it may attend to, asks this module: the sampler, the attention module,
the feature network and the loss.

Symbols (spec §1.2): P = ``chunk_len``, C = ``first_anchor``, s = ``stride``, G = ``rollout_len``,
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
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Optional

import torch


class LayoutError(ValueError):
    """Rollout settings that do not define a valid layout."""


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
    def anchor_positions(self) -> torch.Tensor:
        """[NB] a_b = C + b*s."""
        return self.first_anchor + self.stride * torch.arange(self.num_blocks)

    def rollout_index(self, block, sample, step):
        """Packed index of rollout token ``step`` of ``sample`` in ``block`` (ints or tensors)."""
        return self.chunk_len + (block * self.num_samples + sample) * self.rollout_len + step

    @cached_property
    def position_ids(self) -> torch.Tensor:
        """[packed_len] position ids: 0..P-1 for the chunk, a_b + t for rollout token (b, i, t)."""
        steps = torch.arange(self.rollout_len)
        rollout = (self.anchor_positions[:, None, None] + steps[None, None, :]).expand(
            self.num_blocks, self.num_samples, self.rollout_len
        )
        return torch.cat([torch.arange(self.chunk_len), rollout.reshape(-1)])

    @cached_property
    def rollout_predictor_index(self) -> torch.Tensor:
        """[NB, n, G] packed index of the logit that predicts each rollout token."""
        NB, n, G = self.num_blocks, self.num_samples, self.rollout_len
        index = torch.empty(NB, n, G, dtype=torch.long)
        index[:, :, 0] = (self.anchor_positions - 1)[:, None]
        if G > 1:
            b = torch.arange(NB)[:, None, None]
            i = torch.arange(n)[None, :, None]
            t = torch.arange(G - 1)[None, None, :]
            index[:, :, 1:] = self.rollout_index(b, i, t)
        return index

    @cached_property
    def ground_truth_windows(self) -> torch.Tensor:
        """[NB, G] chunk indices of each block's ground-truth continuation x[a_b : a_b + G]."""
        return self.anchor_positions[:, None] + torch.arange(self.rollout_len)[None, :]

    def valid_blocks(self, lengths: torch.Tensor) -> torch.Tensor:
        """[B] real (unpadded) chunk lengths -> [B, NB] bool: the block's ground-truth window
        x[a_b : a_b + G] lies inside the real tokens. Blocks that reach into the padding of a
        last, short chunk are still sampled (shapes stay static) but carry no reward or loss."""
        window_end = self.anchor_positions + self.rollout_len
        return window_end[None, :] <= lengths[:, None]

    # --- the dense reference mask -----------------------------------------------------------
    def dense_attention_mask(self, doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[packed_len, packed_len] bool, True where query may attend key (torch SDPA convention).

        Used as the reference that the real-pair attention is tested against, and by the dense
        path; its size is quadratic in the packed length.

        With ``doc_ids`` [B, P] (document masking) the result is [B, packed_len, packed_len]: a chunk
        token also needs the key in its own document, and block b's rollout tokens see only the
        prefix keys in the document of x[a_b - 1], the token they continue (plus their own block).
        """
        allowed = self._dense_block_mask()
        if doc_ids is None:
            return allowed
        P = self.chunk_len
        # the document each packed query continues: its own for chunk rows, x[a_b - 1]'s for rollouts
        continued = doc_ids[:, self.anchor_positions - 1]  # [B, NB]
        rollout_docs = continued[:, :, None].expand(-1, -1, self.num_samples * self.rollout_len).reshape(len(doc_ids), -1)
        query_docs = torch.cat([doc_ids, rollout_docs], dim=1)  # [B, S]
        same = query_docs[:, :, None] == doc_ids[:, None, :]  # [B, S, P]: keys in the chunk
        masked = allowed.expand(len(doc_ids), -1, -1).clone()
        masked[:, :, :P] &= same
        return masked

    def _dense_block_mask(self) -> torch.Tensor:
        S, P = self.packed_len, self.chunk_len
        allowed = torch.zeros(S, S, dtype=torch.bool)
        allowed[:P, :P] = torch.ones(P, P, dtype=torch.bool).tril()
        G = self.rollout_len
        within = torch.ones(G, G, dtype=torch.bool).tril()
        for b, anchor in enumerate(self.anchor_positions.tolist()):
            for i in range(self.num_samples):
                start = self.rollout_index(b, i, 0)
                allowed[start:start + G, :anchor] = True
                allowed[start:start + G, start:start + G] = within
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
