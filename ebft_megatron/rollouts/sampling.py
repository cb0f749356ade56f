"""Token sampling from logits, as the reference does it (fp32 logits / T, optional top-p), but
with an exact inverse-CDF draw: one uniform number per row instead of ``torch.multinomial``'s
one per vocabulary entry on CPU. Same distribution, reproducible from a ``torch.Generator``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch



@dataclass(frozen=True)
class SamplingSettings:
    temperature: float
    top_p: float
    # replay one captured decode step as a CUDA graph where that is possible (rollouts.sampler)
    cuda_graphs: bool = False

    @classmethod
    def of(cls, config) -> "SamplingSettings":
        return cls(config.rollout.temperature, config.rollout.top_p, config.rollout.cuda_graphs)

def sample_tokens(
    logits: torch.Tensor,
    temperature: float,
    top_p: float = 1.0,
    generator: Optional[torch.Generator] = None,
    uniforms: Optional[torch.Tensor] = None,
    num_samples: Optional[int] = None,
    overwrite_logits: bool = False,
) -> torch.Tensor:
    """logits [..., V] -> token ids [...] (or [..., num_samples] independent draws per row).
    ``temperature == 0`` is greedy.

    ``uniforms`` ([...] or [..., num_samples], in [0, 1)) may be given to drive the draw
    explicitly; tests use this to make two samplers draw from the same random numbers.
    ``overwrite_logits`` lets the draw reuse the logits' memory (a [rows, 49k] fp32 buffer costs
    more to allocate and fault in than to compute on).
    """
    draws = num_samples or 1
    if temperature == 0:
        tokens = logits.argmax(dim=-1)
        return tokens if num_samples is None else tokens.unsqueeze(-1).expand(*tokens.shape, draws)
    shape = logits.shape[:-1] if num_samples is None else (*logits.shape[:-1], draws)
    if uniforms is None:
        # drawn where the generator lives (the trainer's is a CPU one), so a seed gives the same
        # numbers on every device
        device = generator.device if generator is not None else logits.device
        uniforms = torch.rand(logits[..., 0].numel(), draws, generator=generator, device=device)
    uniforms = uniforms.reshape(-1, draws).float().to(logits.device)
    # Unnormalised probabilities exp((l - max) / T) in one buffer, then their running sum: the
    # draw is the first index whose running sum exceeds u * total (exact inverse CDF).
    weights = logits.reshape(-1, logits.shape[-1]).float()
    if not (overwrite_logits and weights.dtype == logits.dtype and weights.is_contiguous()):
        weights = weights.clone()
    weights.sub_(weights.amax(dim=-1, keepdim=True)).mul_(1.0 / temperature).exp_()
    if top_p < 1.0:
        sorted_weights, order = weights.sort(dim=-1, descending=True)
        cdf = sorted_weights.cumsum(dim=-1)
        before = (cdf - sorted_weights) / cdf[:, -1:]
        sorted_weights = sorted_weights.masked_fill(before > top_p, 0.0)  # the top token always stays
        cdf = sorted_weights.cumsum(dim=-1)
        tokens = order.gather(-1, _inverse_cdf(cdf, uniforms))
    else:
        tokens = _inverse_cdf(torch.cumsum(weights, dim=-1, out=weights), uniforms)
    return tokens.reshape(shape)


def _inverse_cdf(cdf: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """The first index whose running sum exceeds u * total: its running sum is above its
    predecessor's, so a token of probability 0 (or one too small to move the running sum) is never
    drawn. For u < 1, u * total stays below the total in fp32; the target is kept below it for a
    uniform of 1 too (explicit uniforms may hold one), so no index past the end is returned."""
    total = cdf[:, -1:]
    target = torch.minimum(uniforms * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True)
