"""Token sampling from logits, as the reference does it (fp32 logits / T, optional top-p), but
with an exact inverse-CDF draw: one uniform number per row instead of ``torch.multinomial``'s
one per vocabulary entry on CPU. Same distribution, reproducible from a ``torch.Generator``.
"""

from __future__ import annotations

from typing import Optional

import torch


def sample_tokens(
    logits: torch.Tensor,
    temperature: float,
    top_p: float = 1.0,
    generator: Optional[torch.Generator] = None,
    uniforms: Optional[torch.Tensor] = None,
    num_samples: Optional[int] = None,
) -> torch.Tensor:
    """logits [..., V] -> token ids [...] (or [..., num_samples] independent draws per row).
    ``temperature == 0`` is greedy.

    ``uniforms`` ([...] or [..., num_samples], in [0, 1)) may be given to drive the draw
    explicitly; tests use this to make two samplers draw from the same random numbers.
    """
    draws = num_samples or 1
    if temperature == 0:
        tokens = logits.argmax(dim=-1)
        return tokens if num_samples is None else tokens.unsqueeze(-1).expand(*tokens.shape, draws)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    shape = probs.shape[:-1] if num_samples is None else (*probs.shape[:-1], draws)
    probs = probs.reshape(-1, probs.shape[-1])
    if uniforms is None:
        uniforms = torch.rand(probs.shape[0], draws, generator=generator, device=probs.device)
    uniforms = uniforms.reshape(-1, draws).to(probs.dtype)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(before > top_p, 0.0)  # the top token always stays
        cdf = sorted_probs.cumsum(dim=-1)
        pick = torch.searchsorted(cdf, uniforms * cdf[:, -1:], right=True).clamp_(max=probs.shape[-1] - 1)
        tokens = order.gather(-1, pick)
    else:
        cdf = probs.cumsum(dim=-1)
        tokens = torch.searchsorted(cdf, uniforms * cdf[:, -1:], right=True).clamp_(max=probs.shape[-1] - 1)
        # a token of probability 0 can only be hit through rounding at its cdf step; move off it
        tokens = torch.where(probs.gather(-1, tokens) > 0, tokens, probs.argmax(dim=-1, keepdim=True).expand_as(tokens))
    return tokens.reshape(shape)
