"""Core attention for megatron-core's layer spec: causal, dense-masked, and block-structured.

It replaces ``DotProductAttention`` as the ``core_attention`` submodule, so every layer of the
policy, the feature network and the rollout decoder uses it, forward and backward.

What a call computes is chosen by what megatron hands through:
- ``packed_seq_params`` is a :class:`BlockAttentionParams` -> the strided block layout
  (``block_layout``), over real pairs only. Three modes:
    * ``packed``:  chunk + all rollout tokens in one sequence (policy loss, feature network), on
      fused kernels (``models.fused_attention``: no score matrices, forward or backward) or on
      the generic path below, the reference the fused one is tested against;
    * ``prefill``: the chunk alone, causal, writing its keys/values into the rollout KV cache;
    * ``decode``:  the n*NB tokens of one rollout step against the cache.
  The params ride in ``packed_seq_params`` because megatron passes that object untouched to the
  core attention on every path (pipeline stages, activation recompute); ``qkv_format='sbhd'``
  keeps megatron's own THD handling out of the way.
- ``attention_mask`` is a tensor -> dense masked attention. Megatron's convention is kept at the
  boundary (True = masked out) and converted once, here, to SDPA's (True = may attend).
- neither -> plain causal attention.

Generic real-pair attention: the chunk attends causally (SDPA with ``is_causal``). A rollout token of
block b attends to the chunk prefix x[:a_b] and to the earlier tokens of its own (block, sample).
Prefix scores are computed for tiles of consecutive blocks against keys [0, a_last) of the tile,
so the masked-out work is only the staircase inside a tile; the prefix and own-block scores are
concatenated and normalised by one softmax, which keeps it exact and differentiable.

Document masking (``BlockAttentionParams.doc_ids``) follows the layout's rule (reference §1.4) on
every path: the prefill masks the chunk per document, a decode step sees the prefix and own keys
of the document of the ground-truth token it is scored against, and the packed mode uses the
layout's per-chunk masks (fused) or its dense mask (generic).

Decode steps under no-grad take a fused path on every device (:func:`decode_attention`): per layer
one kernel call attends every (block, sample) row to the cached chunk keys, read in place, under
a mask built once per generation, and one call attends each row to its own block's slots; the
two are merged exactly through the log-sum-exps the kernels return (``attention_kernels``: on
CUDA torch's memory-efficient attention, on CPU its flash attention). A step's shapes, masks and
buffers are the same at every step, and nothing in it waits for the device: on a GPU a decode
step costs its kernel launches, so it is a few large calls, not a loop over tiles of blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.module import MegatronModule

from ebft_megatron.models import attention_kernels as kernels
from ebft_megatron.models.fused_attention import packed_block_attention, packed_masks
from ebft_megatron.block_layout import BlockLayout
from ebft_megatron.runtime import device

# Blocks per prefix tile (generic and fused packed paths). Within a tile the prefix keys are padded up to the tile's last anchor, so
# the wasted work per query is about (TILE_BLOCKS - 1) * stride / 2 keys out of an average P / 2.
TILE_BLOCKS = 8

IMPLEMENTATIONS = ("fused", "generic")


@dataclass
class RolloutKVCache:
    """Per-layer keys/values of the chunk and of the rollout tokens decoded so far.

    Keys are stored after rotary embedding: positions are absolute per token (a_b + t, or the
    document-relative position under document masking), so a cached key never needs re-rotation.
    """

    layers: dict = field(default_factory=dict)
    # the generation's decode masks (:class:`DecodeMasks`), built at the prefill's first layer and
    # kept for every step (key: layout, query heads per KV head, dtype, device)
    decode_masks: dict = field(default_factory=dict)
    # the decode step being run, [1] on the device, for the kernels that pick a step's slot and
    # masks: a step's ops and buffers are then the same at every step (what replaying one captured
    # step needs); set by :meth:`begin_step`
    step_index: Optional[torch.Tensor] = None
    # (step, masks key, what :meth:`DecodeMasks.at_step` gave and the prefix key bounds), for the
    # step's other layers
    step_masks: Optional[tuple] = None

    def begin_step(self, step: int, where: torch.device) -> None:
        """Decode step ``step`` starts: written into the device index (no host sync)."""
        if self.step_index is None:
            self.step_index = torch.zeros(1, dtype=torch.long, device=where)
        self.step_index.fill_(step)


@dataclass
class BlockAttentionParams(PackedSeqParams):
    """What one model forward passes to every layer's core attention and to the output layer."""

    layout: Optional[BlockLayout] = None
    # "packed" | "prefill" | "decode"; "dense" = the attention_mask tensor, causal when there is none
    mode: str = "packed"
    cache: Optional[RolloutKVCache] = None
    step: int = 0
    # Sequence rows whose logits are wanted; the LM head then runs on these rows only (the
    # prefill needs NB of its P rows). None = all rows.
    logit_rows: Optional[torch.Tensor] = None
    # [B, P] document ids (document masking), any mode but "dense"; None = one document. A cached
    # rollout (prefill + decode) must pass the same ids to every forward.
    doc_ids: Optional[torch.Tensor] = None
    # Return the final hidden states [b, s, h] instead of logits; the loss then applies the output
    # layer itself, in row chunks (``models.output``).
    return_hidden: bool = False
    # the fused path's masks, built at the first layer and reused by the others (key: dtype, device)
    fused_masks: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.qkv_format = "sbhd"
        if self.mode not in ("packed", "prefill", "decode", "dense"):
            raise ValueError(f"unknown block attention mode {self.mode!r}")
        if self.mode in ("prefill", "decode") and self.cache is None:
            raise ValueError(f"mode {self.mode!r} needs a RolloutKVCache")
        if self.mode == "decode":
            self.cache.begin_step(self.step, device.current())


