"""EBFT rewards, the RLOO baseline and the feature-matching metrics.

Input: per (chunk, block) group the n+1 pooled features, ground truth at index 0 and the n samples
at 1..n, as rows of any width with the right inner products: the feature network hands over their
coordinates in an orthonormal basis of their span ((n+1) x (n+1), ``features.FeatureMoments``),
which have exactly the features' inner products and singular values, so the rewards run
identically on every rank after the pipeline reduction with no feature vectors gathered.

Reference §2-3 (the reference's code), per group with samples phi_i and ground truth g:
- optional whitening across the n samples: X = U S V^T (thin SVD of the n x D sample matrix),
  W = U diag(1/(S + 1e-12)) U^T keeping singular values above ``whiten_threshold`` * S_max;
  whitened samples W X and whitened ground truth rows c_i * g with c = W 1. The SVD is of the
  sample rows themselves (float64), not an eigendecomposition of their Gram matrix, which would
  square the condition number: nearly duplicated samples stay accurate to ~1e-15;
- alignment a_i = cos(phi_i, g_i), each norm clamped at 1e-8 on its own as
  ``torch.nn.functional.cosine_similarity`` does; diversity d_i = 1/(n-1) sum_{j != i} phi_i . phi_j;
- reward r_i = 2 alpha a_i - 2 beta d_i;
- RLOO baseline b_i = alpha (sum_{j != i} A_j)/(n-1) - beta (sum_j D_j - 2 D_i)/(n-2) with
  A = 2a, D = 2d (diversity part 0 when n <= 2 or beta = 0); advantage = r - b.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import torch

COSINE_EPS = 1e-8  # as torch.nn.functional.cosine_similarity, which the reference uses


WHITEN_THRESHOLD = 1e-5  # singular values below this fraction of the largest are dropped (the reference's)


@dataclass(frozen=True)
class RewardSettings:
    alignment_coef: float  # alpha
    diversity_coef: float  # beta
    whiten: bool
    whiten_threshold: float = WHITEN_THRESHOLD

    @classmethod
    def of(cls, config) -> "RewardSettings":
        o = config.objective
        return cls(o.alignment_coef, o.diversity_coef, o.whiten)


@dataclass
class BlockRewards:
    """Per (chunk, block, sample) tensors [B, NB, n]; ``valid`` [B, NB] marks blocks whose
    ground-truth window lies in real (unpadded) tokens: the others get zero advantage."""

    alignment: torch.Tensor
    diversity: torch.Tensor
    reward: torch.Tensor
    baseline: torch.Tensor
    advantage: torch.Tensor
    valid: torch.Tensor

    def rows(self, start: int, stop: int) -> "BlockRewards":
        """The chunks ``start:stop`` of the batch."""
        return BlockRewards(*(getattr(self, f.name)[start:stop] for f in fields(self)))


def whiten_samples(samples: torch.Tensor, threshold: float = WHITEN_THRESHOLD):
    """X [..., n, D] -> (W X [..., n, D], c = W 1 [..., n]) for W = U diag(1/(S + 1e-12)) U^T, X = U S V^T."""
    U, S, Vh = torch.linalg.svd(samples, full_matrices=False)
    keep = S > threshold * S.amax(dim=-1, keepdim=True)
    inverse = torch.where(keep, 1.0 / (S + 1e-12), torch.zeros_like(S))
    whitened = (U * (S * inverse)[..., None, :]) @ Vh  # = W X, without forming W X's cancellations
    c = (U * inverse[..., None, :]) @ U.sum(dim=-2)[..., :, None]  # W 1 = U diag(inv) U^T 1
    return whitened, c[..., 0]


def alignment_and_diversity(features: torch.Tensor, whiten: bool, threshold: float = WHITEN_THRESHOLD):
    """features [..., n+1, D] (ground truth first) -> (a, d), each [..., n]."""
    features = features.double()
    n = features.shape[-2] - 1
    truth, samples = features[..., :1, :], features[..., 1:, :]
    if whiten:
        samples, c = whiten_samples(samples, threshold)
        truth = c[..., None] * truth  # row i: c_i g
    dot = (samples * truth).sum(-1)
    sample_norm = samples.norm(dim=-1).clamp_min(COSINE_EPS)
    truth_norm = truth.norm(dim=-1).clamp_min(COSINE_EPS)
    alignment = dot / (sample_norm * truth_norm)
    K = samples @ samples.transpose(-1, -2)
    diversity = (K.sum(-1) - torch.diagonal(K, dim1=-2, dim2=-1)) / max(n - 1, 1)
    return alignment, diversity


def rloo_baseline(A: torch.Tensor, D: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """Leave-one-out baseline over the last axis (the n samples); A = 2a, D = 2d."""
    n = A.shape[-1]
    if n < 2:
        return torch.zeros_like(A)
    baseline = alpha * (A.sum(-1, keepdim=True) - A) / (n - 1)
    if n > 2 and beta != 0:
        baseline = baseline - beta * (D.sum(-1, keepdim=True) - 2 * D) / (n - 2)
    return baseline


def block_rewards(features: torch.Tensor, settings: RewardSettings,
                  valid: Optional[torch.Tensor] = None) -> BlockRewards:
    """features [B, NB, n+1, D] (ground truth first) -> rewards and RLOO advantages per (chunk,
    block, sample)."""
    a, d = alignment_and_diversity(features, settings.whiten, settings.whiten_threshold)
    A, D = 2 * a, 2 * d
    reward = settings.alignment_coef * A - settings.diversity_coef * D
    baseline = rloo_baseline(A, D, settings.alignment_coef, settings.diversity_coef)
    if valid is None:
        valid = torch.ones(features.shape[:-2], dtype=torch.bool, device=features.device)
    advantage = torch.where(valid[..., None], reward - baseline, torch.zeros_like(reward))
    return BlockRewards(a, d, reward, baseline, advantage, valid)


def cfm_loss(gram: torch.Tensor) -> torch.Tensor:
    """Unbiased estimate of the conditional feature-matching loss ||E phi(c:y) - phi(c:y*)||^2
    per group, from the unwhitened Gram [..., n+1, n+1] (reference §5.2):
    1/(n(n-1)) sum_{i != j} phi_i.phi_j - 2/n sum_i phi_i.g + g.g."""
    gram = gram.double()
    n = gram.shape[-1] - 1
    K = gram[..., 1:, 1:]
    cross = (K.sum((-1, -2)) - torch.diagonal(K, dim1=-2, dim2=-1).sum(-1)) / (n * (n - 1))
    return cross - 2.0 / n * gram[..., 1:, 0].sum(-1) + gram[..., 0, 0]


def reward_metrics(rewards: BlockRewards, gram: torch.Tensor, settings: RewardSettings) -> dict[str, torch.Tensor]:
    """Means over valid groups, with the reference's metric names where they exist (reference §5.2),
    as 0-dim device tensors: the trainer reads a step's figures from the device once."""
    valid = rewards.valid
    count = valid.sum().clamp_min(1)

    def mean(per_sample: torch.Tensor) -> torch.Tensor:
        return (per_sample.mean(-1) * valid).sum() / count

    A, D = 2 * rewards.alignment, 2 * rewards.diversity
    return {
        "reward/alignment": mean(A),  # reward_pass1_gt
        "reward/diversity": mean(D),  # reward_pass1_diversity
        "reward/total": mean(rewards.reward),  # reward_pass1
        "reward/effective": mean(settings.alignment_coef * A - settings.diversity_coef * D / 2),
        "reward/advantage_abs": mean(rewards.advantage.abs()),
        "cfm": (cfm_loss(gram) * valid).sum() / count,
    }
