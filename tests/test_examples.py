"""Every config in examples/ loads, and the parallel layouts the GPU configs state fit their models.

The configs point model.load at checkpoints that do not exist here (load_config does not open it),
so the model side is checked against the public architecture numbers of the named models
(examples/architectures/*.json, the essentials of each model's config.json), through the same
ModelArchitecture.check_parallel the trainer runs before building anything.
"""

import json
from pathlib import Path

import pytest

from ebft_megatron.config import load_config
from ebft_megatron.models.architecture import ModelConfigError, from_hf_config
from ebft_megatron.block_layout import BlockLayout

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CONFIGS = sorted(EXAMPLES.glob("*.yaml"))


def hf_config(name):
    return json.loads((EXAMPLES / "architectures" / f"{name}.json").read_text())


# config file -> (the model's config.json essentials, the GPUs the config is written for, the
# parameter count its comments reason with, in billions)
NAMED = {
    "ebft_qwen2.5_1.5b.yaml": (hf_config("qwen2.5-1.5b"), 8, 1.54),
    "ebft_qwen2.5_7b.yaml": (hf_config("qwen2.5-7b"), 8, 7.6),
    "ebft_qwen3_8b.yaml": (hf_config("qwen3-8b"), 8, 8.19),
    "ebft_qwen3_30b_a3b.yaml": (hf_config("qwen3-30b-a3b"), 16, 30.5),
    "ebft_70b_tp8pp4.yaml": (hf_config("llama-3-70b"), 32, 70.6),
    "ebft_translation_llama3.2_1b.yaml": (hf_config("llama-3.2-1b"), 8, 1.24),
    "ebft_smollm2_stdlib.yaml": (hf_config("smollm2-135m"), 2, 0.135),
}
GPU_CONFIGS = [name for name in NAMED if name != "ebft_smollm2_stdlib.yaml"]


def parameters(arch) -> float:
    """Parameters in billions (the memory estimates in the configs' comments start from these)."""
    h, q, kv = arch.hidden_size, arch.num_attention_heads * arch.head_dim, arch.num_query_groups * arch.head_dim
    mlp = 3 * h * arch.ffn_hidden_size
    if arch.is_moe:  # every expert, and the router
        mlp = arch.num_experts * (mlp + h)
    layer = 2 * h * q + 2 * h * kv + mlp + 2 * h + ((q + 2 * kv) if arch.qkv_bias else 0)
    layer += 2 * arch.head_dim if arch.qk_norm else 0
    embeddings = arch.vocab_size * h * (1 if arch.tie_word_embeddings else 2)
    return (arch.num_layers * layer + embeddings + h) / 1e9


def test_every_config_is_named():
    assert set(NAMED) == {p.name for p in CONFIGS}


# what one process may use: an 80 GB GPU; the CPU example runs 2 processes on a 24 GB machine
MEMORY_LIMIT_GIB = {name: 80e9 / 2 ** 30 for name in GPU_CONFIGS} | {"ebft_smollm2_stdlib.yaml": 10.0}


@pytest.mark.parametrize("name", sorted(NAMED))
def test_the_memory_model_says_each_config_fits_the_machines_it_is_written_for(name):
    from ebft_megatron.training import memory

    model, gpus, _ = NAMED[name]
    config = load_config(EXAMPLES / name)
    arch = from_hf_config(model, source=name)
    dp = gpus // (config.parallel.tp * config.parallel.pp)
    estimate = memory.estimate(arch, memory.StepShape.of(config, arch, dp=dp))
    assert estimate.peak / 2 ** 30 < MEMORY_LIMIT_GIB[name], estimate.describe()


@pytest.mark.parametrize("name", sorted(NAMED))
def test_layout_fits_the_named_model(name):
    model, gpus, billions = NAMED[name]
    config = load_config(EXAMPLES / name)
    arch = from_hf_config(model, source=name)
    tp, pp, ep = config.parallel.tp, config.parallel.pp, config.parallel.ep
    arch.check_parallel(tp, pp, ep)  # heads, KV heads, FFN and padded vocabulary divide by TP; layers by PP
    assert gpus % (tp * pp * ep) == 0
    dp = gpus // (tp * pp)
    # the trainer refuses a step that does not split evenly over data-parallel ranks and micro-batches
    assert config.train.chunks_per_step % (dp * config.train.micro_batch) == 0
    assert abs(parameters(arch) - billions) / billions < 0.01