def packed_attention(layout: BlockLayout, doc_ids: Optional[torch.Tensor] = None, return_hidden: bool = False):
    """Block params for a forward of the packed chunk + rollouts, with ``doc_ids`` [B, P] under
    document masking."""
    return BlockAttentionParams(layout=layout, mode="packed", doc_ids=doc_ids, return_hidden=return_hidden)


def _bhsd(x: torch.Tensor) -> torch.Tensor:
    """[s, b, h, d] -> [b, h, s, d]."""
    return x.permute(1, 2, 0, 3)


def _sbh(x: torch.Tensor) -> torch.Tensor:
    """[b, h, s, d] -> [s, b, h*d]."""
    b, h, s, d = x.shape
    return x.permute(2, 0, 1, 3).reshape(s, b, h * d)


def causal_attention(q, k, v, scale):
    """q [B,H,S,d], k/v [B,Hkv,S,d] -> [B,H,S,d]."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)


def rollout_attention(q, k_prefix, v_prefix, k_own, v_own, anchors, own_allowed, scale, prefix_visible=None):
    """Rollout queries against their chunk prefix and their own block, real pairs only.

    q:        [B, Hkv, NB, rep, n, Gq, d]   queries, grouped by block (rep = query heads per KV head)
    k_prefix: [B, Hkv, P', d]              chunk keys (P' >= the last anchor)
    k_own:    [B, Hkv, NB, n, Gk, d]        each (block, sample)'s own rollout keys
    anchors:  list[int] of length NB       block b sees chunk keys [0, a_b)
    own_allowed: bool, [Gq, Gk] or (document masking) [B, 1, NB, 1, 1, Gq, Gk]: which own keys
              each query step sees
    prefix_visible: None, or (document masking) (first block, stop block, key_len) -> bool
              [B, blocks, Gq, key_len], what the query steps see of chunk keys [0, key_len)
    returns   [B, Hkv, NB, rep, n, Gq, d]

    Query heads that share a KV head are folded into the rows of one matmul per tile, so the
    chunk keys are never copied per head.
    """
    B, Hkv, NB, rep, n, Gq, d = q.shape
    Gk = k_own.shape[-2]
    q = (q * scale).contiguous()
    own_scores = torch.matmul(q, k_own.unsqueeze(3).transpose(-1, -2))  # [B,Hkv,NB,rep,n,Gq,Gk]
    own_scores.masked_fill_(~own_allowed, float("-inf"))  # fresh matmul outputs: fill in place
    positions = torch.arange(int(anchors[-1]), device=q.device)
    outputs = []
    for start in range(0, NB, TILE_BLOCKS):
        stop = min(start + TILE_BLOCKS, NB)
        blocks = stop - start
        key_len = int(anchors[stop - 1])
        rows = blocks * rep * n * Gq
        prefix_scores = torch.matmul(
            q[:, :, start:stop].reshape(B, Hkv, rows, d), k_prefix[:, :, :key_len].transpose(-1, -2)
        ).view(B, Hkv, blocks, rep, n, Gq, key_len)
        if prefix_visible is None:
            tile_anchors = torch.as_tensor(anchors[start:stop], device=q.device)  # host ints: the generic path only
            hidden = (positions[None, :key_len] >= tile_anchors[:, None])[:, None, None, None, :]  # [blocks, key_len]
        else:  # a row may see no key here; the softmax below also covers its own keys, itself included
            hidden = ~prefix_visible(start, stop, key_len)[:, None, :, None, None]
        prefix_scores.masked_fill_(hidden, float("-inf"))
        scores = torch.cat([prefix_scores, own_scores[:, :, start:stop]], dim=-1)
        probs = torch.softmax(scores, dim=-1)
        prefix_probs, own_probs = probs.split([key_len, Gk], dim=-1)
        prefix_out = torch.matmul(prefix_probs.reshape(B, Hkv, rows, key_len), v_prefix[:, :, :key_len])
        own_out = torch.matmul(own_probs, v_own[:, :, start:stop].unsqueeze(3))
        outputs.append(prefix_out.view(B, Hkv, blocks, rep, n, Gq, d).add_(own_out))
    return torch.cat(outputs, dim=2)


@dataclass
class DecodeMasks:
    """The masks of a generation's decode steps, built once per generation and shared by every
    layer; :meth:`at_step` makes a step's from them with the device's step index.

    Rows of the prefix call are (block, sample, query head of a KV group), as
    :func:`decode_attention` folds them. ``prefix`` [rows, P] additive hides what
    ``BlockLayout.prefix_visibility`` hides, the same for every step; under document masking what
    a step sees depends on the step, and ``prefix_visible`` [B, NB, G, P] bool holds it for all
    steps instead. ``own_visible`` [G, X, 1, 1, G] bool: row t shows step t the slots of its own
    block that hold its tokens so far (X = 1, or NB*n*B rows under document masking)."""

    own_visible: torch.Tensor
    prefix: Optional[torch.Tensor] = None
    prefix_visible: Optional[torch.Tensor] = None
    rows_per_block: int = 1
    prefix_key_bounds: tuple = ()  # ((row stop, key stop), ...): the keys each run of rows sees at most

    def at_step(self, step_index: torch.Tensor, dtype):
        """-> (prefix mask, own mask [X, 1, 1, G], rows without a prefix key [B, 1, rows] or None)
        of the step in ``step_index`` [1]: device ops, the same at every step. The additive masks
        are prepared after the step is picked, so that their rows keep the kernels' alignment."""
        own = kernels.prepare_mask(self.own_visible.index_select(0, step_index)[0], dtype)
        if self.prefix_visible is None:
            return self.prefix, own, None
        visible = self.prefix_visible.index_select(2, step_index)[:, :, 0]  # [B, NB, P]
        visible = visible.repeat_interleave(self.rows_per_block, dim=1)[:, None]  # [B, 1, rows, P]
        return kernels.prepare_mask(visible, dtype), own, kernels.blind_rows(visible)


