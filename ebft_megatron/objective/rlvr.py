"""Verifiable rewards (RLVR): the pluggable reward that replaces feature matching.

A verifiable reward scores each rollout directly: ``reward(chunk, rollout_tokens, layout) ->
[B, NB, n]`` floats (for example, run unit tests on decoded code). Advantages are the same RLOO
leave-one-out form as EBFT's alignment term, and the policy loss is the same REINFORCE + gamma CE,
so SFT, RLVR and EBFT run in one trainer and differ only in where advantages come from.

Rewards are named in the config as ``module.path:function``; a few built-ins are listed in
``BUILTIN_REWARDS``. A reward that needs to read text names a class instead, which the trainer
builds once with the run's tokenizer, ``Class(tokenizer)``, and then calls like a function (for
example ``ebft_megatron.evaluation.unit_tests:UnitTestReward``, which runs unit tests).
"""

from __future__ import annotations

import importlib
from typing import Callable

import torch

from ebft_megatron.errors import UserError
from ebft_megatron.objective.rewards import rloo_baseline
from ebft_megatron.block_layout import BlockLayout

VerifiableReward = Callable[[torch.Tensor, torch.Tensor, BlockLayout], torch.Tensor]


class RewardFunctionError(UserError, ValueError):
    pass


def ground_truth_token_match(chunk: torch.Tensor, rollout_tokens: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """Fraction of a rollout's tokens equal to the ground-truth continuation x[a_b : a_b+G]
    (a verifier that needs no sandbox; useful as a baseline and in tests)."""
    truth = chunk[:, layout.ground_truth_windows.to(chunk.device)]  # [B, NB, G]
    return (rollout_tokens == truth[:, :, None, :]).double().mean(-1)


BUILTIN_REWARDS = {"ground_truth_token_match": ground_truth_token_match}


def resolve_reward(name: str, tokenizer=None) -> VerifiableReward:
    """A built-in name or ``module.path:function``; ``module.path:Class`` is built with ``tokenizer``."""
    if name in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[name]
    module_name, _, attr = name.partition(":")
    if not attr:
        raise RewardFunctionError(
            f"reward {name!r} is neither a built-in ({', '.join(BUILTIN_REWARDS)}) nor 'module.path:function'"
        )
    try:
        function = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise RewardFunctionError(f"reward {name!r} cannot be imported: {err}") from None
    if isinstance(function, type):
        function = function(tokenizer)
    if not callable(function):
        raise RewardFunctionError(f"reward {name!r} is not callable")
    return function


def verifiable_advantages(rewards: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """RLOO advantages [B, NB, n] of per-rollout rewards; invalid (padded) blocks get 0."""
    rewards = rewards.double()
    advantage = rewards - rloo_baseline(rewards, torch.zeros_like(rewards), 1.0, 0.0)
    return torch.where(valid[..., None], advantage, torch.zeros_like(advantage))