def test_stated_tensor_parallel_limits():
    """What the comments claim: Qwen2.5-7B allows TP 1, 2 or 4 (4 KV heads), Qwen3-8B TP up to 8 (8 KV
    heads), the 70B layout TP <= 8."""
    qwen7b = from_hf_config(NAMED["ebft_qwen2.5_7b.yaml"][0])
    for tp in (1, 2, 4):
        qwen7b.check_parallel(tp, 1)
    with pytest.raises(ModelConfigError, match="num_key_value_heads=4"):
        qwen7b.check_parallel(8, 1)
    qwen3_8b = from_hf_config(NAMED["ebft_qwen3_8b.yaml"][0])
    assert qwen3_8b.qk_norm and qwen3_8b.head_dim == 128
    for tp in (1, 2, 4, 8):
        qwen3_8b.check_parallel(tp, 1)
    with pytest.raises(ModelConfigError, match="num_key_value_heads=8"):
        qwen3_8b.check_parallel(16, 1)
    llama70b = from_hf_config(NAMED["ebft_70b_tp8pp4.yaml"][0])
    with pytest.raises(ModelConfigError, match="num_key_value_heads=8"):
        llama70b.check_parallel(16, 4)
    assert llama70b.num_layers // 4 == 20


@pytest.mark.parametrize("name", GPU_CONFIGS)
def test_gpu_configs_use_the_paper_settings(name):
    c = load_config(EXAMPLES / name)
    translation = "translation" in name
    assert c.model.dtype == "bfloat16"
    assert c.model.load.startswith("checkpoints/")
    assert "convert_checkpoint.py hf-to-mcore" in (EXAMPLES / name).read_text()
    r = c.rollout
    assert (r.chunk_len, r.num_samples, r.temperature, r.top_p) == (1024, 4, 0.6, 1.0)
    assert (r.first_anchor, r.stride, r.rollout_len) == ((4, 2, 4) if translation else (8, 8, 8))
    o = c.objective
    assert (o.mode, o.alignment_coef, o.diversity_coef, o.ce_coef, o.rl_coef, o.whiten) == ("ebft", 1.0, 0.5, 0.03, 1.0, True)
    assert o.pooling == ("mean" if translation else "last_token")
    opt = c.optimizer
    assert (opt.lr, opt.schedule, opt.warmup_fraction, opt.adam_beta1, opt.adam_beta2, opt.weight_decay,
            opt.clip_grad) == (1e-6, "constant", 0.03, 0.9, 0.95, 0.0, 1.0)
    assert (c.train.chunks_per_step, c.train.seed) == (16, 43)


