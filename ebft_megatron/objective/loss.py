"""Policy losses from one forward of the packed sequence (chunk once, then every rollout).

EBFT (spec §4): L = rl_coef * L_RL + ce_coef * L_CE with
- L_RL = -mean over (chunk, block, sample, step) of advantage_b * log pi_T(y_{b,t} | prefix),
  where pi_T is the policy at the sampling temperature (logits / T);
- L_CE = the ordinary next-token cross entropy on the chunk at T = 1, over its real tokens.
The chunk rows of the packed forward are exactly a causal forward of the chunk (rollout tokens
come after it and it never attends to them), so both terms come from the same logits. Which
logit predicts which rollout token is ``BlockLayout.rollout_predictor_index``.

The reference computes the same with the chunk repeated n times (once per sample copy), as
per-copy means then a batch mean; with equal-size copies that is the same number.

Logits are vocab-parallel ([..., V/TP]); log-probs use megatron's vocab-parallel cross entropy,
which overwrites its input in place, so every call gets a tensor of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ebft_megatron.rollouts.layout import BlockLayout


@dataclass(frozen=True)
class LossSettings:
    rl_coef: float = 1.0
    ce_coef: float = 0.03  # gamma
    temperature: float = 0.6  # the sampling temperature; rollout log-probs use logits / T


def token_logprobs(owned_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] for vocab-parallel logits [..., V/TP]. ``owned_logits`` is
    overwritten (megatron computes the softmax in its buffer), so pass a tensor nobody else uses."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    return -vocab_parallel_cross_entropy(owned_logits.contiguous(), targets)


def next_token_nll(logits: torch.Tensor, chunk: torch.Tensor) -> torch.Tensor:
    """[B, P-1] -log p(x_{k+1} | x_<=k) at T = 1; ``logits`` [B, >=P, V/TP] rows 0..P-2 are
    consumed (overwritten), so call this after every other use of those rows."""
    P = chunk.shape[1]
    return -token_logprobs(logits[:, : P - 1], chunk[:, 1:].to(logits.device))


def real_targets(lengths: torch.Tensor, chunk_len: int) -> torch.Tensor:
    """[B, P-1] bool: the target x[k+1] is a real token, not padding of a short last chunk."""
    return torch.arange(1, chunk_len, device=lengths.device)[None, :] < lengths[:, None]


def chunk_cross_entropy(logits: torch.Tensor, chunk: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Per-chunk mean next-token CE [B] over the real tokens (consumes logits rows 0..P-2)."""
    nll = next_token_nll(logits, chunk)
    targets = real_targets(lengths.to(nll.device), chunk.shape[1])
    return (nll * targets).sum(-1) / targets.sum(-1).clamp_min(1)


def rollout_logprobs(logits: torch.Tensor, layout: BlockLayout, rollout_tokens: torch.Tensor,
                     temperature: float) -> torch.Tensor:
    """log pi_T of every rollout token [B, NB, n, G] from the packed forward's logits [B, S, V/TP].

    Step 0 of block b is predicted by chunk row a_b - 1 (shared by the n samples); step t >= 1 by
    the sample's own row t - 1. Each part is divided by T into a fresh tensor."""
    if temperature <= 0:
        raise ValueError("rollout log-probs need a sampling temperature > 0 (T = 0 is greedy decoding)")
    B = logits.shape[0]
    P, NB, n, G = layout.chunk_len, layout.num_blocks, layout.num_samples, layout.rollout_len
    anchor_rows = (layout.anchor_positions - 1).to(logits.device)
    first = logits.index_select(1, anchor_rows).div(temperature)  # [B, NB, V/TP]
    first = first[:, :, None].expand(B, NB, n, first.shape[-1])
    parts = [token_logprobs(first, rollout_tokens[..., 0])[..., None]]
    if G > 1:
        own = logits[:, P:].unflatten(1, (NB, n, G))[:, :, :, : G - 1].div(temperature)
        parts.append(token_logprobs(own, rollout_tokens[..., 1:]))
    return torch.cat(parts, dim=-1)


def ebft_loss(logits, layout: BlockLayout, chunk, lengths, rollout_tokens, advantages, settings: LossSettings):
    """Returns (loss, terms): loss is the mean over the micro-batch's chunks; terms are detached."""
    logprobs = rollout_logprobs(logits, layout, rollout_tokens, settings.temperature)
    rl = -(advantages.to(logprobs.dtype)[..., None] * logprobs).mean(dim=(1, 2, 3))  # [B]
    ce = chunk_cross_entropy(logits, chunk, lengths)
    loss = settings.rl_coef * rl.mean() + settings.ce_coef * ce.mean()
    # clones: megatron's schedule divides the returned loss in place by the number of micro-batches
    return loss, {"loss": loss.detach().clone(), "loss/rl": rl.mean().detach(), "loss/ce": ce.mean().detach(),
                  "rollout_logprob": logprobs.detach().mean()}


def sft_loss(logits, chunk, lengths):
    ce = chunk_cross_entropy(logits, chunk, lengths).mean()
    return ce, {"loss": ce.detach().clone(), "loss/ce": ce.detach().clone()}
