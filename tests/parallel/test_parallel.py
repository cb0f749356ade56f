"""TP/PP/DP correctness, from one 4-process torchrun launch (tests/parallel/checks.py).

fp32 tolerance: 1e-5 absolute on logits of magnitude ~1 (measured differences are ~5e-7).
"""

import json

import pytest

from tests.fixtures import FAMILIES
from tests.parallel.launch import run_checks

TOL = 1e-5


@pytest.fixture(scope="module")
def results(tiny_models, tmp_path_factory):
    models_dir = next(iter(tiny_models.values()))[0].parent
    (models_dir / "families.json").write_text(json.dumps(list(FAMILIES)))
    return run_checks("checks.py", models_dir, tmp_path_factory.mktemp("parallel") / "results.json")


LAYOUTS = ["tp1pp1", "tp2pp1", "tp1pp2", "tp2pp2"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_megatron_logits_equal_transformers(results, layout, family):
    assert results[layout]["logits_vs_hf"][family] <= TOL


@pytest.mark.parametrize("layout", LAYOUTS)
def test_packed_block_forward_equals_separate_forwards(results, layout):
    assert results[layout]["packed_vs_separate"] <= TOL
    assert results[layout]["packed_chunk_vs_causal"] <= TOL


@pytest.mark.parametrize("layout", LAYOUTS)
def test_rollout_engine_equals_independent_generation(results, layout):
    assert results[layout]["rollout_logits"] <= TOL
    assert results[layout]["rollout_tokens_equal"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_dp_rank_samples_its_own_chunks_reproducibly(results, layout):
    dp = results[layout]["dp_sampling"]
    assert dp["reproducible"] and dp["same_within_model_parallel_group"]
    assert dp["dp_size"] >= 1 and dp["differ_across_dp"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_features_rewards_loss_and_gradients_equal_tp1(results, layout):
    """Same rewards, loss and gradients (2 micro-batches, DDP, tied embeddings) as the TP1 run."""
    objective = results[layout]["objective"]
    assert objective["gram_max_diff"] <= TOL and objective["advantage_max_diff"] <= 1e-4
    assert objective["loss_diff"] <= TOL and objective["cfm_diff"] <= TOL
    assert objective["grad_names"] and objective["grad_count"] >= 20
    assert objective["grad_max_rel_diff"] <= 1e-4
    assert objective["sequence_parallel_rows_equal"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_qwen3_qk_norm_gradients_are_summed_over_tensor_parallel_ranks(results, layout):
    """Qwen3: same packed EBFT loss and gradients as TP1, the replicated q/k norm weights included."""
    check = results[layout]["qk_norm"]
    assert check["grad_names"] and check["qk_norm_grads"] == 2 * 4  # q and k, 4 layers
    assert check["loss_diff"] <= TOL
    assert check["qk_norm_grad_max_rel_diff"] <= 1e-4 and check["grad_max_rel_diff"] <= 1e-4


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fused_attention_and_chunked_logits_equal_the_generic_paths(results, layout):
    """Same loss (1e-6) and gradients (1e-5 relative) as the generic attention with full logits:
    EBFT at s = G and s < G and SFT, each with and without document masking, two models."""
    fused = results[layout]["fused_paths"]
    assert fused["cases"] == 2 * 2 * 2 * 2 and fused["grads_compared"] > 100
    assert fused["loss_diff"] <= 1e-6
    assert fused["grad_max_rel_diff"] <= 1e-5


@pytest.mark.parametrize("layout", LAYOUTS)
def test_verifiable_rewards_are_scored_once_per_replica(results, layout):
    """Scores that differ by rank still give one set of advantages per TP x PP replica."""
    check = results[layout]["replica_rewards"]
    assert check["replica_size"] == {"tp1pp1": 1, "tp2pp1": 2, "tp1pp2": 2, "tp2pp2": 4}[layout]
    assert check["reward_calls"] == 1  # the replica's first rank only
    assert check["advantage_spread"] == 0.0 and check["advantage_abs"] > 0.05
    assert check["failures"] == ["ValueError"] + ["ReplicaLeaderFailed"] * (check["replica_size"] - 1)


@pytest.mark.parametrize("check_name", ["lora", "lora_tied"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_lora_loss_and_adapter_gradients_equal_tp1(results, layout, check_name):
    """LoRA on qkv, proj, fc1 and fc2 with nonzero B (Qwen3; Llama with its frozen tied embedding):
    same packed EBFT loss, adapter gradients (gathered to full size; 4 layers x 4 targets x A and
    B) and gradient norm as TP1 (a replicated adapter tensor counted once per TP rank would change
    the norm); DDP buffers the adapters alone."""
    check = results[layout][check_name]
    assert check["grad_names"] and check["grad_count"] == 4 * 4 * 2
    assert check["only_adapters_buffered"]
    assert check["loss_diff"] <= TOL
    assert check["grad_max_rel_diff"] <= 1e-4 and check["grad_norm_rel_diff"] <= 1e-5
