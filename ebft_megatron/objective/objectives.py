"""The training objectives, one object per mode: EBFT, SFT and RLVR.

The trainer and the step call an objective and never ask which one it is. For one micro-batch
(:class:`Batch`) an objective gives
- ``experience(batch, policy)``: the no-grad part, timed by phase: EBFT samples rollouts, embeds
  the ground truth and the rollouts in one packed forward of the frozen feature network and turns
  the Gram matrices into advantages; RLVR samples rollouts and scores them with a verifiable
  reward; SFT has nothing to do;
- ``forward_inputs(experience)``: token ids, position ids, forward params and attention mask of the
  policy forward (the chunk, or the chunk with every rollout packed after it);
- ``loss(output, experience)``: the loss and its logged terms from that forward's output;
- ``tokens_per_chunk``: the length of that forward, which megatron's schedule is told;
- ``flops_per_chunk(cost)``: the model FLOPs of a step per chunk, for the MFU.

All experiences of a step are made before the policy changes (strictly on-policy).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from ebft_megatron.block_layout import BlockLayout
from ebft_megatron.features.network import embed
from ebft_megatron.models import flops
from ebft_megatron.models.attention import BlockAttentionParams, packed_attention
from ebft_megatron.objective import loss as objective_loss
from ebft_megatron.objective.rewards import RewardSettings, block_rewards, reward_metrics
from ebft_megatron.objective.rlvr import VerifiableReward, resolve_reward, verifiable_advantages
from ebft_megatron.rollouts.sampler import sample_rollouts
from ebft_megatron.rollouts.sampling import SamplingSettings
from ebft_megatron.runtime.distributed import once_per_replica
from ebft_megatron.runtime.timing import PhaseTimer


@dataclass
class Batch:
    """Chunks of the corpus, as the loader hands them out."""

    chunk: torch.Tensor  # [B, P]
    lengths: torch.Tensor  # [B] real tokens per chunk (the last chunk of a corpus may be padded)
    doc_ids: Optional[torch.Tensor] = None  # [B, P], only with document masking


@dataclass
class Experience:
    """What the policy's forward and loss need of one micro-batch."""

    batch: Batch
    rollout_tokens: Optional[torch.Tensor] = None  # [B, NB, n, G]
    advantages: Optional[torch.Tensor] = None  # [B, NB, n]
    metrics: dict = field(default_factory=dict)  # rewards and the like (0-dim device tensors), averaged over the step


@dataclass
class ObjectiveContext:
    """What a run builds once and hands to its objective."""

    layout: BlockLayout
    vocab_size: int
    generator: Optional[torch.Generator] = None  # the rollout sampler's (per data-parallel rank)
    feature_model: object = None  # the frozen feature network
    tokenizer: object = None  # for rewards that read text
    timer: Optional[PhaseTimer] = None


def chunk_inputs(layout: BlockLayout, batch: Batch):
    """(token ids, position ids, forward params, attention mask) of a forward of the chunks alone;
    the model hands back hidden states where it computes log-probs in row chunks."""
    B, P = batch.chunk.shape
    mask, positions = None, torch.arange(P, device=batch.chunk.device).expand(B, P)
    if batch.doc_ids is not None:  # causal inside each document (megatron: True = masked out)
        mask = ~layout.chunk_visibility(batch.doc_ids)[:, None]
        positions = layout.chunk_position_ids(batch.doc_ids)
    return batch.chunk, positions, BlockAttentionParams(mode="dense", return_hidden=True), mask


def packed_inputs(layout: BlockLayout, batch: Batch, rollout_tokens: torch.Tensor):
    """The same for the chunks with every rollout packed after them (``block_layout``)."""
    tokens = layout.pack(batch.chunk, rollout_tokens)
    params = packed_attention(layout, batch.doc_ids, return_hidden=True)
    return tokens, layout.batch_position_ids(tokens.shape[0], batch.doc_ids), params, None


