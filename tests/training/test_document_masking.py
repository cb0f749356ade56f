"""Document masking as the reference does it (reference §1.4): a chunk token sees the earlier tokens
of its document; a rollout token belongs to the document of the ground-truth token it is scored
against, x[a_b + t], carries that token's position (positions restart at every document start)
and sees only that document's part of the prefix and of its own earlier tokens. Checked in the
mask, in the model (against independent forwards) and in a trainer step."""

import pytest
import torch

from ebft_megatron.block_layout import BlockLayout
from ebft_megatron.objective.objectives import Batch, chunk_inputs, packed_inputs


def _seen(allowed, row, keys):
    return [k for k in keys if allowed[row, k]]


def test_a_block_that_starts_a_document_sees_no_prefix():
    layout = BlockLayout(16, 4, 4, 4, 2)  # anchors 4, 8, 12
    doc_ids = torch.tensor([[0] * 8 + [1] * 8])  # document 1 starts at the anchor of block 1
    allowed = layout.dense_attention_mask(doc_ids)[0]
    positions = layout.batch_position_ids(1, doc_ids)[0]
    assert positions[:16].tolist() == list(range(8)) * 2
    for i in range(2):
        for t in range(4):
            # block 1 is scored against x[8..11] (document 1): no prefix key, positions 0..3
            row = layout.rollout_index(1, i, t)
            assert _seen(allowed, row, range(16)) == []
            assert int(positions[row]) == t
            own = layout.rollout_index(1, i, 0)
            assert _seen(allowed, row, range(16, layout.packed_len)) == list(range(own, row + 1))
            # block 0 is scored against x[4..7] (document 0): prefix x[0..3], positions 4..7
            row = layout.rollout_index(0, i, t)
            assert _seen(allowed, row, range(16)) == [0, 1, 2, 3]
            assert int(positions[row]) == 4 + t
            # block 2 is scored against x[12..15] (document 1): prefix x[8..11], positions 4..7
            row = layout.rollout_index(2, i, t)
            assert _seen(allowed, row, range(16)) == [8, 9, 10, 11]
            assert int(positions[row]) == 4 + t


def test_a_window_that_crosses_a_document_boundary():
    layout = BlockLayout(16, 4, 4, 4, 2)
    doc_ids = torch.tensor([[0] * 6 + [1] * 10])  # document 1 starts at 6, inside block 0's window x[4..7]
    allowed = layout.dense_attention_mask(doc_ids)[0]
    positions = layout.batch_position_ids(1, doc_ids)[0]
    assert positions[:16].tolist() == list(range(6)) + list(range(10))
    assert _seen(allowed, 7, range(16)) == [6, 7]  # chunk row 7 sees only document 1, causally
    own = [layout.rollout_index(0, 1, t) for t in range(4)]
    # steps 0, 1 (scored against x[4], x[5], document 0): the prefix x[0..3], positions 4, 5
    for t in (0, 1):
        assert _seen(allowed, own[t], range(16)) == [0, 1, 2, 3]
        assert _seen(allowed, own[t], range(16, layout.packed_len)) == own[:t + 1]
        assert int(positions[own[t]]) == 4 + t
    # steps 2, 3 (x[6], x[7], document 1, which starts after the anchor): no prefix key, only
    # their own tokens from step 2 on, positions 0, 1
    for t in (2, 3):
        assert _seen(allowed, own[t], range(16)) == []
        assert _seen(allowed, own[t], range(16, layout.packed_len)) == own[2:t + 1]
        assert int(positions[own[t]]) == t - 2
    # block 1 (x[8..11], document 1): prefix keys 6, 7, positions 2..5
    row = layout.rollout_index(1, 1, 2)
    assert _seen(allowed, row, range(16)) == [6, 7]
    assert positions[layout.rollout_index(1, 1, 0):layout.rollout_index(1, 1, 4)].tolist() == [2, 3, 4, 5]


def _set_implementation(model, implementation):
    from ebft_megatron.models.attention import BlockCoreAttention

    for module in model.modules():
        if isinstance(module, BlockCoreAttention):
            module.set_implementation(implementation)


def _document_start(docs, k):
    while k > 0 and docs[k - 1] == docs[k]:
        k -= 1
    return k


