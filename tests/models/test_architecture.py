import pytest

from ebft_megatron.models.architecture import ModelConfigError, from_hf_config

BASE = dict(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536,
            num_hidden_layers=30, vocab_size=49152)


def test_llama_v4_and_v5_rope_keys_agree():
    v4 = from_hf_config(dict(BASE, architectures=["LlamaForCausalLM"], rope_theta=1e5))
    v5 = from_hf_config(dict(BASE, architectures=["LlamaForCausalLM"],
                             rope_parameters={"rope_theta": 1e5, "rope_type": "default"}))
    assert v4 == v5
    assert v4.rope_theta == 1e5 and v4.head_dim == 64 and v4.padded_vocab_size == 49152


def test_families_and_qkv_bias():
    assert from_hf_config(dict(BASE, architectures=["Qwen2ForCausalLM"])).qkv_bias
    assert not from_hf_config(dict(BASE, architectures=["MistralForCausalLM"])).qkv_bias
    assert from_hf_config(dict(BASE, model_type="llama")).family == "llama"


def test_unknown_architecture_is_refused_with_the_supported_list():
    with pytest.raises(ModelConfigError, match="unsupported architecture.*LlamaForCausalLM"):
        from_hf_config(dict(BASE, architectures=["GPTNeoXForCausalLM"]))


def test_missing_key_names_the_key():
    config = dict(BASE, architectures=["LlamaForCausalLM"])
    del config["num_hidden_layers"]
    with pytest.raises(ModelConfigError, match="num_hidden_layers"):
        from_hf_config(config, source="x/config.json")


def test_unshardable_layouts_are_refused_before_compute():
    arch = from_hf_config(dict(BASE, architectures=["LlamaForCausalLM"]))
    arch.check_parallel(3, 5)
    with pytest.raises(ModelConfigError, match="does not divide num_attention_heads=9"):
        arch.check_parallel(2, 1)
    with pytest.raises(ModelConfigError, match="does not divide num_hidden_layers=30"):
        arch.check_parallel(1, 4)


def test_padded_vocab_is_tp_independent():
    arch = from_hf_config(dict(BASE, architectures=["LlamaForCausalLM"], vocab_size=1000))
    assert arch.padded_vocab_size == 1024


def test_feature_layers_follow_the_reference():
    arch = from_hf_config(dict(BASE, architectures=["Qwen2ForCausalLM"], num_hidden_layers=28))
    assert arch.default_feature_layers() == (7, 14, 21)


@pytest.mark.parametrize("layers, expected", [(1, (1,)), (2, (1,)), (3, (1, 2)), (4, (1, 2, 3))])
def test_feature_layers_of_small_models_are_named_once(layers, expected):
    arch = from_hf_config(dict(BASE, architectures=["LlamaForCausalLM"], num_hidden_layers=layers))
    assert arch.default_feature_layers() == expected


def test_llama3_rope_scaling_parsed():
    arch = from_hf_config(dict(BASE, architectures=["LlamaForCausalLM"], rope_scaling={
        "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}))
    assert arch.rope_scaling.factor == 32.0
    with pytest.raises(ModelConfigError, match="yarn"):
        from_hf_config(dict(BASE, architectures=["LlamaForCausalLM"], rope_scaling={"rope_type": "yarn", "factor": 2.0}))


QWEN3_8B = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=4096, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, intermediate_size=12288, num_hidden_layers=36,
                vocab_size=151936, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False,
                attention_bias=False, use_sliding_window=False, sliding_window=None, max_window_layers=36)


def test_qwen3_dense_is_parsed_with_qk_norm_and_its_own_head_dim():
    arch = from_hf_config(QWEN3_8B)
    assert (arch.family, arch.qk_norm, arch.qkv_bias, arch.sliding_window) == ("qwen3", True, False, None)
    assert (arch.head_dim, arch.num_query_groups, arch.rope_theta, arch.norm_eps) == (128, 8, 1e6, 1e-6)
    assert not arch.tie_word_embeddings
    # head_dim is read, not derived: Qwen3-0.6B has 16 heads of 128 on a hidden size of 1024
    small = from_hf_config(dict(QWEN3_8B, hidden_size=1024, num_attention_heads=16, tie_word_embeddings=True))
    assert small.head_dim == 128 and small.tie_word_embeddings
    # older families keep qk_norm off, and checkpoints written before the field still load
    assert not from_hf_config(dict(BASE, architectures=["Qwen2ForCausalLM"])).qk_norm
    legacy = from_hf_config(QWEN3_8B).to_json()
    legacy.pop("qk_norm")
    assert not type(arch).from_json(legacy).qk_norm


# Qwen3-30B-A3B's config.json, as published (the keys that matter)
QWEN3_30B_A3B = dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", hidden_size=2048,
                     intermediate_size=6144, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                     norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], router_aux_loss_coef=0.001,
                     num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_hidden_layers=48,
                     vocab_size=151936, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False,
                     use_sliding_window=False, sliding_window=None, attention_bias=False, max_position_embeddings=40960)
