"""Sampled completions of a text prompt, for the downstream evaluations (HumanEval, unit tests).

A prompt completion is the block layout with a single block: the prompt is the chunk's prefix,
the one anchor sits at its end, and the n samples are that block's rollouts. So completions come
from the same KV-cached sampler as training rollouts (one prefill, then one batched decode step per
token for all samples) instead of a full forward per generated token.
"""

from __future__ import annotations

from typing import Optional

import torch

from ebft_megatron.block_layout import BlockLayout
from ebft_megatron.data.packing import pack_aligned
from ebft_megatron.rollouts.sampler import SamplingSettings, sample_rollouts
from ebft_megatron.runtime import device


def completion_layout(prompt_len: int, max_new_tokens: int, num_samples: int) -> BlockLayout:
    """One block anchored at the prompt's end: its ``num_samples`` rollouts are the completions."""
    return BlockLayout(chunk_len=prompt_len + max_new_tokens, first_anchor=prompt_len, stride=1,
                       rollout_len=max_new_tokens, num_samples=num_samples)


def complete_ids(model, prompt_ids: list[int], num_samples: int, max_new_tokens: int, vocab_size: int,
                 sampling: SamplingSettings, generator: Optional[torch.Generator], pad_id: int) -> list[list[int]]:
    """``num_samples`` continuations of ``prompt_ids``, each ``max_new_tokens`` ids long.
    Collective over the model's ranks (pipeline stages)."""
    if not prompt_ids:
        raise ValueError("the prompt is empty; a completion needs at least one token to continue")
    layout = completion_layout(len(prompt_ids), max_new_tokens, num_samples)
    # The chunk's tail after the anchor is never attended by the rollouts; it only fills the shape.
    chunk = torch.tensor([list(prompt_ids) + [pad_id] * max_new_tokens], dtype=torch.long, device=device.current())
    with torch.no_grad():
        rollouts = sample_rollouts(model, layout, chunk, vocab_size, sampling, generator)
    return rollouts.tokens[0, 0].tolist()


def complete_text(model, tokenizer, prompt: str, num_samples: int, max_new_tokens: int, vocab_size: int,
                  sampling: SamplingSettings, generator: Optional[torch.Generator]) -> list[str]:
    """Decoded continuations of ``prompt``, each cut before its first EOS."""
    eos = tokenizer.eos_id
    texts = []
    for ids in complete_ids(model, tokenizer.encode(prompt), num_samples, max_new_tokens, vocab_size, sampling,
                            generator, pad_id=eos):
        if eos is not None and eos in ids:
            ids = ids[:ids.index(eos)]
        texts.append(tokenizer.decode(ids))
    return texts


def complete_in_context(model, tokenizer, documents: list[tuple[str, str]], which: list[int], anchor: int,
                        num_samples: int, max_new_tokens: int, vocab_size: int, sampling: SamplingSettings,
                        generator: Optional[torch.Generator], batch_size: int = 16) -> list[list[str]]:
    """Completions of the prompts of ``documents[i]`` for i in ``which``, many prompts per forward.

    Each prompt is placed as in training chunks with ``data.response_anchor`` (``pack_aligned``):
    it ends at token ``anchor``, and the tokens before it are the end of the documents before it
    in ``documents`` (prompt + response: in-context examples). All prompts then share one anchor,
    so ``batch_size`` of them decode together, and a decode step reads the weights once for
    ``batch_size * num_samples`` rows instead of ``num_samples`` (decoding a few rows is bound by
    memory bandwidth; ``benchmarks/completions.py`` measures the gain).

    Raises ValueError when one of the prompts is longer than ``anchor`` tokens."""
    eos = tokenizer.eos_id
    prompts = [tokenizer.encode(prompt) for prompt, _ in documents]
    responses = [tokenizer.encode(response) for _, response in documents]
    too_long = [i for i in which if len(prompts[i]) > anchor]
    if too_long:
        raise ValueError(f"{len(too_long)} prompt(s) are longer than the anchor of {anchor} tokens (the first: "
                         f"document {too_long[0]}, {len(prompts[too_long[0]])} tokens); raise the anchor or leave "
                         "them out")
    packed = pack_aligned([p + r for p, r in zip(prompts, responses)], eos, anchor + max_new_tokens,
                          [len(p) for p in prompts], anchor)
    layout = completion_layout(anchor, max_new_tokens, num_samples)
    texts: list[list[str]] = []
    for start in range(0, len(which), batch_size):
        rows = torch.as_tensor(which[start:start + batch_size], dtype=torch.long)
        with torch.no_grad():
            tokens = sample_rollouts(model, layout, device.to_device(packed.tokens[rows]), vocab_size, sampling,
                                     generator).tokens
        for row in tokens[:, 0].tolist():  # [n, G] per prompt
            texts.append([tokenizer.decode(ids[:ids.index(eos)] if eos in ids else ids) for ids in row])
    return texts
