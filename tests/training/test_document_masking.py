"""Document masking: attention stays inside the document a token belongs to (or, for a rollout,
the document of the token it continues), in the mask, the model and a trainer step."""

import torch

from ebft_megatron.rollouts.layout import BlockLayout
from ebft_megatron.objective.objectives import Batch, chunk_inputs, packed_inputs


def test_mask_keeps_attention_inside_documents():
    layout = BlockLayout(16, 4, 4, 4, 2)  # anchors 4, 8, 12
    doc_ids = torch.tensor([[0] * 6 + [1] * 10])  # document 1 starts at position 6
    allowed = layout.dense_attention_mask(doc_ids)[0]
    plain = layout.dense_attention_mask()
    assert allowed[7, :6].sum() == 0 and allowed[7, 6:8].all()  # chunk row 7 sees only doc 1, causally
    assert torch.equal(allowed[:6, :6], plain[:6, :6])  # doc 0 rows: plain causal
    first = layout.rollout_index(0, 0, 0)  # block 0 continues x[3] (doc 0): its prefix x[:4] is all doc 0
    assert torch.equal(allowed[first], plain[first])
    second = layout.rollout_index(1, 1, 2)  # block 1 continues x[7] (doc 1): prefix keys 6, 7 only
    assert allowed[second, :16].nonzero().flatten().tolist() == [6, 7]
    own = layout.rollout_index(1, 1, 0)
    assert allowed[second, own:own + 3].all()  # its own earlier tokens and itself


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