MIXTRAL_8X7B = dict(architectures=["MixtralForCausalLM"], model_type="mixtral", hidden_size=4096,
                    intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2, num_attention_heads=32,
                    num_key_value_heads=8, num_hidden_layers=32, vocab_size=32000, rope_theta=1e6,
                    router_aux_loss_coef=0.02, router_jitter_noise=0.0, sliding_window=None)


def test_qwen3_moe_and_mixtral_parse_to_expert_layers():
    qwen = from_hf_config(QWEN3_30B_A3B)
    assert (qwen.family, qwen.num_experts, qwen.experts_per_token, qwen.ffn_hidden_size) == ("qwen3_moe", 128, 8, 768)
    assert qwen.qk_norm and qwen.normalize_top_k and qwen.is_moe and qwen.router_aux_loss_coef == 0.001
    assert not from_hf_config(dict(QWEN3_30B_A3B, norm_topk_prob=False)).normalize_top_k
    mixtral = from_hf_config(MIXTRAL_8X7B)
    assert (mixtral.family, mixtral.num_experts, mixtral.experts_per_token, mixtral.ffn_hidden_size) == (
        "mixtral", 8, 2, 14336)
    assert mixtral.normalize_top_k and not mixtral.qk_norm and mixtral.router_aux_loss_coef == 0.02
    assert not from_hf_config(QWEN3_8B).is_moe
    # checkpoints written before the expert fields existed still describe their dense model
    legacy = from_hf_config(QWEN3_8B).to_json()
    for key in ("num_experts", "experts_per_token", "normalize_top_k", "router_aux_loss_coef"):
        legacy.pop(key)
    assert not type(qwen).from_json(legacy).is_moe


def test_expert_parallel_layouts_are_checked():
    qwen = from_hf_config(QWEN3_30B_A3B)
    qwen.check_parallel(4, 2, ep=8)
    with pytest.raises(ModelConfigError, match=r"expert parallel size 3 does not divide num_experts=128"):
        qwen.check_parallel(1, 1, ep=3)
    with pytest.raises(ModelConfigError, match="needs a mixture-of-experts model"):
        from_hf_config(QWEN3_8B).check_parallel(1, 1, ep=2)


def test_moe_variants_the_model_cannot_compute_are_one_error():
    cases = [
        (dict(QWEN3_30B_A3B, decoder_sparse_step=2), "decoder_sparse_step"),
        (dict(QWEN3_30B_A3B, mlp_only_layers=[0, 5]), "mlp_only_layers"),
        (dict(MIXTRAL_8X7B, router_jitter_noise=0.01), "router_jitter_noise"),
        (dict(QWEN3_30B_A3B, num_experts_per_tok=200), "num_experts_per_tok"),
    ]
    for config, what in cases:
        with pytest.raises(ModelConfigError, match=what) as err:
            from_hf_config(config, source="model/config.json")
        assert "\n" not in str(err.value) and str(err.value).startswith("model/config.json: ")


def test_unsupported_architectures_are_one_error_with_the_supported_list():
    for name in ("DeepseekV3ForCausalLM", "Qwen2MoeForCausalLM", "GptOssForCausalLM"):
        with pytest.raises(ModelConfigError) as err:
            from_hf_config(dict(QWEN3_8B, architectures=[name]), source="m/config.json")
        message = str(err.value)
        assert "\n" not in message and message.startswith("m/config.json: unsupported architecture")
        assert name in message and "mixtures of experts" in message
        for supported in ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM", "Qwen3ForCausalLM",
                          "Qwen3MoeForCausalLM", "MixtralForCausalLM"):
            assert supported in message
    # a named architecture that is not ours is refused even where model_type names a supported family
    with pytest.raises(ModelConfigError, match="unsupported architecture.*Qwen3ForCausalLM"):
        from_hf_config(dict(QWEN3_8B, architectures=["Qwen2MoeForCausalLM"], model_type="qwen3"))


def test_qwen3_variants_the_model_cannot_compute_are_refused():
    with pytest.raises(ModelConfigError, match="attention_bias"):
        from_hf_config(dict(QWEN3_8B, attention_bias=True))
    with pytest.raises(ModelConfigError, match="sliding-window"):
        from_hf_config(dict(QWEN3_8B, use_sliding_window=True, sliding_window=4096))
    with pytest.raises(ModelConfigError, match="sliding-window"):
        from_hf_config(dict(QWEN3_8B, layer_types=["full_attention"] * 35 + ["sliding_attention"]))
    assert from_hf_config(dict(QWEN3_8B, layer_types=["full_attention"] * 36)).sliding_window is None
