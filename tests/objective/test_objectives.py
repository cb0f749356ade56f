"""The objectives (objective.objectives): what each one builds from a config, the forward it asks
for, and the FLOPs it counts."""

import pytest
import torch

from ebft_megatron.config import Config
from ebft_megatron.models import architecture
from ebft_megatron.objective.objectives import EBFT, OBJECTIVES, RLVR, SFT, Batch, ObjectiveContext, build_objective
from ebft_megatron.block_layout import BlockLayout
from ebft_megatron.models import flops

LAYOUT = BlockLayout(24, 4, 4, 4, 3)


class _Features:
    feature_layers = (1, 2, 3)


def _config(mode):
    config = Config()
    config.objective.mode = mode
    config.objective.rl_coef, config.objective.ce_coef, config.rollout.temperature = 0.5, 0.2, 0.7
    return config


@pytest.mark.parametrize("mode", sorted(OBJECTIVES))
def test_each_mode_builds_its_objective_with_the_config_settings(mode):
    objective = build_objective(_config(mode), ObjectiveContext(LAYOUT, 300, torch.Generator(), _Features()))
    assert type(objective) is OBJECTIVES[mode] and objective.name == mode
    if mode == "sft":
        assert objective.tokens_per_chunk == 24 and not objective.samples_rollouts
        return
    assert objective.tokens_per_chunk == LAYOUT.packed_len and objective.samples_rollouts
    assert (objective.loss_settings.rl_coef, objective.loss_settings.ce_coef, objective.loss_settings.temperature) == (
        0.5, 0.2, 0.7)
    assert objective.sampling.temperature == 0.7


def test_forward_inputs_are_the_chunk_or_the_packed_sequence():
    chunk = torch.arange(24)[None]
    rollouts = torch.full((1, LAYOUT.num_blocks, 3, 4), 7)
    batch = Batch(chunk, torch.tensor([24]))
    sft = SFT(LAYOUT)
    from ebft_megatron.objective.objectives import Experience

    tokens, positions, params, mask = sft.forward_inputs(Experience(batch))
    assert torch.equal(tokens, chunk) and positions.tolist() == [list(range(24))] and mask is None
    ebft = build_objective(_config("ebft"), ObjectiveContext(LAYOUT, 300, torch.Generator(), _Features()))
    tokens, positions, params, mask = ebft.forward_inputs(Experience(batch, rollouts))
    assert torch.equal(tokens, LAYOUT.pack(chunk, rollouts)) and torch.equal(positions[0], LAYOUT.position_ids)
    assert params.mode == "packed" and params.return_hidden


def test_rlvr_flops_leave_out_the_feature_network_that_it_never_runs():
    arch = architecture.from_hf_config(dict(architectures=["LlamaForCausalLM"], hidden_size=64, num_attention_heads=4,
                                            num_key_value_heads=2, intermediate_size=128, num_hidden_layers=4,
                                            vocab_size=300))
    cost = flops.CostModel.of(arch)
    context = ObjectiveContext(LAYOUT, 300, torch.Generator(), _Features())
    ebft = build_objective(_config("ebft"), context)
    rlvr = build_objective(_config("rlvr"), context)
    phases = flops.ebft_step(cost, LAYOUT, "ours", 3)
    assert ebft.flops_per_chunk(cost) == pytest.approx(phases["total"])
    assert rlvr.flops_per_chunk(cost) == pytest.approx(phases["rollouts"] + phases["policy"])
    assert SFT(LAYOUT).flops_per_chunk(cost) == pytest.approx(flops.sft_step(cost, 24))
    assert isinstance(ebft, EBFT) and isinstance(rlvr, RLVR)
