"""The packed block attention on fused kernels, forward and backward, without score matrices.

A packed sequence holds the chunk (P rows) and then every rollout token (R = NB*n*G rows,
``block_layout``). Its attention is three parts over disjoint keys:
- chunk rows against the chunk, causally;
- rollout rows against the chunk prefix x[:a_b] of their block, in tiles of consecutive blocks
  (``BlockLayout.prefix_tiles``) with the staircase inside a tile masked;
- rollout rows against the earlier tokens of their own (block, sample), causally.
With document masking (``doc_ids``) each part gets a per-chunk mask from the layout; a rollout
step whose document starts at or after its anchor then sees no prefix key at all. No kernel is
handed such a row (``attention_kernels.prepare_mask`` leaves it open: the CUDA kernel gives NaN
for a row without keys, the CPU one log-sum-exp 0); its prefix part is emptied explicitly instead
(output 0, log-sum-exp -inf), and its output gradient is zero in that part's backward.
Each part is one fused kernel call (``attention_kernels``) that returns its output and row
log-sum-exp; a rollout row's two parts are merged exactly through their log-sum-exps. Backward
calls each part's backward kernel with the merged output and log-sum-exp, which gives that part's
exact share of the gradient, and sums the shares.

Saved for backward: the inputs, the merged output and the row log-sum-exps, i.e. O(S * heads *
head_dim), never O(S * keys).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ebft_megatron.models import attention_kernels as kernels
from ebft_megatron.block_layout import BlockLayout


@dataclass
class PackedMasks:
    """The additive masks of one packed forward, prepared once and shared by every layer.

    ``chunk`` / ``own`` None = plain causal; ``tiles`` = [(first row, stop row, key_len, mask,
    blind)], rows counted from the first rollout row; a tile's mask is None when it needs none;
    ``blind`` [B, 1, rows] bool marks rows that see no key of the tile (None: there are none)."""

    chunk: Optional[torch.Tensor]
    tiles: list
    own: Optional[torch.Tensor]


def packed_masks(layout: BlockLayout, tile_blocks: int, dtype, device,
                 doc_ids: Optional[torch.Tensor] = None) -> PackedMasks:
    rows_per_block = layout.num_samples * layout.rollout_len
    docs = None if doc_ids is None else doc_ids.to(device)
    tiles = []
    for first, stop in layout.prefix_tiles(tile_blocks):
        key_len = layout.anchors[stop - 1]
        mask = blind = None
        if stop - first > 1 or docs is not None:
            visible = layout.rollout_rows(layout.prefix_visibility(first, stop, key_len, docs)).to(device)
            if docs is not None:
                visible = visible[:, None]  # [B, 1, rows, key_len]: the same for every head
                blind = kernels.blind_rows(visible)
            mask = kernels.prepare_mask(visible, dtype)
        tiles.append((first * rows_per_block, stop * rows_per_block, key_len, mask, blind))
    chunk = own = None
    if docs is not None:
        chunk = kernels.prepare_mask(layout.chunk_visibility(docs)[:, None], dtype)
        own = _own_mask(layout, docs, dtype)
    return PackedMasks(chunk, tiles, own)


def _own_mask(layout: BlockLayout, doc_ids: torch.Tensor, dtype) -> Optional[torch.Tensor]:
    """The own-block mask under document masking, one per kernel batch entry (:class:`_OwnRows`
    order: block, sample, batch): [NB*n*B, 1, G, G]; None when no block's window crosses a document
    boundary (then it is the plain causal one)."""
    visible = layout.own_visibility(doc_ids=doc_ids)  # [B, NB, G, G]
    if bool(visible.equal(layout.own_visibility(doc_ids.device).expand_as(visible))):
        return None
    B, NB, G = visible.shape[0], layout.num_blocks, layout.rollout_len
    entries = visible.transpose(0, 1).unsqueeze(1).expand(NB, layout.num_samples, B, G, G)
    return kernels.prepare_mask(entries.reshape(-1, 1, G, G), dtype)


def _bhld(x: torch.Tensor) -> torch.Tensor:
    """[L, B, H, d] -> [B, H, L, d] (a view)."""
    return x.permute(1, 2, 0, 3)


class _OwnRows:
    """Rollout rows [R, B, H, ...] <-> one kernel batch entry per (block, sample, batch):
    [NB*n*B, H, G, ...], where each entry attends causally within its own G tokens. The entries
    are views of a dense [NB*n*B, G, H, ...] tensor: the layout the CUDA kernels read (see
    ``attention_kernels``)."""

    def __init__(self, layout: BlockLayout, batch: int):
        self.blocks, self.G, self.B = layout.num_blocks * layout.num_samples, layout.rollout_len, batch

    def to_entries(self, x: torch.Tensor) -> torch.Tensor:
        R, B, H = x.shape[:3]
        tail = x.shape[3:]
        x = x.view(self.blocks, self.G, B, H, *tail).transpose(1, 2)  # [NB*n, B, G, H, ...]
        return x.reshape(self.blocks * B, self.G, H, *tail).transpose(1, 2)

    def from_entries(self, x: torch.Tensor) -> torch.Tensor:
        H = x.shape[1]
        tail = x.shape[3:]
        x = x.transpose(1, 2).reshape(self.blocks, self.B, self.G, H, *tail).transpose(1, 2)  # [NB*n, G, B, H, ...]
        return x.reshape(self.blocks * self.G, self.B, H, *tail)


class _Operands:
    """What forward and backward both derive from the inputs: [B, H, L, d] views of the query and
    of the (grouped) key and value, the chunk length and the own-block batching."""

    def __init__(self, query, key, value, layout: BlockLayout):
        S, B, H, d = query.shape
        self.shape, self.P = (S, B, H, d), layout.chunk_len
        self.own = _OwnRows(layout, B)
        self.q, self.k, self.v = _bhld(query), _bhld(key), _bhld(value)


class PackedBlockAttention(torch.autograd.Function):
    """query [S, B, H, d], key/value [S, B, Hkv, d] (megatron's sbhd) -> [S, B, H*d]."""

    @staticmethod
    def forward(ctx, query, key, value, layout: BlockLayout, masks: PackedMasks, scale: float):
        x = _Operands(query, key, value, layout)
        (S, B, H, d), P, own, q, k, v = x.shape, x.P, x.own, x.q, x.k, x.v

        output = query.new_empty(S, B, H, d)
        chunk_out, chunk_lse = kernels.attend(q[:, :, :P], k[:, :, :P], v[:, :, :P], scale,
                                              masks.chunk, causal=masks.chunk is None)
        output[:P] = chunk_out.permute(2, 0, 1, 3)

        prefix_out, prefix_lse = [], []
        for first, stop, key_len, mask, blind in masks.tiles:
            out, lse = kernels.attend(q[:, :, P + first:P + stop], k[:, :, :key_len], v[:, :, :key_len], scale, mask)
            if blind is not None:  # rows without a key in this part: it contributes nothing
                out, lse = out.masked_fill(blind[..., None], 0.0), lse.masked_fill(blind, float("-inf"))
            prefix_out.append(out.permute(2, 0, 1, 3))  # [rows, B, H, d]
            prefix_lse.append(lse.permute(2, 0, 1))  # [rows, B, H]
        own_out, own_lse = kernels.attend(own.to_entries(query[P:]), own.to_entries(key[P:]),
                                          own.to_entries(value[P:]), scale, masks.own, causal=masks.own is None)
        rollout_out, rollout_lse = kernels.merge(
            own.from_entries(own_out), own.from_entries(own_lse.unsqueeze(-1)).squeeze(-1),
            torch.cat(prefix_out), torch.cat(prefix_lse),
        )
        output[P:] = rollout_out
        output = output.view(S, B, H * d)
        ctx.save_for_backward(query, key, value, output, chunk_lse, rollout_lse)
        ctx.layout, ctx.masks, ctx.scale = layout, masks, scale
        return output

    @staticmethod
    def backward(ctx, grad_output):
        query, key, value, output, chunk_lse, rollout_lse = ctx.saved_tensors
        masks, scale = ctx.masks, ctx.scale
        x = _Operands(query, key, value, ctx.layout)
        (S, B, H, d), P, own, q, k, v = x.shape, x.P, x.own, x.q, x.k, x.v
        grad = grad_output.reshape(S, B, H, d)
        out = output.view(S, B, H, d)
        g, o = _bhld(grad), _bhld(out)

        # zeroed, not empty: on CUDA a reused block holds an earlier step's values, and a row the
        # parts below were ever to leave unwritten must not carry them
        d_query = torch.zeros_like(query)
        d_key = torch.zeros_like(key)
        d_value = torch.zeros_like(value)
        dq, dk, dv = kernels.attend_backward(g[:, :, :P], q[:, :, :P], k[:, :, :P], v[:, :, :P], o[:, :, :P],
                                             chunk_lse, scale, masks.chunk, causal=masks.chunk is None)
        d_query[:P] = dq.permute(2, 0, 1, 3)
        chunk_dk, chunk_dv = dk.permute(2, 0, 1, 3), dv.permute(2, 0, 1, 3)  # [P, B, Hkv, d], accumulated below
        if not chunk_dk.is_contiguous():
            chunk_dk, chunk_dv = chunk_dk.contiguous(), chunk_dv.contiguous()

        lse_rows = rollout_lse.permute(1, 2, 0)  # [B, H, R]
        for first, stop, key_len, mask, blind in masks.tiles:
            rows = slice(P + first, P + stop)
            tile_grad = g[:, :, rows]
            if blind is not None:  # rows the forward emptied: this part has no share of their gradient
                tile_grad = tile_grad.masked_fill(blind[..., None], 0.0)
            dq, dk, dv = kernels.attend_backward(
                tile_grad, q[:, :, rows], k[:, :, :key_len], v[:, :, :key_len], o[:, :, rows],
                lse_rows[:, :, first:stop].contiguous(), scale, mask,
            )
            d_query[rows] = dq.permute(2, 0, 1, 3)
            chunk_dk[:key_len] += dk.permute(2, 0, 1, 3)
            chunk_dv[:key_len] += dv.permute(2, 0, 1, 3)
        d_key[:P], d_value[:P] = chunk_dk, chunk_dv

        dq, dk, dv = kernels.attend_backward(
            own.to_entries(grad[P:]), own.to_entries(query[P:]), own.to_entries(key[P:]),
            own.to_entries(value[P:]), own.to_entries(out[P:]),
            own.to_entries(rollout_lse.unsqueeze(-1)).squeeze(-1).contiguous(),
            scale, masks.own, causal=masks.own is None,
        )
        d_query[P:] += own.from_entries(dq)
        d_key[P:], d_value[P:] = own.from_entries(dk), own.from_entries(dv)
        return d_query, d_key, d_value, None, None, None


def packed_block_attention(query, key, value, layout: BlockLayout, masks: PackedMasks, scale: float):
    return PackedBlockAttention.apply(query, key, value, layout, masks, scale)
