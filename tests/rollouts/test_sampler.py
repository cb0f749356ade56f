"""The KV-cached rollout engine against the full-recompute reference and independent generation
(single process; the TP/PP versions run in tests/parallel)."""

import pytest
import torch

from benchmarks.reference_sampler import sample_rollouts_recompute
from ebft_megatron.models.attention import BlockAttentionParams
from ebft_megatron.block_layout import BlockLayout, LayoutError
from ebft_megatron.rollouts.sampler import SamplingSettings, sample_rollouts
from ebft_megatron.models import gpt
from ebft_megatron.runtime import pipeline

EDGE_LAYOUTS = {
    "s=G": (24, 4, 4, 4, 3),
    "G=1": (17, 4, 4, 1, 2),
    "s<G": (20, 2, 2, 4, 2),
    "s>G": (24, 3, 6, 3, 2),
    "n=1": (24, 4, 4, 4, 1),
}


@pytest.fixture(scope="module")
def model(tiny_models):
    from tests.fixtures import load_megatron_model

    return load_megatron_model(tiny_models["qwen2"][1])


def _logits(net, arch):
    return lambda out: out[..., : arch.vocab_size]


@pytest.mark.parametrize("name", EDGE_LAYOUTS)
@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.6, 0.9), (0.0, 1.0)])
def test_engine_equals_recompute_with_the_same_random_numbers(model, name, temperature, top_p):
    net, arch = model
    layout = BlockLayout(*EDGE_LAYOUTS[name])
    gen = torch.Generator().manual_seed(3)
    chunk = torch.randint(0, arch.vocab_size, (2, layout.chunk_len), generator=gen)
    uniforms = torch.rand(2, layout.num_blocks, layout.num_samples, layout.rollout_len, generator=gen)
    settings = SamplingSettings(temperature, top_p)
    fast = sample_rollouts(net, layout, chunk, arch.vocab_size, settings, uniforms=uniforms, return_logits=True)
    slow = sample_rollouts_recompute(net, layout, chunk, arch.vocab_size, settings, uniforms=uniforms,
                                     return_logits=True)
    assert fast.tokens.shape == (2, layout.num_blocks, layout.num_samples, layout.rollout_len)
    assert torch.equal(fast.tokens, slow.tokens)
    assert (fast.logits - slow.logits).abs().max() < 1e-5


def test_changing_a_rollout_token_touches_only_its_own_later_logits(model):
    net, arch = model
    layout = BlockLayout(24, 4, 4, 4, 2)
    gen = torch.Generator().manual_seed(5)
    chunk = torch.randint(0, arch.vocab_size, (1, 24), generator=gen)
    rollouts = torch.randint(0, arch.vocab_size, (1, layout.num_blocks, 2, 4), generator=gen)
    params = BlockAttentionParams(layout=layout, mode="packed")
    positions = layout.position_ids[None]
    before = gpt.forward(net, layout.pack(chunk, rollouts), positions, _logits(net, arch), params)
    changed = rollouts.clone()
    block, sample, step = 2, 1, 1
    changed[0, block, sample, step] = (changed[0, block, sample, step] + 1) % arch.vocab_size
    after = gpt.forward(net, layout.pack(chunk, changed), positions, _logits(net, arch), params)
    moved = (before - after).abs().amax(dim=-1)[0] > 0
    expected = torch.zeros(layout.packed_len, dtype=torch.bool)
    start = layout.rollout_index(block, sample, step)
    expected[start:layout.rollout_index(block, sample, layout.rollout_len)] = True
    assert torch.equal(moved, expected)