class Objective:
    name = ""
    terms: tuple[str, ...] = ()  # the names of the loss terms its loss returns, in the order a step reads them
    samples_rollouts = False  # the objective draws rollouts (needs a temperature > 0 and n >= 2)
    embeds_features = False  # the objective runs the feature network on the packed sequence

    def __init__(self, layout: BlockLayout, timer: Optional[PhaseTimer] = None):
        self.layout = layout
        self.timer = timer or PhaseTimer()

    @classmethod
    def from_config(cls, config, context: ObjectiveContext) -> "Objective":
        return cls(context.layout, context.timer)

    @classmethod
    def check_setup(cls, config, tokenizer) -> None:
        """What a launch can check of this objective's settings before any process starts."""

    @classmethod
    def tokens_of(cls, layout: BlockLayout) -> int:
        """Tokens of one chunk's policy forward."""
        return layout.chunk_len

    @property
    def tokens_per_chunk(self) -> int:
        return self.tokens_of(self.layout)

    def experience(self, batch: Batch, policy) -> Experience:
        return Experience(batch)

    def experiences(self, batches: list[Batch], policy) -> list[Experience]:
        """The step's experiences, one per micro-batch."""
        return [self.experience(batch, policy) for batch in batches]

    def forward_inputs(self, experience: Experience):
        """(token ids, position ids, forward params, attention mask) of the policy forward."""
        return chunk_inputs(self.layout, experience.batch)

    def loss(self, output, experience: Experience):
        raise NotImplementedError

    def flops_per_chunk(self, cost: flops.CostModel) -> float:
        raise NotImplementedError


class SFT(Objective):
    """Cross entropy on the chunk."""

    name = "sft"
    terms = objective_loss.SFT_TERMS

    def loss(self, output, experience: Experience):
        return objective_loss.sft_loss(output, experience.batch.chunk, experience.batch.lengths)

    def flops_per_chunk(self, cost: flops.CostModel) -> float:
        return flops.sft_step(cost, self.layout.chunk_len)


class _RolloutObjective(Objective):
    """REINFORCE with per-block advantages plus gamma * CE, from one forward of the chunk with
    every rollout packed after it; the advantages are the subclass's."""

    samples_rollouts = True
    terms = objective_loss.ROLLOUT_TERMS

    def __init__(self, layout: BlockLayout, vocab_size: int, sampling: SamplingSettings,
                 loss_settings: objective_loss.LossSettings, generator: torch.Generator,
                 timer: Optional[PhaseTimer] = None):
        super().__init__(layout, timer)
        self.vocab_size, self.sampling, self.loss_settings, self.generator = vocab_size, sampling, loss_settings, generator

    @classmethod
    def tokens_of(cls, layout: BlockLayout) -> int:
        return layout.packed_len

    @staticmethod
    def _common(config, context: ObjectiveContext) -> dict:
        return dict(layout=context.layout, vocab_size=context.vocab_size, sampling=SamplingSettings.of(config),
                    loss_settings=objective_loss.LossSettings.of(config), generator=context.generator,
                    timer=context.timer)

    def rollouts(self, batch: Batch, policy) -> torch.Tensor:
        with self.timer.phase("rollouts"):
            return sample_rollouts(policy, self.layout, batch.chunk, self.vocab_size, self.sampling, self.generator,
                                   doc_ids=batch.doc_ids).tokens

    def forward_inputs(self, experience: Experience):
        return packed_inputs(self.layout, experience.batch, experience.rollout_tokens)

    def loss(self, output, experience: Experience):
        batch = experience.batch
        return objective_loss.ebft_loss(output, self.layout, batch.chunk, batch.lengths, experience.rollout_tokens,
                                        experience.advantages, self.loss_settings)


