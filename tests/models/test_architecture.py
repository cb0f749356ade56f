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


def test_llama3_rope_scaling_parsed():
    arch = from_hf_config(dict(BASE, architectures=["LlamaForCausalLM"], rope_scaling={
        "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}))
    assert arch.rope_scaling.factor == 32.0
    with pytest.raises(ModelConfigError, match="yarn"):
        from_hf_config(dict(BASE, architectures=["LlamaForCausalLM"], rope_scaling={"rope_type": "yarn", "factor": 2.0}))
