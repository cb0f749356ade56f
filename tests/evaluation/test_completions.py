"""Prompt completions through the single-block layout, against plain greedy generation."""

import pytest
import torch

from ebft_megatron.evaluation.completions import complete_ids, complete_in_context, completion_layout
from ebft_megatron.rollouts.sampler import SamplingSettings


@pytest.fixture(scope="module")
def loaded(tiny_models):
    from ebft_megatron.data.tokenizers import Tokenizer
    from tests.fixtures import load_megatron_model

    ckpt = tiny_models["llama"][1]  # its greedy answers differ between these prompts (qwen2's do not)
    net, arch = load_megatron_model(ckpt)
    return net, arch.vocab_size, Tokenizer(ckpt / "tokenizer")


def _greedy(net, vocab_size, prompt_ids, steps):
    """Greedy decoding by a full forward of the growing sequence for every token."""
    from ebft_megatron.models.gpt import model_forward

    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(steps):
            tokens = torch.tensor([ids])
            logits = model_forward(net, tokens, torch.arange(len(ids))[None])
            ids.append(int(logits[0, -1, :vocab_size].argmax()))
    return ids[len(prompt_ids):]


def test_layout_is_one_block_at_the_prompt_end():
    layout = completion_layout(prompt_len=11, max_new_tokens=5, num_samples=3)
    assert layout.num_blocks == 1 and layout.anchor_positions.tolist() == [11]
    assert layout.chunk_len == 16 and layout.num_samples == 3 and layout.rollout_len == 5


def test_greedy_completions_equal_plain_greedy_decoding(loaded):
    net, vocab, tokenizer = loaded
    prompt = tokenizer.encode("def add(a, b):\n")
    got = complete_ids(net, prompt, 2, 6, vocab, SamplingSettings(0.0, 1.0), None, pad_id=tokenizer.eos_id)
    expected = _greedy(net, vocab, prompt, 6)
    assert got == [expected, expected]


def test_in_context_prompts_end_at_the_anchor_and_match_one_by_one(loaded):
    """Batched in-context completion gives each prompt what a single completion of the same
    chunk prefix gives (the other rows of the batch change nothing)."""
    net, vocab, tokenizer = loaded
    documents = [("def add(a, b):\n", "    return a + b\n"), ("class Stack:\n", "    pass\n"),
                 ("def pop(self):\n", "    return 1\n")]
    greedy = SamplingSettings(0.0, 1.0)
    batched = complete_in_context(net, tokenizer, documents, [0, 1, 2], 12, 1, 4, vocab, greedy, None, batch_size=3)
    single = complete_in_context(net, tokenizer, documents, [0, 2], 12, 1, 4, vocab, greedy, None, batch_size=1)
    assert len(batched) == 3 and all(len(texts) == 1 for texts in batched)
    assert batched[0] == single[0] and batched[2] == single[1]
    assert batched[0] != batched[2]  # distinct answers, so a mix-up of rows would show
    with pytest.raises(ValueError, match="longer than the anchor"):
        complete_in_context(net, tokenizer, documents, [0], 2, 1, 4, vocab, greedy, None)