def prefix_key_bounds(layout: BlockLayout, rows_per_block: int) -> tuple:
    """((row stop, key stop), ...) of a decode step's prefix rows, a run of rows per block: block b
    sees chunk keys before its anchor a_b at most (document masking only hides more). Host
    integers, made once per generation, for the host's kernel (``attention_kernels.attend``)."""
    return tuple(((b + 1) * rows_per_block, max(1, anchor)) for b, anchor in enumerate(layout.anchors))


def decode_masks(layout: BlockLayout, query_groups: int, dtype, device,
                 doc_ids: Optional[torch.Tensor] = None) -> DecodeMasks:
    """The decode masks of a generation, for queries with ``query_groups`` query heads per KV head
    (and ``doc_ids`` [B, P] under document masking)."""
    NB, n, P = layout.num_blocks, layout.num_samples, layout.chunk_len
    rows_per_block = n * query_groups
    bounds = prefix_key_bounds(layout, rows_per_block)
    if doc_ids is None:
        prefix = layout.prefix_visibility(0, NB, P)[:, 0].to(device)  # [NB, P]
        own = layout.own_visibility(device)[:, None, None, None]  # [G, 1, 1, 1, G]: step t sees slots <= t
        return DecodeMasks(own, prefix=kernels.prepare_mask(prefix.repeat_interleave(rows_per_block, dim=0), dtype),
                           prefix_key_bounds=bounds)
    docs = doc_ids.to(device)
    own = layout.own_visibility(doc_ids=docs)  # [B, NB, G, G]: slots <= t in the same document
    B, G = own.shape[0], own.shape[-1]
    own = own.permute(2, 1, 0, 3).unsqueeze(2).expand(G, NB, n, B, G).reshape(G, NB * n * B, 1, 1, G)
    return DecodeMasks(own, prefix_visible=layout.prefix_visibility(0, NB, P, docs), rows_per_block=rows_per_block,
                       prefix_key_bounds=bounds)