def test_padded_last_chunk(model):
    net, arch = model
    layout = BlockLayout(24, 4, 4, 4, 2)
    chunk = torch.randint(1, arch.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    lengths = torch.tensor([24, 15])
    chunk[1, 15:] = 0  # pad id
    valid = layout.valid_blocks(lengths)
    assert valid[0].all()
    assert valid[1].tolist() == [True, True, False, False, False]  # windows end at 8, 12, 16 > 15, ...
    out = sample_rollouts(net, layout, chunk, arch.vocab_size, SamplingSettings(1.0, 1.0), torch.Generator().manual_seed(0))
    assert out.tokens.shape == (2, 5, 2, 4)


def test_bad_settings_are_refused(model):
    net, arch = model
    with pytest.raises(LayoutError, match="not divisible by stride"):
        BlockLayout(25, 4, 4, 4, 2)
    with pytest.raises(ValueError, match="chunk_len"):
        sample_rollouts(net, BlockLayout(24, 4, 4, 4, 2), torch.zeros(1, 20, dtype=torch.long),
                        arch.vocab_size, SamplingSettings(0.6, 1.0))


def _document_start(docs, k):
    while k > 0 and docs[k - 1] == docs[k]:
        k -= 1
    return k


@pytest.mark.parametrize("name", EDGE_LAYOUTS)
@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.6, 0.9)])
def test_engine_with_documents_equals_recompute_and_stays_in_documents(model, name, temperature, top_p):
    """Document masking (reference §1.4): the KV-cached engine draws the same tokens from the same
    logits as the dense recompute, and every logit is that of an independent forward of the
    document of the ground-truth token the drawn token is scored against."""
    from tests.test_block_layout import document_ids_with_every_case

    net, arch = model
    layout = BlockLayout(*EDGE_LAYOUTS[name])
    B, NB, n, G = 2, layout.num_blocks, layout.num_samples, layout.rollout_len
    gen = torch.Generator().manual_seed(7)
    chunk = torch.randint(0, arch.vocab_size, (B, layout.chunk_len), generator=gen)
    doc_ids = document_ids_with_every_case(layout, B, seed=sum(EDGE_LAYOUTS[name]))
    uniforms = torch.rand(B, NB, n, G, generator=gen)
    settings = SamplingSettings(temperature, top_p)
    fast = sample_rollouts(net, layout, chunk, arch.vocab_size, settings, uniforms=uniforms, return_logits=True,
                           doc_ids=doc_ids)
    slow = sample_rollouts_recompute(net, layout, chunk, arch.vocab_size, settings, uniforms=uniforms,
                                     return_logits=True, doc_ids=doc_ids)
    assert torch.equal(fast.tokens, slow.tokens)
    assert (fast.logits - slow.logits).abs().max() < 1e-5

    def alone(sequence):
        logits = gpt.forward(net, sequence[None], torch.arange(len(sequence))[None], _logits(net, arch))
        return logits[0, -1]

    worst = 0.0
    for r in range(B):
        docs = doc_ids[r].tolist()
        for b, anchor in enumerate(layout.anchor_positions.tolist()):
            for i in range(n):
                for t in range(G):
                    if t == 0:  # drawn from the chunk row a_b - 1, which sees its own document
                        sequence = chunk[r, _document_start(docs, anchor - 1):anchor]
                    else:  # drawn from rollout token t - 1, which belongs to the document of x[a_b + t - 1]
                        doc = docs[anchor + t - 1]
                        own = [fast.tokens[r, b, i, u] for u in range(t) if docs[anchor + u] == doc]
                        sequence = torch.cat([chunk[r, _document_start(docs, anchor + t - 1):anchor], torch.stack(own)])
                    worst = max(worst, float((fast.logits[r, b, i, t] - alone(sequence)).abs().max()))
    assert worst < 1e-5


def test_a_generation_draws_what_a_step_by_step_sampler_drew(model):
    """The generation's uniforms are drawn in one call before its first forward; a seed still picks
    the numbers a sampler drew one step at a time: step 0 one uniform per (chunk, block, sample),
    then each later step one per (chunk, block, sample), in that order."""
    net, arch = model
    layout = BlockLayout(24, 4, 4, 4, 3)
    B, NB, n, G = 2, layout.num_blocks, layout.num_samples, layout.rollout_len
    chunk = torch.randint(0, arch.vocab_size, (B, layout.chunk_len), generator=torch.Generator().manual_seed(4))
    step_by_step = torch.Generator().manual_seed(11)
    per_step = [torch.rand(B * NB, n, generator=step_by_step).view(B, NB, n)]
    per_step += [torch.rand(B * NB * n, 1, generator=step_by_step).view(B, NB, n) for _ in range(1, G)]
    settings = SamplingSettings(1.0, 1.0)
    expected = sample_rollouts(net, layout, chunk, arch.vocab_size, settings, uniforms=torch.stack(per_step, dim=-1))
    drawn = sample_rollouts(net, layout, chunk, arch.vocab_size, settings, torch.Generator().manual_seed(11))
    assert torch.equal(drawn.tokens, expected.tokens)
    other_seed = sample_rollouts(net, layout, chunk, arch.vocab_size, settings, torch.Generator().manual_seed(12))
    assert not torch.equal(other_seed.tokens, expected.tokens)