@pytest.mark.parametrize("implementation", ["fused", "generic"])
def test_every_row_equals_an_independent_forward_of_its_document(tiny_models, implementation):
    """The consequence of the rule: the logits of chunk token k equal those of a plain causal forward
    of x[start(doc(k)) : k + 1], and the logits of rollout token (b, i, t) those of a plain causal
    forward of x[start(D) : a_b] (empty when D starts at or after a_b) followed by the rollout's
    tokens t' <= t of D, D the document of x[a_b + t], positions from 0."""
    from ebft_megatron.models.gpt import model_forward
    from tests.fixtures import load_megatron_model

    model, arch = load_megatron_model(tiny_models["qwen2"][1])
    layout = BlockLayout(16, 4, 4, 4, 2)
    doc_ids = torch.tensor([[0] * 8 + [1] * 8, [0] * 6 + [1] * 10, [0] * 3 + [1] * 7 + [2] * 6])
    B = len(doc_ids)
    gen = torch.Generator().manual_seed(6)
    chunk = torch.randint(0, arch.vocab_size, (B, 16), generator=gen)
    rollouts = torch.randint(0, arch.vocab_size, (B, layout.num_blocks, 2, 4), generator=gen)

    def logits(tokens, positions, **kw):
        with torch.no_grad():
            return model_forward(model, tokens, positions, **kw)[..., : arch.vocab_size]

    _set_implementation(model, implementation)
    try:
        tokens, positions, params, mask = packed_inputs(layout, Batch(chunk, torch.tensor([16] * B), doc_ids), rollouts)
        params.return_hidden = False
        packed = logits(tokens, positions, attention_mask=mask, block_params=params)
    finally:
        _set_implementation(model, "fused")

    def alone(sequence):
        return logits(sequence[None], torch.arange(len(sequence))[None])[0, -1]

    worst = 0.0
    for r in range(B):
        docs = doc_ids[r].tolist()
        for k in range(16):
            expected = alone(chunk[r, _document_start(docs, k):k + 1])
            worst = max(worst, float((packed[r, k] - expected).abs().max()))
        for b, anchor in enumerate(layout.anchor_positions.tolist()):
            for i in range(2):
                for t in range(4):
                    doc = docs[anchor + t]
                    start = _document_start(docs, anchor + t)
                    own = [rollouts[r, b, i, u] for u in range(t + 1) if docs[anchor + u] == doc]
                    sequence = torch.cat([chunk[r, start:anchor], torch.stack(own)])
                    got = packed[r, layout.rollout_index(b, i, t)]
                    worst = max(worst, float((got - alone(sequence)).abs().max()))
    assert worst < 1e-5


def test_other_documents_do_not_change_the_logits(tiny_models):
    from ebft_megatron.models.gpt import model_forward
    from tests.fixtures import load_megatron_model

    model, arch = load_megatron_model(tiny_models["qwen2"][1])
    layout = BlockLayout(16, 4, 4, 4, 2)
    gen = torch.Generator().manual_seed(4)
    chunk = torch.randint(0, arch.vocab_size, (1, 16), generator=gen)
    rollouts = torch.randint(0, arch.vocab_size, (1, layout.num_blocks, 2, 4), generator=gen)
    doc_ids = torch.tensor([[0] * 6 + [1] * 10])

    def logits(chunk_tokens):
        batch = Batch(chunk_tokens, torch.tensor([16]), doc_ids)
        tokens, positions, params, mask = packed_inputs(layout, batch, rollouts)
        with torch.no_grad():
            return model_forward(model, tokens, positions, attention_mask=mask, block_params=params)[..., : arch.vocab_size]

    changed = chunk.clone()
    changed[0, :6] = (changed[0, :6] + 1) % arch.vocab_size  # rewrite document 0
    before, after = logits(chunk), logits(changed)
    doc1_rows = torch.cat([torch.arange(6, 16), torch.arange(layout.rollout_index(1, 0, 0), layout.packed_len)])
    assert (before[0, doc1_rows] - after[0, doc1_rows]).abs().max() < 1e-5
    assert (before[0, :6] - after[0, :6]).abs().max() > 1e-3  # document 0 itself did change


def test_sft_forward_keeps_attention_inside_documents(tiny_models):
    """The SFT forward (the chunk alone) with document masking: a document's logits do not depend on
    the documents before it."""
    from ebft_megatron.models.gpt import model_forward
    from tests.fixtures import load_megatron_model

    model, arch = load_megatron_model(tiny_models["qwen2"][1])
    layout = BlockLayout(16, 4, 4, 4, 2)
    chunk = torch.randint(0, arch.vocab_size, (1, 16), generator=torch.Generator().manual_seed(5))
    doc_ids = torch.tensor([[0] * 6 + [1] * 10])

    def logits(chunk_tokens, docs=doc_ids):
        tokens, positions, params, mask = chunk_inputs(layout, Batch(chunk_tokens, torch.tensor([16]), docs))
        params.return_hidden = False
        with torch.no_grad():
            return model_forward(model, tokens, positions, attention_mask=mask, block_params=params)[..., : arch.vocab_size]

    changed = chunk.clone()
    changed[0, :6] = (changed[0, :6] + 1) % arch.vocab_size  # rewrite document 0
    before, after = logits(chunk), logits(changed)
    assert (before[0, 6:] - after[0, 6:]).abs().max() < 1e-5
    assert (before[0, :6] - after[0, :6]).abs().max() > 1e-3
    unmasked = logits(chunk, None)  # without document ids: document 1 does see document 0
    assert (before[0, 6:] - unmasked[0, 6:]).abs().max() > 1e-3
    assert (before[0, :6] - unmasked[0, :6]).abs().max() < 1e-5


def test_a_trainer_step_with_document_masking(tiny_models, tmp_path):
    from ebft_megatron.config import load_config
    from ebft_megatron.training.loop import Trainer
    from tests.training.common import make_code_folder, tiny_overrides

    code = make_code_folder(tmp_path / "code")
    config = load_config(None, tiny_overrides(tiny_models["llama"][1], code, "", steps=1,
                                              **{"data.document_masking": "true"}))
    trainer = Trainer(config)
    metrics = trainer.train_step()
    assert torch.isfinite(torch.tensor(metrics["loss"])) and "reward/alignment" in metrics
