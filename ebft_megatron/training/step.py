"""One training step, as a chain of functions that can each be called and tested on its own:

    chunks -> rollouts.sample_rollouts -> features.embed (packed) -> objective.block_rewards
           -> policy forward/backward through megatron's pipeline schedule (objective.loss)

``make_experience`` runs the no-grad part for one micro-batch (strictly on-policy: all
micro-batches of a step are sampled before the policy changes); ``forward_backward`` then runs
megatron's schedule over the micro-batches, accumulating gradients (and reducing them over DP
through DDP's finalize hook), and returns the loss terms averaged over micro-batches on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from ebft_megatron.features.network import embed
from ebft_megatron.models.attention import BlockAttentionParams, packed_attention
from ebft_megatron.models.gpt import model_forward
from ebft_megatron.models.output import model_output
from ebft_megatron.objective import loss as objective_loss
from ebft_megatron.objective.rewards import RewardSettings, block_rewards, reward_metrics
from ebft_megatron.objective.rlvr import VerifiableReward, verifiable_advantages
from ebft_megatron.rollouts.layout import BlockLayout
from ebft_megatron.rollouts.sampler import SamplingSettings, sample_rollouts
from ebft_megatron.runtime import pipeline
from ebft_megatron.runtime.distributed import sum_over_data_parallel

MODES = ("ebft", "sft", "rlvr")


@dataclass
class MicroBatch:
    chunk: torch.Tensor  # [B, P]
    lengths: torch.Tensor  # [B] real tokens per chunk (the last chunk of a corpus may be padded)
    rollout_tokens: Optional[torch.Tensor] = None  # [B, NB, n, G]
    advantages: Optional[torch.Tensor] = None  # [B, NB, n]
    metrics: dict = field(default_factory=dict)
    doc_ids: Optional[torch.Tensor] = None  # [B, P], only with document masking


def make_experience(policy, feature_model, layout: BlockLayout, batch: MicroBatch, vocab_size: int,
                    sampling: SamplingSettings, rewards: RewardSettings, pooling: str = "last_token",
                    generator: Optional[torch.Generator] = None) -> MicroBatch:
    """EBFT: sample rollouts, embed ground truth and rollouts in one packed feature forward,
    and turn the Gram matrices into per-block advantages."""
    rollouts = sample_rollouts(policy, layout, batch.chunk, vocab_size, sampling, generator, doc_ids=batch.doc_ids)
    moments = embed(feature_model, layout, layout.pack(batch.chunk, rollouts.tokens), pooling, doc_ids=batch.doc_ids)
    valid = layout.valid_blocks(batch.lengths)
    scored = block_rewards(moments.gram, rewards, valid)
    return MicroBatch(batch.chunk, batch.lengths, rollouts.tokens, scored.advantage,
                      reward_metrics(scored, moments.gram, rewards), batch.doc_ids)


def make_rlvr_experience(policy, layout: BlockLayout, batch: MicroBatch, vocab_size: int, sampling: SamplingSettings,
                         reward: VerifiableReward, generator: Optional[torch.Generator] = None) -> MicroBatch:
    rollouts = sample_rollouts(policy, layout, batch.chunk, vocab_size, sampling, generator, doc_ids=batch.doc_ids)
    valid = layout.valid_blocks(batch.lengths)
    scores = reward(batch.chunk, rollouts.tokens, layout).double()
    count = valid.sum().clamp_min(1)
    metrics = {"reward/verifiable": float((scores.mean(-1) * valid).sum() / count)}
    return MicroBatch(batch.chunk, batch.lengths, rollouts.tokens, verifiable_advantages(scores, valid), metrics,
                      batch.doc_ids)


def _inputs(batch: MicroBatch, layout: BlockLayout, mode: str):
    """Token ids, positions, block params and attention mask of the policy forward for this mode.
    The model hands back hidden states where it computes log-probs in row chunks."""
    if mode == "sft":
        B, P = batch.chunk.shape
        mask = None
        if batch.doc_ids is not None:  # causal inside each document (megatron: True = masked out)
            mask = ~layout.chunk_visibility(batch.doc_ids)[:, None]
        params = BlockAttentionParams(mode="dense", return_hidden=True)
        return batch.chunk, torch.arange(P).expand(B, P), params, mask
    tokens = layout.pack(batch.chunk, batch.rollout_tokens)
    params = packed_attention(layout, batch.doc_ids, return_hidden=True)
    return tokens, layout.position_ids.expand(tokens.shape[0], -1), params, None


def forward_backward(policy, micro_batches: list[MicroBatch], layout: BlockLayout, settings: objective_loss.LossSettings,
                     mode: str = "ebft", forward_only: bool = False) -> dict[str, float]:
    """Policy forward (+ backward unless ``forward_only``) over the micro-batches through megatron's
    pipeline schedule; gradients accumulate in the model (DDP: its grad buffers). Returns the loss
    terms averaged over micro-batches, on every rank."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    batches = iter(micro_batches)

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        tokens, positions, params, mask = _inputs(batch, layout, mode)
        output = model_forward(model, tokens, positions, attention_mask=mask, block_params=params)

        def loss_func(output_tensor):
            output_ = model_output(output_tensor, model)
            if mode == "sft":
                return objective_loss.sft_loss(output_, batch.chunk, batch.lengths)
            return objective_loss.ebft_loss(output_, layout, batch.chunk, batch.lengths, batch.rollout_tokens,
                                            batch.advantages, settings)

        return output, loss_func

    first = micro_batches[0]
    seq_length = first.chunk.shape[1] if mode == "sft" else layout.packed_len
    terms = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=batches, model=[policy],
        num_microbatches=len(micro_batches), seq_length=seq_length, micro_batch_size=first.chunk.shape[0],
        forward_only=forward_only,
    )
    from megatron.core import parallel_state as ps

    averaged = None
    if ps.is_pipeline_last_stage():
        averaged = {key: float(sum(t[key] for t in terms) / len(terms)) for key in terms[0]}
    averaged = pipeline.broadcast_from_last_stage(averaged)
    return mean_over_data_parallel(averaged)


def mean_over_data_parallel(values: dict[str, float]) -> dict[str, float]:
    """Each DP rank saw its own chunks; report the mean over all of them (same keys everywhere)."""
    from megatron.core import parallel_state as ps

    dp_size = ps.get_data_parallel_world_size()
    if dp_size == 1:
        return values
    keys = sorted(values)
    summed = sum_over_data_parallel(torch.tensor([values[key] for key in keys], dtype=torch.float64))
    return {key: float(value) / dp_size for key, value in zip(keys, summed)}
