"""Mixture of experts across expert, tensor and pipeline parallelism, from one 4-process torchrun
launch (tests/parallel/moe_checks.py): SFT, RLVR and EBFT steps of a tiny Qwen3-MoE, with the
router's load-balancing loss weighted in, give the EP1 run's rollout tokens, losses and gradients."""

import pytest

from tests.parallel.launch import run_checks

LAYOUTS = ["tp1pp1ep2", "tp2pp1ep2", "tp1pp2ep2"]
MODES = ["sft", "sft_odd", "rlvr", "ebft"]  # sft_odd: a token count TP2 splits unevenly


@pytest.fixture(scope="module")
def results(tiny_models, tmp_path_factory):
    models_dir = tiny_models["qwen3_moe"][1].parent
    return run_checks("moe_checks.py", models_dir, tmp_path_factory.mktemp("moe_parallel") / "results.json")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_moe_step_equals_ep1(results, layout, mode):
    check = results[layout][mode]
    assert check["same_terms"] and "loss/load_balancing" in check["terms"]
    assert check["term_diff"] <= 1e-5
    assert check["tokens_equal"]
    # 4 layers: a router each, 4 experts x (fc1, fc2) each; every expert got tokens
    assert check["grad_names_equal"] and check["router_grads"] == 4 and check["expert_grads"] == 4 * 4 * 2
    assert check["expert_grads_nonzero"] == 32
    assert check["grad_max_rel_diff"] <= 1e-4


@pytest.mark.parametrize("layout", ["tp1pp1ep1", *LAYOUTS])
def test_moe_packed_forward_and_rollout_engine_equal_separate_forwards(results, layout):
    packed = results[layout]["packed"]
    assert packed["packed_vs_separate"] <= 1e-5 and packed["packed_chunk_vs_causal"] <= 1e-5
    assert packed["rollout_logits"] <= 1e-5 and packed["rollout_tokens_equal"]
    assert packed["short_sequence_logits_vs_hf"] <= 1e-5  # 1 and 3 tokens: TP2 shares them out unevenly


def test_moe_rlvr_compares_a_policy_gradient_term(results):
    """The verifiable reward varies between rollouts, so RLVR's comparison covers its REINFORCE term."""
    assert abs(results["tp1pp1ep1"]["rlvr"]["terms"]["loss/rl"]) > 1e-3
