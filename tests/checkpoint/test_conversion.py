"""HF -> mcore -> HF round trip, single-process logits, and bad input to the converter CLI."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ebft_megatron.checkpoint import convert
from tests.fixtures import FAMILIES, MOE_FAMILIES, hf_logits, make_tiny_hf

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, str(ROOT / "tools" / "convert_checkpoint.py")]


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_gives_identical_tensors(family, tiny_models, tmp_path):
    hf_dir, ckpt = tiny_models[family]
    back = convert.mcore_to_hf(ckpt, tmp_path / "back", log=lambda *_: None)
    original, restored = convert.read_hf_weights(hf_dir), convert.read_hf_weights(back)
    assert set(original) == set(restored)
    for name, tensor in original.items():
        assert torch.equal(tensor, restored[name]), name
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(back))  # transformers loads what we wrote
    assert (back / "tokenizer.json").is_file()


def test_qwen3_norms_map_one_to_one_and_weights_that_do_not_fit_the_config_are_refused(tiny_models):
    from ebft_megatron.checkpoint import hf_mapping
    from ebft_megatron.models.architecture import load_hf_config

    hf_dir = tiny_models["qwen3"][0]
    hf = convert.read_hf_weights(hf_dir)
    _, arch = load_hf_config(hf_dir)
    mc = hf_mapping.hf_to_mcore(hf, arch)
    for i in range(arch.num_layers):
        for ours, theirs in (("q_layernorm", "q_norm"), ("k_layernorm", "k_norm")):
            tensor = mc[f"decoder.layers.{i}.self_attention.{ours}.weight"]
            assert tensor.shape == (arch.head_dim,) and tensor is hf[f"model.layers.{i}.self_attn.{theirs}.weight"]
    # weights without the norms (a Qwen2-like folder labelled Qwen3), and norms the config does not
    # describe (Qwen3 weights labelled Qwen2): neither converts silently
    without = {k: v for k, v in hf.items() if not k.endswith(("q_norm.weight", "k_norm.weight"))}
    with pytest.raises(hf_mapping.MappingError, match="lack model.layers.0.self_attn.q_norm.weight"):
        hf_mapping.hf_to_mcore(without, arch)
    as_qwen2 = replace(arch, family="qwen2", hf_architecture="Qwen2ForCausalLM", qk_norm=False)
    with pytest.raises(hf_mapping.MappingError, match="q_norm.weight.*do not match"):
        hf_mapping.hf_to_mcore(hf, as_qwen2)


def _megatron_logits(ckpt, tokens):
    from ebft_megatron.checkpoint import store
    from ebft_megatron.models.gpt import build_model
    from ebft_megatron.models import gpt
    from ebft_megatron.runtime import distributed

    distributed.initialize(1, 1)
    arch = store.architecture_of(ckpt)
    model = build_model(arch)
    store.load_model_weights(model, ckpt)
    positions = torch.arange(tokens.shape[1])[None].expand_as(tokens)
    return gpt.forward(model, tokens, positions, reduce=lambda out: out[..., : arch.vocab_size])


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_mixture_of_experts_logits_match_transformers_and_depend_on_how_weights_are_normalised(family, tiny_models):
    """The converted experts and router compute Hugging Face's logits in fp32; the same weights with
    the chosen experts' weights normalised the other way compute other logits, so the routing flavour
    (Qwen3-MoE's raw softmax weights, Mixtral's renormalised ones) is what the comparison checks."""
    from ebft_megatron.checkpoint import store
    from ebft_megatron.models import gpt
    from ebft_megatron.models.gpt import build_model

    hf_dir, ckpt = tiny_models[family]
    tokens = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(3))
    ours = _megatron_logits(ckpt, tokens)
    assert float((ours - hf_logits(hf_dir, tokens)).abs().max()) <= 1e-5
    arch = store.architecture_of(ckpt)
    flipped = build_model(replace(arch, normalize_top_k=not arch.normalize_top_k))
    store.load_model_weights(flipped, ckpt)
    positions = torch.arange(tokens.shape[1])[None].expand_as(tokens)
    other = gpt.forward(flipped, tokens, positions, reduce=lambda out: out[..., : arch.vocab_size])
    assert float((other - ours).abs().max()) > 1e-2


def test_llama3_rope_scaling_matches_transformers(tmp_path):
    import transformers as tf

    config = tf.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.2)
    model.save_pretrained(str(tmp_path / "hf"))
    ckpt = convert.hf_to_mcore(tmp_path / "hf", tmp_path / "mcore", log=lambda *_: None)
    tokens = torch.randint(0, 300, (1, 200), generator=torch.Generator().manual_seed(0))
    diff = (_megatron_logits(ckpt, tokens) - hf_logits(tmp_path / "hf", tokens)).abs().max().item()
    assert diff < 1e-5


def _run(*args):
    return subprocess.run(CLI + list(args), capture_output=True, text=True)


def _assert_clean_failure(result, out: Path, pattern: str):
    assert result.returncode != 0
    assert pattern in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()


def test_cli_refuses_bad_input_cleanly(tmp_path, tiny_models):
    hf_dir, ckpt = tiny_models["qwen2"]
    out = tmp_path / "out"

    # unknown architecture
    bad_arch = make_tiny_hf("llama", tmp_path / "gptneox", with_tokenizer=False)
    config = json.loads((bad_arch / "config.json").read_text())
    config["architectures"], config["model_type"] = ["GPTNeoXForCausalLM"], "gpt_neox"
    (bad_arch / "config.json").write_text(json.dumps(config))
    _assert_clean_failure(_run("hf-to-mcore", "--hf-dir", str(bad_arch), "--out", str(out)), out,
                          "unsupported architecture")

    # missing config.json / missing weights
    empty = tmp_path / "empty"
    empty.mkdir()
    _assert_clean_failure(_run("hf-to-mcore", "--hf-dir", str(empty), "--out", str(out)), out, "config.json")
    (empty / "config.json").write_text((hf_dir / "config.json").read_text())
    _assert_clean_failure(_run("hf-to-mcore", "--hf-dir", str(empty), "--out", str(out)), out, "no weights found")

    # corrupt (truncated) safetensors
    (empty / "model.safetensors").write_bytes((hf_dir / "model.safetensors").read_bytes()[:5000])
    _assert_clean_failure(_run("hf-to-mcore", "--hf-dir", str(empty), "--out", str(out)), out, "corrupt")

    # weights that do not match the config
    config = json.loads((hf_dir / "config.json").read_text())
    config["intermediate_size"] = 96
    (empty / "config.json").write_text(json.dumps(config))
    (empty / "model.safetensors").write_bytes((hf_dir / "model.safetensors").read_bytes())
    _assert_clean_failure(_run("hf-to-mcore", "--hf-dir", str(empty), "--out", str(out)), out, "do not match")

    # output exists: refused, existing output untouched
    out.mkdir()
    (out / "keep").write_text("x")
    result = _run("hf-to-mcore", "--hf-dir", str(hf_dir), "--out", str(out))
    assert result.returncode != 0 and "already exists" in result.stderr and (out / "keep").is_file()
    result = _run("mcore-to-hf", "--ckpt", str(ckpt), "--out", str(out))
    assert result.returncode != 0 and "already exists" in result.stderr

    # a checkpoint that is partial (no metadata) or missing
    partial = tmp_path / "partial"
    partial.mkdir()
    out2 = tmp_path / "out2"
    _assert_clean_failure(_run("mcore-to-hf", "--ckpt", str(partial), "--out", str(out2)), out2, "incomplete")
    _assert_clean_failure(_run("mcore-to-hf", "--ckpt", str(tmp_path / "nope"), "--out", str(out2)), out2,
                          "does not exist")