@pytest.mark.parametrize("method", ["sft", "rlvr", "ebft"])
def test_replication_methods_share_the_chunks_and_rlvr_samples_at_the_response_anchor(method, tmp_path):
    """examples/replication: every method loads with the same data and budget; RLVR's single
    rollout anchor is where the aligned chunks put each function's body."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("replicate", EXAMPLES / "replication" / "replicate.py")
    replicate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(replicate)
    data = [f"data.path={tmp_path / 'train.jsonl'}", f"data.eval_path={tmp_path / 'validation.jsonl'}"]
    config = load_config(replicate.CONFIG, [*data, *replicate.METHOD_OVERRIDES[method]])
    base = load_config(replicate.CONFIG, data)
    assert config.objective.mode == method
    assert (config.data, config.train, config.optimizer) == (base.data, base.train, base.optimizer)
    r = config.rollout
    layout = BlockLayout(r.chunk_len, r.first_anchor, r.stride, r.rollout_len, r.num_samples)
    if method == "rlvr":
        assert layout.num_blocks == 1 and layout.anchor_positions.tolist() == [config.data.response_anchor]
        assert config.objective.reward.endswith("unit_tests:UnitTestReward")
    else:
        assert layout.num_blocks > 1


def test_replication_table_gives_95_percent_intervals_over_seeds_and_paired_differences():
    import importlib.util
    from types import SimpleNamespace

    spec = importlib.util.spec_from_file_location("replicate", EXAMPLES / "replication" / "replicate.py")
    replicate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(replicate)
    args = SimpleNamespace(samples=4, methods=["sft", "ebft"])
    base = {"eval/ce": 2.0, "eval/ce_se": 0.1, "eval/cfm": 0.5}  # no HumanEval: no HumanEval column
    results = {"sft": {1: {"eval/ce": 1.0, "eval/cfm": 0.40}, 2: {"eval/ce": 2.0, "eval/cfm": 0.42},
                       3: {"eval/ce": 3.0, "eval/cfm": 0.44}},
               "ebft": {1: {"eval/ce": 1.5, "eval/cfm": 0.30}, 2: {"eval/ce": 2.5, "eval/cfm": 0.30},
                        3: {"eval/ce": 3.5, "eval/cfm": 0.30}}}
    lines = replicate.summarize(args, base, results).splitlines()
    assert lines[0] == "| method | val CE | CFM |"
    assert lines[2] == "| base (SmolLM2-135M) | 2.0000 (SE 0.1000) | 0.5000 |"
    # CE over seeds 1, 2, 3: mean 2, sd 1, 95% half-width t(2) = 4.303 times 1 / sqrt(3) = 2.4843
    assert lines[3].startswith("| sft (3 seeds) | 2.0000 [-0.4843, 4.4843] | 0.4200 [")
    differences = {line.split(" | ")[0]: line for line in lines if line.startswith("| ebft - ") or
                   line.startswith("| sft - ")}
    # paired by seed, the seeds' shared spread cancels: ebft - sft is exactly +0.5 for every seed
    assert differences["| ebft - sft"] == "| ebft - sft | +0.5000 [0.5000, 0.5000] | -0.1200 [-0.1697, -0.0703] |"
    assert differences["| sft - base"].startswith("| sft - base | +0.0000 [-2.4843, 2.4843] | -0.0800 [")
    assert "| ebft - rlvr" not in differences  # no RLVR runs: no comparison with them
    # the evaluation's own standard error: a method's is the mean over its seeds, a difference's
    # combines both sides'
    for seed, error in ((1, 0.05), (2, 0.07), (3, 0.06)):
        results["sft"][seed]["eval/ce_se"] = error
    lines = replicate.summarize(args, base, results).splitlines()
    assert lines[3].startswith("| sft (3 seeds) | 2.0000 [-0.4843, 4.4843] (SE 0.0600) | ")
    assert "| sft - base | +0.0000 [-2.4843, 2.4843] (SE 0.1166) | " in "\n".join(lines)  # sqrt(0.06^2 + 0.1^2)


def test_replication_differences_are_paired_over_the_evaluations_items():
    import importlib.util
    import statistics
    from types import SimpleNamespace

    spec = importlib.util.spec_from_file_location("replicate", EXAMPLES / "replication" / "replicate.py")
    replicate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(replicate)
    args = SimpleNamespace(samples=4, methods=["sft"])
    # the chunks differ a lot (1.0 to 4.0); SFT lowers each by 0.1 to 0.3
    chunk_ce = {"0": 1.0, "1": 2.5, "2": 4.0}
    lowered = {"0": 0.9, "1": 2.3, "2": 3.7}
    base = {"eval/ce": 2.5, "eval/ce_se": statistics.stdev(chunk_ce.values()) / 3 ** 0.5, "items": {"eval/ce": chunk_ce}}
    results = {"sft": {seed: {"eval/ce": 2.3, "eval/ce_se": statistics.stdev(lowered.values()) / 3 ** 0.5,
                              "items": {"eval/ce": lowered}} for seed in (1, 2)}}
    table = replicate.summarize(args, base, results)
    paired = statistics.stdev([-0.1, -0.2, -0.3]) / 3 ** 0.5  # 0.0577: the chunks' own spread cancels
    unpaired = (base["eval/ce_se"] ** 2 + results["sft"][1]["eval/ce_se"] ** 2) ** 0.5  # 1.23
    assert f"| sft - base | -0.2000 [-0.2000, -0.2000] (SE {paired:.4f} paired, {unpaired:.4f} unpaired) |" in table
    # items of other chunks cannot be paired: the unpaired error alone
    results["sft"][2]["items"] = {"eval/ce": {"0": 0.9, "1": 2.3, "5": 3.7}}
    assert f"(SE {unpaired:.4f}) |" in replicate.summarize(args, base, results)
