"""The feature-matching curve under document masking: rollouts and features follow the chunks'
documents (reference §1.4), so ground-truth rollouts still give zero CFM when a block's window
starts or crosses a document."""

import pytest
import torch

from ebft_megatron.data.packing import PackedChunks
from ebft_megatron.evaluation import feature_matching as feature_matching_module
from ebft_megatron.evaluation import feature_matching_by_length, feature_matching_curve
from ebft_megatron.block_layout import BlockLayout
from ebft_megatron.rollouts.sampler import SamplingSettings

LAYOUT = BlockLayout(chunk_len=16, first_anchor=4, stride=4, rollout_len=4, num_samples=3)  # anchors 4, 8, 12
# block 1 starts document 1 in the first chunk; block 0's window crosses into document 1 in the
# second; the third has three documents
DOC_IDS = torch.tensor([[0] * 8 + [1] * 8, [0] * 6 + [1] * 10, [0] * 3 + [1] * 7 + [2] * 6])


@pytest.fixture(scope="module")
def chunks(qwen2_policy):
    tokens = torch.randint(1, qwen2_policy[1].vocab_size, (3, 16), generator=torch.Generator().manual_seed(19))
    return PackedChunks(tokens, torch.tensor([16, 16, 16]), DOC_IDS.clone())


def _ground_truth(chunk):
    windows = chunk[:, LAYOUT.ground_truth_windows]  # [B, NB, G]
    return windows[:, :, None].expand(-1, -1, LAYOUT.num_samples, -1).clone()


@pytest.mark.parametrize("pooling", ["last_token", "mean"])
def test_ground_truth_rollouts_give_zero_cfm_with_documents(qwen2_features, chunks, pooling, monkeypatch):
    seen, embedded = [], []

    def rollouts_of(chunk, doc_ids):
        seen.append(doc_ids)
        return _ground_truth(chunk)

    embed = feature_matching_module.embed
    monkeypatch.setattr(feature_matching_module, "embed",
                        lambda *a, doc_ids=None, **kw: embedded.append(doc_ids) or embed(*a, doc_ids=doc_ids, **kw))
    curve = feature_matching_curve(qwen2_features, LAYOUT, chunks, rollouts_of, pooling, micro_batch_size=2,
                                   document_masking=True)
    assert torch.equal(torch.cat(seen), DOC_IDS) and torch.equal(torch.cat(embedded), DOC_IDS)
    assert curve.groups == 9
    assert max(abs(value) for value in curve.cfm) < 1e-8
    assert all(abs(value - 2.0) < 1e-6 for value in curve.alignment)


def test_sampled_curve_passes_the_documents_to_the_sampler(qwen2_policy, qwen2_features, chunks, monkeypatch):
    model, arch, _ = qwen2_policy
    sample = feature_matching_module.sample_rollouts
    seen = []
    monkeypatch.setattr(feature_matching_module, "sample_rollouts",
                        lambda *a, doc_ids=None, **kw: seen.append(doc_ids) or sample(*a, doc_ids=doc_ids, **kw))
    curve = feature_matching_by_length(model, qwen2_features, LAYOUT, chunks, arch.vocab_size,
                                       SamplingSettings(1.0, 1.0), torch.Generator().manual_seed(2),
                                       micro_batch_size=3, document_masking=True)
    assert torch.equal(torch.cat(seen), DOC_IDS)
    assert curve.groups == 9 and curve.cfm[-1] > 1e-3
    feature_matching_by_length(model, qwen2_features, LAYOUT, chunks, arch.vocab_size, SamplingSettings(1.0, 1.0),
                               torch.Generator().manual_seed(2), micro_batch_size=3)
    assert seen[-1] is None  # without document masking the sampler gets no documents


def test_the_run_evaluation_follows_the_document_masking_setting(qwen2_policy, qwen2_features, chunks, monkeypatch):
    """``evaluate_run`` (what the trainer and ``evaluate`` report) hands ``data.document_masking``
    to both the validation CE and the feature-matching curve."""
    from ebft_megatron.config import load_config
    from ebft_megatron.evaluation import report

    seen = {}

    def recording(name, function):
        def wrapped(*args, **kwargs):
            seen[name] = kwargs.get("document_masking")
            return function(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(report, "validation_ce", recording("ce", report.validation_ce))
    monkeypatch.setattr(report, "feature_matching_by_length", recording("cfm", report.feature_matching_by_length))
    model, arch, _ = qwen2_policy
    for masking in (True, False):
        config = load_config(None, ["model.load=unused", "rollout.chunk_len=16", "rollout.first_anchor=4",
                                    "rollout.stride=4", "rollout.rollout_len=4", "rollout.num_samples=3",
                                    f"data.document_masking={str(masking).lower()}", "eval.ce_chunks=1",
                                    "eval.cfm_chunks=1"])
        report.evaluate_run(config, model, qwen2_features, chunks, arch.vocab_size, dp_rank=0)
        assert seen == {"ce": masking, "cfm": masking}
