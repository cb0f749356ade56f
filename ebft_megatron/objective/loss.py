"""Policy losses from one forward of the packed sequence (chunk once, then every rollout).

EBFT (reference §4): L = rl_coef * L_RL + ce_coef * L_CE with
- L_RL = -mean over (chunk, block, sample, step) of advantage_b * log pi_T(y_{b,t} | prefix),
  where pi_T is the policy at the sampling temperature (logits / T);
- L_CE = the ordinary next-token cross entropy on the chunk at T = 1, over its real tokens.
The chunk rows of the packed forward are exactly a causal forward of the chunk (rollout tokens
come after it and it never attends to them), so both terms come from the same logits. Which
logit predicts which rollout token is ``BlockLayout.rollout_predictor_index``.

The reference computes the same with the chunk repeated n times (once per sample copy), as
per-copy means then a batch mean; with equal-size copies that is the same number.

Log-probs come from the model's output through ``models.output``: full vocab-parallel logits, or
the final hidden states with the output layer applied a chunk of rows at a time. Both have megatron's
vocab-parallel cross-entropy semantics; the losses below are written once for either.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ebft_megatron.block_layout import BlockLayout


@dataclass(frozen=True)
class LossSettings:
    rl_coef: float
    ce_coef: float  # gamma
    temperature: float  # the sampling temperature; rollout log-probs use logits / T

    @classmethod
    def of(cls, config) -> "LossSettings":
        return cls(config.objective.rl_coef, config.objective.ce_coef, config.rollout.temperature)


def next_token_nll(output, chunk: torch.Tensor) -> torch.Tensor:
    """[B, P-1] fp32 -log p(x_{k+1} | x_<=k) at T = 1 from the model ``output`` (``models.output``)
    of a forward whose rows 0..P-1 are the chunk."""
    P = chunk.shape[1]
    rows = torch.arange(P - 1, device=chunk.device)
    return -output.token_logprobs(rows, chunk[:, 1:], 1.0)


def real_targets(lengths: torch.Tensor, chunk_len: int) -> torch.Tensor:
    """[B, P-1] bool: the target x[k+1] is a real token, not padding of a short last chunk."""
    return torch.arange(1, chunk_len, device=lengths.device)[None, :] < lengths[:, None]


def chunk_cross_entropy(output, chunk: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Per-chunk mean next-token CE [B] over the real tokens."""
    nll = next_token_nll(output, chunk)
    targets = real_targets(lengths.to(nll.device), chunk.shape[1])
    return (nll * targets).sum(-1) / targets.sum(-1).clamp_min(1)


def rollout_logprobs(output, layout: BlockLayout, rollout_tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """log pi_T of every rollout token [B, NB, n, G] from the packed forward's ``output``: token t
    of (b, i) is predicted by row ``layout.rollout_predictor_index[b, i, t]`` (chunk row a_b - 1
    for t = 0, shared by the n samples; the sample's own row t - 1 after)."""
    if temperature <= 0:
        raise ValueError("rollout log-probs need a sampling temperature > 0 (T = 0 is greedy decoding)")
    B = rollout_tokens.shape[0]
    rows = layout.rollout_predictor_index.reshape(-1)
    logprobs = output.token_logprobs(rows, rollout_tokens.reshape(B, -1), temperature)
    return logprobs.view(rollout_tokens.shape)


ROLLOUT_TERMS = ("loss", "loss/rl", "loss/ce", "rollout_logprob")  # what ebft_loss returns
SFT_TERMS = ("loss", "loss/ce")  # what sft_loss returns


def ebft_loss(output, layout: BlockLayout, chunk, lengths, rollout_tokens, advantages, settings: LossSettings):
    """Returns (loss, terms): loss is the mean over the micro-batch's chunks; terms are detached."""
    logprobs = rollout_logprobs(output, layout, rollout_tokens, settings.temperature)
    rl = -(advantages.to(logprobs.device, logprobs.dtype)[..., None] * logprobs).mean(dim=(1, 2, 3))  # [B]
    ce = chunk_cross_entropy(output, chunk, lengths)
    loss = settings.rl_coef * rl.mean() + settings.ce_coef * ce.mean()
    # clones: megatron's schedule divides the returned loss in place by the number of micro-batches
    return loss, {"loss": loss.detach().clone(), "loss/rl": rl.mean().detach(), "loss/ce": ce.mean().detach(),
                  "rollout_logprob": logprobs.detach().mean()}


def sft_loss(output, chunk, lengths):
    ce = chunk_cross_entropy(output, chunk, lengths).mean()
    return ce, {"loss": ce.detach().clone(), "loss/ce": ce.detach().clone()}