def decode_attention(query, chunk_k, chunk_v, own_k, own_v, prefix_mask, own_mask, prefix_blind, scale,
                     prefix_key_bounds: tuple = ()):
    """One decode step of real-pair attention, no grad: two fused kernel calls for all blocks,
    samples and chunks, merged exactly through their log-sum-exps.

    query:    [R, B, H, d]          R = NB*n rows in (block, sample) order (as megatron hands them)
    chunk_k:  [B, Hkv, P, d]        cached chunk keys/values (after RoPE), read in place
    own_k:    [R*B, Hkv, G, d]      every row's own rollout slots, unwritten ones zero
    prefix_mask, own_mask, prefix_blind: the step's masks (``DecodeMasks.at_step``)
    prefix_key_bounds: the keys runs of prefix rows see at most (:func:`prefix_key_bounds`)
    returns   [R, B, H*d]

    The own call takes the rows as its batch. The prefix call folds the query heads of a KV head
    into its rows, so the chunk keys are neither copied nor expanded per head. The exact merge of
    two softmax-weighted averages over disjoint key sets is
    out = out_own + sigmoid(lse_prefix - lse_own) * (out_prefix - out_own), one in-place lerp.
    Shapes, masks and buffers are the same at every step: nothing here waits for the device.
    """
    R, B, H, d = query.shape
    Hkv = chunk_k.shape[1]
    rep = H // Hkv
    out, own_lse = kernels.attend(query.reshape(R * B, Hkv, rep, d), own_k, own_v, scale, own_mask)
    folded = query.view(R, B, Hkv, rep, d).permute(1, 2, 0, 3, 4).reshape(B, Hkv, R * rep, d)
    prefix_out, prefix_lse = kernels.attend(folded, chunk_k, chunk_v, scale, prefix_mask, key_bounds=prefix_key_bounds)
    if prefix_blind is not None:  # rows that see no prefix key: that part contributes nothing
        prefix_out = prefix_out.masked_fill(prefix_blind[..., None], 0.0)
        prefix_lse = prefix_lse.masked_fill(prefix_blind, float("-inf"))
    prefix_out = prefix_out.view(B, Hkv, R, rep, d).permute(2, 0, 1, 3, 4)  # [R, B, Hkv, rep, d]
    prefix_lse = prefix_lse.view(B, Hkv, R, rep).permute(2, 0, 1, 3)
    weight = torch.sigmoid(prefix_lse - own_lse.view(R, B, Hkv, rep)).unsqueeze(-1)
    out = out.view(R, B, Hkv, rep, d).lerp_(prefix_out, weight.to(out.dtype))
    return out.view(R, B, H * d)


