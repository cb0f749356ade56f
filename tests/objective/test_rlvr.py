"""Verifiable rewards: the built-in verifier, plug-in resolution, RLOO advantages, and a trainer
step in rlvr mode."""

import pytest
import torch

from ebft_megatron.objective.rlvr import (
    RewardFunctionError,
    ground_truth_token_match,
    resolve_reward,
    verifiable_advantages,
)
from ebft_megatron.block_layout import BlockLayout


def test_ground_truth_token_match_scores_each_rollout():
    layout = BlockLayout(12, 4, 4, 4, 2)
    chunk = torch.arange(12)[None]
    rollouts = torch.zeros(1, layout.num_blocks, 2, 4, dtype=torch.long)
    rollouts[0, 0, 0] = torch.tensor([4, 5, 6, 7])  # block 0's ground truth x[4:8]
    rollouts[0, 1, 1] = torch.tensor([8, 9, 0, 0])  # half of block 1's x[8:12]
    scores = ground_truth_token_match(chunk, rollouts, layout)
    assert scores.tolist() == [[[1.0, 0.0], [0.0, 0.5]]]


def test_verifiable_advantages_are_leave_one_out_and_masked():
    rewards = torch.tensor([[[1.0, 0.0, 0.0], [2.0, 2.0, 5.0]]])
    valid = torch.tensor([[True, False]])
    advantages = verifiable_advantages(rewards, valid)
    expected = torch.tensor([1.0, -0.5, -0.5], dtype=torch.float64)
    assert torch.allclose(advantages[0, 0], expected) and (advantages[0, 1] == 0).all()


def test_rewards_resolve_by_name_or_module_path():
    assert resolve_reward("ground_truth_token_match") is ground_truth_token_match
    assert resolve_reward("ebft_megatron.objective.rlvr:ground_truth_token_match") is ground_truth_token_match
    with pytest.raises(RewardFunctionError, match="neither a built-in"):
        resolve_reward("unit_tests")
    with pytest.raises(RewardFunctionError, match="cannot be imported"):
        resolve_reward("no.such.module:reward")


def test_a_trainer_step_in_rlvr_mode(tiny_models, tmp_path):
    from ebft_megatron.config import load_config
    from ebft_megatron.training.loop import Trainer
    from tests.training.common import make_code_folder, tiny_overrides

    code = make_code_folder(tmp_path / "code")
    trainer = Trainer(load_config(None, tiny_overrides(tiny_models["llama"][1], code, "", steps=1, mode="rlvr")))
    before = {k: p.detach().clone() for k, p in trainer.policy.named_parameters()}
    metrics = trainer.train_step()
    assert 0.0 <= metrics["reward/verifiable"] <= 1.0 and "loss/rl" in metrics
    assert any(not torch.equal(p, before[k]) for k, p in trainer.policy.named_parameters())


class TokenizerAwareReward:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, chunk, rollout_tokens, layout):
        return torch.zeros(rollout_tokens.shape[:3])


def test_a_reward_class_is_built_with_the_run_tokenizer():
    tokenizer = object()
    reward = resolve_reward("tests.objective.test_rlvr:TokenizerAwareReward", tokenizer)
    assert isinstance(reward, TokenizerAwareReward) and reward.tokenizer is tokenizer
