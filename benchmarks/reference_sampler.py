"""The reference's rollout sampler, kept to check the KV-cached engine against
(``ebft_megatron.rollouts.sampler.sample_rollouts``): for each of the n sample copies, G full
forwards of the chunk plus every block's tokens so far, with a dense block mask. Used by
``benchmarks/rollouts.py`` (the speed-up) and ``tests/rollouts/test_sampler.py`` (equal tokens
and logits); not part of the trainer.
"""

from __future__ import annotations

from typing import Optional

import torch

from ebft_megatron.models.attention import BlockAttentionParams
from ebft_megatron.block_layout import BlockLayout
from ebft_megatron.rollouts.sampler import Rollouts
from ebft_megatron.rollouts.sampling import SamplingSettings, sample_tokens
from ebft_megatron.models import gpt
from ebft_megatron.runtime import pipeline


def sample_rollouts_recompute(
    model,
    layout: BlockLayout,
    chunk: torch.Tensor,
    vocab_size: int,
    settings: SamplingSettings,
    generator: Optional[torch.Generator] = None,
    uniforms: Optional[torch.Tensor] = None,
    return_logits: bool = False,
    doc_ids: Optional[torch.Tensor] = None,
) -> Rollouts:
    """The reference's method: for each of the n sample copies, G full forwards of the chunk plus
    all blocks' tokens so far, with a dense block mask (per chunk with ``doc_ids``); logits taken
    only where needed."""
    B, P = chunk.shape
    NB, n, G = layout.num_blocks, layout.num_samples, layout.rollout_len
    single = BlockLayout(P, layout.first_anchor, layout.stride, G, 1)
    allowed = single.dense_attention_mask(doc_ids)
    if allowed.dim() == 2:
        allowed = allowed[None]  # [1 or B, S, S]
    positions_full = single.batch_position_ids(B, doc_ids)  # [B, S]
    predictors = single.rollout_predictor_index[:, 0, :]  # [NB, G]
    tokens = torch.zeros(B, NB, n, G, dtype=torch.long, device=chunk.device)
    kept = torch.zeros(B, NB, n, G, vocab_size, device=chunk.device) if return_logits else None
    for i in range(n):
        for t in range(G):
            rollout_idx = single.rollout_index(torch.arange(NB, device=chunk.device)[:, None], 0,
                                               torch.arange(t, device=chunk.device)[None, :]).reshape(-1)
            index = torch.cat([torch.arange(P, device=chunk.device), rollout_idx])
            seq = torch.cat([chunk, tokens[:, :, i, :t].reshape(B, -1)], dim=1)
            mask = ~allowed[:, index][:, :, index]  # megatron convention: True = masked out
            # where in `index` each block's predictor sits; the LM head runs on those rows only
            where = torch.searchsorted(index, predictors[:, t])
            params = BlockAttentionParams(layout=single, mode="dense", logit_rows=where)

            def draw(logits, i=i, t=t):
                full = pipeline.gather_vocab_parallel(logits)[..., :vocab_size]
                u = None if uniforms is None else uniforms[:, :, i, t]
                return full, sample_tokens(full, settings.temperature, settings.top_p, generator, uniforms=u)

            full, step_tokens = gpt.forward(
                model, seq, positions_full[:, index], reduce=draw,
                attention_mask=mask[:, None], block_params=params,
            )
            tokens[:, :, i, t] = step_tokens
            if return_logits:
                kept[:, :, i, t] = full
    return Rollouts(tokens=tokens, logits=kept)