class BlockCoreAttention(MegatronModule):
    """Drop-in ``core_attention`` submodule (same constructor as megatron's DotProductAttention)."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
        implementation: str = "fused",
    ):
        super().__init__(config=config)
        self.set_implementation(implementation)
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError("BlockCoreAttention supports attention_dropout=0 only (as every supported family uses)")
        if config.context_parallel_size != 1:
            raise ValueError("context parallelism is not supported by BlockCoreAttention")
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)

    def set_implementation(self, implementation: str) -> None:
        """Packed mode on "fused" kernels, or on the "generic" path (the reference)."""
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"block attention implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
        self.implementation = implementation

    def forward(
        self,
        query,
        key,
        value,
        attention_mask,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ):
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported by BlockCoreAttention")
        if isinstance(packed_seq_params, BlockAttentionParams):
            if packed_seq_params.mode != "dense":
                return self._block_forward(query, key, value, packed_seq_params)
        elif packed_seq_params is not None:
            raise ValueError("THD packed sequences are not supported by BlockCoreAttention")
        q, k, v = _bhsd(query), _bhsd(key), _bhsd(value)
        if attention_mask is None:
            out = causal_attention(q, k, v, self.softmax_scale)
        else:
            allowed = ~attention_mask.to(torch.bool)  # megatron: True = masked out
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=allowed, scale=self.softmax_scale, enable_gqa=True
            )
        return _sbh(out)

    @staticmethod
    def _step_masks(params: BlockAttentionParams, query_groups: int, query):
        """The decode step's masks and the generation's prefix key bounds, made from the
        generation's masks at the step's first layer; the other layers reuse them."""
        rollout_cache = params.cache
        masks, key = BlockCoreAttention._generation_masks(params, query_groups, query)
        if rollout_cache.step_masks is None or rollout_cache.step_masks[:2] != (params.step, key):
            step = (*masks.at_step(rollout_cache.step_index, query.dtype), masks.prefix_key_bounds)
            rollout_cache.step_masks = (params.step, key, step)
        return rollout_cache.step_masks[2]

    @staticmethod
    def _generation_masks(params: BlockAttentionParams, query_groups: int, query) -> tuple["DecodeMasks", tuple]:
        """(the generation's decode masks, their key in the cache), built once: at the prefill's
        first layer, so that every decode step runs the same ops."""
        key = (params.layout, query_groups, query.dtype, query.device)
        masks = params.cache.decode_masks.get(key)
        if masks is None:
            masks = decode_masks(params.layout, query_groups, query.dtype, query.device, params.doc_ids)
            params.cache.decode_masks[key] = masks
        return masks, key

    # --- block-structured paths -------------------------------------------------------------
    def _block_forward(self, query, key, value, params: BlockAttentionParams):
        layout = params.layout
        P, NB, n, G = layout.chunk_len, layout.num_blocks, layout.num_samples, layout.rollout_len
        B, H, Hkv, d = query.shape[1], query.shape[2], key.shape[2], query.shape[3]
        rep = H // Hkv
        scale = self.softmax_scale

        docs = None if params.doc_ids is None else params.doc_ids.to(query.device)
        if params.mode == "prefill":
            q, k, v = _bhsd(query), _bhsd(key), _bhsd(value)
            params.cache.layers[self.layer_number] = {
                "chunk_k": k.contiguous(),
                "chunk_v": v.contiguous(),
                # (block, sample, batch) first: a decode step's keys are written without a
                # permute, and each row's own keys are a view for the fused decode path, which
                # reads all G slots at every step (the same shapes each step) and masks the ones
                # not yet written: zeroed, so that they are finite
                "rollout_k": k.new_zeros(NB, n, B, Hkv, G, d),
                "rollout_v": v.new_zeros(NB, n, B, Hkv, G, d),
            }
            if kernels.available(query.device) and not torch.is_grad_enabled():
                self._generation_masks(params, rep, query)  # for the fused decode steps
            if docs is not None:
                allowed = layout.chunk_visibility(docs)[:, None]
                return _sbh(F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, enable_gqa=True))
            return _sbh(causal_attention(q, k, v, scale))

        if params.mode == "decode":
            t, step_index = params.step, params.cache.step_index
            cache = params.cache.layers[self.layer_number]
            # [NB*n, B, h, d] in (block, sample) order, as the cache's leading dims, into slot t
            # (picked on the device: the same op and buffers at every step)
            cache["rollout_k"].index_copy_(4, step_index, key.view(NB, n, B, Hkv, 1, d))
            cache["rollout_v"].index_copy_(4, step_index, value.view(NB, n, B, Hkv, 1, d))
            if kernels.available(query.device) and not torch.is_grad_enabled():
                prefix_mask, own_mask, prefix_blind, key_bounds = self._step_masks(params, rep, query)
                return decode_attention(
                    query, cache["chunk_k"], cache["chunk_v"],
                    cache["rollout_k"].view(NB * n * B, Hkv, G, d), cache["rollout_v"].view(NB * n * B, Hkv, G, d),
                    prefix_mask, own_mask, prefix_blind, scale, key_bounds,
                )
            own_k = cache["rollout_k"][..., : t + 1, :]  # [NB, n, B, Hkv, t+1, d]
            own_v = cache["rollout_v"][..., : t + 1, :]
            q = query.view(NB, n, B, Hkv, rep, 1, d).permute(2, 3, 0, 4, 1, 5, 6)
            prefix_visible = None
            if docs is None:
                own_allowed = torch.ones(1, t + 1, dtype=torch.bool, device=query.device)
            else:
                own_allowed = layout.own_visibility(doc_ids=docs)[:, None, :, None, None, t:t + 1, : t + 1]

                def prefix_visible(first, stop, key_len):
                    return layout.prefix_visibility(first, stop, key_len, docs)[:, :, t:t + 1]
            out = rollout_attention(
                q, cache["chunk_k"], cache["chunk_v"],
                own_k.permute(2, 3, 0, 1, 4, 5), own_v.permute(2, 3, 0, 1, 4, 5),
                layout.anchors, own_allowed, scale, prefix_visible,
            )  # [B, Hkv, NB, rep, n, 1, d]
            return out.permute(2, 4, 5, 0, 1, 3, 6).reshape(NB * n, B, H * d)

        # packed: chunk causal + rollout tokens against prefix and own block
        if self.implementation == "fused" and kernels.available(query.device):
            masks_key = (query.dtype, query.device)
            masks = params.fused_masks.get(masks_key)
            if masks is None:
                masks = packed_masks(layout, TILE_BLOCKS, query.dtype, query.device, params.doc_ids)
                params.fused_masks[masks_key] = masks
            return packed_block_attention(query, key, value, layout, masks, scale)
        if docs is not None:  # generic with document masking: the dense reference
            allowed = layout.dense_attention_mask(docs)[:, None]
            return _sbh(F.scaled_dot_product_attention(_bhsd(query), _bhsd(key), _bhsd(value), attn_mask=allowed,
                                                       scale=scale, enable_gqa=True))
        q, k, v = _bhsd(query), _bhsd(key), _bhsd(value)
        chunk_out = causal_attention(q[:, :, :P], k[:, :, :P], v[:, :, :P], scale)
        q_roll = query[P:].view(NB, n, G, B, Hkv, rep, d).permute(3, 4, 0, 5, 1, 2, 6)
        k_roll = key[P:].view(NB, n, G, B, Hkv, d).permute(3, 4, 0, 1, 2, 5)
        v_roll = value[P:].view(NB, n, G, B, Hkv, d).permute(3, 4, 0, 1, 2, 5)
        own_allowed = torch.ones(G, G, dtype=torch.bool, device=query.device).tril()
        roll_out = rollout_attention(
            q_roll, k[:, :, :P], v[:, :, :P], k_roll, v_roll, layout.anchors, own_allowed, scale
        )  # [B, Hkv, NB, rep, n, G, d]
        roll_out = roll_out.permute(2, 4, 5, 0, 1, 3, 6).reshape(NB * n * G, B, H * d)
        return torch.cat([_sbh(chunk_out), roll_out], dim=0)
