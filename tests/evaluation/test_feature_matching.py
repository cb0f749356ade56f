"""The feature-matching-vs-completion-length curve: the value at G against embed + cfm_loss on the
same draws, zero when the rollouts are the ground truth (given directly, or sampled greedily from a
chunk that is the policy's own greedy continuation), and the length axis checked by rollouts that
leave the ground truth after k tokens."""

import statistics

import pytest
import torch

from ebft_megatron.data.packing import PackedChunks
from ebft_megatron.evaluation import feature_matching_by_length, feature_matching_curve
from ebft_megatron.features.network import embed
from ebft_megatron.objective.rewards import RewardSettings, block_rewards, cfm_loss, reward_metrics
from ebft_megatron.block_layout import BlockLayout
from ebft_megatron.rollouts.sampler import SamplingSettings, sample_rollouts
from ebft_megatron.models import gpt
from ebft_megatron.runtime import pipeline

LAYOUT = BlockLayout(chunk_len=16, first_anchor=4, stride=4, rollout_len=4, num_samples=3)  # anchors 4, 8, 12


def packed(tokens: torch.Tensor, lengths) -> PackedChunks:
    lengths = torch.tensor(lengths)
    doc_ids = torch.where(torch.arange(tokens.shape[1])[None, :] < lengths[:, None], 0, -1)
    return PackedChunks(tokens, lengths, doc_ids)


@pytest.fixture(scope="module")
def chunks(qwen2_policy):
    gen = torch.Generator().manual_seed(17)
    tokens = torch.randint(1, qwen2_policy[1].vocab_size, (3, 16), generator=gen)
    tokens[2, 13:] = 0
    return packed(tokens, [16, 16, 13])  # last chunk padded: its block 2 (window 12..15) is not valid


def ground_truth_rollouts(chunk: torch.Tensor) -> torch.Tensor:
    """[B, NB, n, G]: every sample of block b is x[a_b : a_b + G]."""
    windows = chunk[:, LAYOUT.ground_truth_windows]  # [B, NB, G]
    return windows[:, :, None].expand(-1, -1, LAYOUT.num_samples, -1).clone()


def test_curve_at_full_length_equals_embed_and_cfm_loss(qwen2_policy, qwen2_features, chunks):
    model, arch, _ = qwen2_policy
    sampling = SamplingSettings(temperature=1.0, top_p=1.0)
    curve = feature_matching_by_length(model, qwen2_features, LAYOUT, chunks, arch.vocab_size, sampling,
                                       torch.Generator().manual_seed(3), micro_batch_size=2)
    # The same draws by hand: the same micro-batches from the same generator state.
    generator, moments = torch.Generator().manual_seed(3), []
    for index in ([0, 1], [2]):
        chunk = chunks.tokens[index]
        rollouts = sample_rollouts(model, LAYOUT, chunk, arch.vocab_size, sampling, generator).tokens
        moments.append(embed(qwen2_features, LAYOUT, LAYOUT.pack(chunk, rollouts)))
    valid = LAYOUT.valid_blocks(chunks.lengths)
    gram, coordinates = torch.cat([m.gram for m in moments]), torch.cat([m.coordinates for m in moments])
    settings = RewardSettings(alignment_coef=1.0, diversity_coef=1.0, whiten=False)
    reference = reward_metrics(block_rewards(coordinates, settings, valid), gram, settings)

    G = LAYOUT.rollout_len
    assert curve.lengths == list(range(1, G + 1))
    assert len(curve.cfm) == len(curve.alignment) == len(curve.diversity) == G
    assert curve.groups == int(valid.sum()) == 3 + 3 + 2
    assert abs(curve.cfm[-1] - float(cfm_loss(gram)[valid].mean())) < 1e-10
    assert abs(curve.cfm[-1] - reference["cfm"]) < 1e-10
    assert abs(curve.alignment[-1] - reference["reward/alignment"]) < 1e-10
    assert abs(curve.diversity[-1] - reference["reward/diversity"]) < 1e-10
    assert curve.cfm[-1] > 1e-3  # rollouts at T = 1 are not the ground truth
    # unit features (last-token pooling): mean(2a) - mean(2d)/2 = 1 - CFM at every length (reference §5.2)
    for t in range(G):
        assert abs(curve.alignment[t] - curve.diversity[t] / 2 - (1 - curve.cfm[t])) < 1e-9
    assert curve.as_metrics() == {"eval/cfm": curve.cfm[-1], "eval/cfm_se": curve.cfm_error,
                                  "eval/alignment": curve.alignment[-1], "eval/diversity": curve.diversity[-1]}
    per_group = cfm_loss(gram)[valid].tolist()  # the standard error is over the valid groups
    assert abs(curve.cfm_error - statistics.stdev(per_group) / len(per_group) ** 0.5) < 1e-10