class EBFT(_RolloutObjective):
    """Feature matching: advantages from the frozen feature network's Gram matrices."""

    name = "ebft"
    embeds_features = True

    def __init__(self, layout, vocab_size, sampling, loss_settings, generator, feature_model,
                 reward_settings: RewardSettings, pooling: str, timer: Optional[PhaseTimer] = None):
        super().__init__(layout, vocab_size, sampling, loss_settings, generator, timer)
        self.feature_model, self.reward_settings, self.pooling = feature_model, reward_settings, pooling

    @classmethod
    def from_config(cls, config, context: ObjectiveContext) -> "EBFT":
        return cls(feature_model=context.feature_model, reward_settings=RewardSettings.of(config),
                   pooling=config.objective.pooling, **cls._common(config, context))

    def experience(self, batch: Batch, policy) -> Experience:
        return self.experiences([batch], policy)[0]

    def experiences(self, batches: list[Batch], policy) -> list[Experience]:
        """Rollouts and features micro-batch by micro-batch, then the rewards of the whole step in
        one call: whitening takes an SVD, which on CUDA waits for the device (torch checks its
        result on the host), so once a step rather than once a micro-batch. Each group's rewards
        are its own, whatever else is in the call."""
        drawn = []
        for batch in batches:
            tokens = self.rollouts(batch, policy)
            with self.timer.phase("features"):
                moments = embed(self.feature_model, self.layout, self.layout.pack(batch.chunk, tokens), self.pooling,
                                doc_ids=batch.doc_ids)
            drawn.append((batch, tokens, moments))
        with self.timer.phase("rewards"):
            scored = block_rewards(torch.cat([moments.coordinates for _, _, moments in drawn]), self.reward_settings,
                                   torch.cat([self.layout.valid_blocks(batch.lengths) for batch, _, _ in drawn]))
            experiences, start = [], 0
            for batch, tokens, moments in drawn:
                part = scored.rows(start, start + len(tokens))
                start += len(tokens)
                experiences.append(Experience(batch, tokens, part.advantage,
                                              reward_metrics(part, moments.gram, self.reward_settings)))
        return experiences

    def flops_per_chunk(self, cost: flops.CostModel) -> float:
        deepest = max(self.feature_model.feature_layers)
        return flops.ebft_step(cost, self.layout, "ours", deepest)["total"]


class RLVR(_RolloutObjective):
    """A verifiable reward per rollout, RLOO advantages."""

    name = "rlvr"

    def __init__(self, layout, vocab_size, sampling, loss_settings, generator, reward: VerifiableReward,
                 timer: Optional[PhaseTimer] = None):
        super().__init__(layout, vocab_size, sampling, loss_settings, generator, timer)
        self.reward = reward

    @classmethod
    def check_setup(cls, config, tokenizer) -> None:
        resolve_reward(config.objective.reward, tokenizer)

    @classmethod
    def from_config(cls, config, context: ObjectiveContext) -> "RLVR":
        """The reward is resolved here, so a bad ``objective.reward`` stops the run before any compute."""
        return cls(reward=resolve_reward(config.objective.reward, context.tokenizer), **cls._common(config, context))

    def experience(self, batch: Batch, policy) -> Experience:
        tokens = self.rollouts(batch, policy)
        with self.timer.phase("rewards"):
            valid = self.layout.valid_blocks(batch.lengths)
            # scored on one rank of the replica: a reward that runs programs could time out on one
            # rank and not another, and the model's shards would then step with different advantages
            scores = once_per_replica(lambda: self.reward(batch.chunk, tokens, self.layout), tokens.shape[:-1])
            count = valid.sum().clamp_min(1)
            metrics = {"reward/verifiable": (scores.mean(-1) * valid).sum() / count}
        return Experience(batch, tokens, verifiable_advantages(scores, valid), metrics)

    def flops_per_chunk(self, cost: flops.CostModel) -> float:
        phases = flops.ebft_step(cost, self.layout, "ours", feature_layers=0)  # no feature network
        return phases["rollouts"] + phases["policy"]


OBJECTIVES = {objective.name: objective for objective in (EBFT, SFT, RLVR)}


def build_objective(config, context: "ObjectiveContext") -> Objective:
    """The objective ``config.objective.mode`` names, with its settings from the validated config."""
    return OBJECTIVES[config.objective.mode].from_config(config, context)