@pytest.mark.parametrize("pooling", ["last_token", "mean"])
def test_ground_truth_rollouts_give_zero_cfm_and_invalid_blocks_are_left_out(qwen2_features, chunks, pooling):
    def rollouts_of(chunk):
        rollouts = ground_truth_rollouts(chunk)
        padded = chunk[:, -1] == 0  # chunk 2 (its padding is token 0): corrupt its invalid block
        rollouts[padded, 2] = (rollouts[padded, 2] + 1) % 300
        return rollouts

    curve = feature_matching_curve(qwen2_features, LAYOUT, chunks, rollouts_of, pooling, micro_batch_size=2)
    assert curve.groups == 8
    assert max(abs(value) for value in curve.cfm) < 1e-8
    assert all(abs(value - 2.0) < 1e-6 for value in curve.alignment)  # 2 cos(phi, g) with phi = g
    if pooling == "last_token":
        assert all(abs(value - 2.0) < 1e-6 for value in curve.diversity)  # unit features, all equal


@pytest.mark.parametrize("pooling", ["last_token", "mean"])
def test_rollouts_leaving_the_ground_truth_after_k_tokens(qwen2_features, chunks, pooling):
    """CFM at length t uses the first t completion tokens: ~0 up to k, clearly positive after."""
    k = 2

    def rollouts_of(chunk):
        rollouts = ground_truth_rollouts(chunk)
        rollouts[..., k:] = (rollouts[..., k:] + 1) % 300
        return rollouts

    curve = feature_matching_curve(qwen2_features, LAYOUT, chunks, rollouts_of, pooling)
    assert max(abs(value) for value in curve.cfm[:k]) < 1e-8
    assert min(curve.cfm[k:]) > 1e-4


def greedy_chunks(model, vocab_size: int, prompts: torch.Tensor, chunk_len: int) -> torch.Tensor:
    """The policy's own greedy continuation of each prompt, by full forwards (no KV cache)."""
    tokens = prompts
    while tokens.shape[1] < chunk_len:
        positions = torch.arange(tokens.shape[1]).expand(tokens.shape[0], -1)
        step = gpt.forward(model, tokens, positions,
                                reduce=lambda logits: pipeline.gather_vocab_parallel(logits)[:, -1, :vocab_size].argmax(-1))
        tokens = torch.cat([tokens, step[:, None]], dim=1)
    return tokens


def test_greedy_policy_on_its_own_greedy_text_has_zero_cfm(qwen2_policy, qwen2_features):
    model, arch, _ = qwen2_policy
    prompts = torch.randint(1, arch.vocab_size, (2, LAYOUT.first_anchor), generator=torch.Generator().manual_seed(8))
    own = packed(greedy_chunks(model, arch.vocab_size, prompts, LAYOUT.chunk_len), [16, 16])
    greedy = feature_matching_by_length(model, qwen2_features, LAYOUT, own, arch.vocab_size,
                                        SamplingSettings(temperature=0.0, top_p=1.0), None, micro_batch_size=2)
    assert greedy.groups == 2 * LAYOUT.num_blocks
    assert max(abs(value) for value in greedy.cfm) < 1e-8
    sampled = feature_matching_by_length(model, qwen2_features, LAYOUT, own, arch.vocab_size,
                                         SamplingSettings(temperature=1.0, top_p=1.0), torch.Generator().manual_seed(1))
    assert sampled.cfm[-1] > 1e-3  # the same text is far from samples at T = 1


def test_bad_settings_are_refused(qwen2_features, chunks):
    with pytest.raises(ValueError, match="chunk_len=20"):
        feature_matching_curve(qwen2_features, BlockLayout(20, 4, 4, 4, 3), chunks, ground_truth_rollouts)
    with pytest.raises(ValueError, match="at least 2 samples"):
        feature_matching_curve(qwen2_features, BlockLayout(16, 4, 4, 4, 1), chunks, ground_truth_rollouts)
    short = packed(chunks.tokens[:1], [7])  # no block's window fits in 7 real tokens
    with pytest.raises(ValueError, match="no valid"):
        feature_matching_curve(qwen2_features, LAYOUT, short, ground_truth_rollouts)


def test_the_curve_keeps_each_valid_group_cfm(qwen2_features, chunks):
    curve = feature_matching_curve(qwen2_features, LAYOUT, chunks, ground_truth_rollouts, "last_token",
                                   micro_batch_size=2)
    assert len(curve.group_cfm) == curve.groups == 8
    assert abs(sum(curve.group_cfm.values()) / len(curve.group_cfm) - curve.cfm[-1]) < 1e-12
    # keyed "chunk/block": exactly the valid groups
    valid = LAYOUT.valid_blocks(chunks.lengths)
    assert sorted(curve.group_cfm) == sorted(f"{c}/{b}" for c, b in valid.nonzero().tolist())
