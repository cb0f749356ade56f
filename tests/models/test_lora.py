"""LoRA adapters (models.lora), single process: a fresh adapter (B = 0) leaves the logits exactly as
they were; with B != 0, switching the adapters off gives exactly the base model back; only the
adapters train. Tensor and pipeline parallelism are covered by tests/parallel."""

import pytest
import torch

from tests.fixtures import load_megatron_model

FAMILIES = ("llama", "qwen3")  # tied embeddings; q/k norms with head_dim != hidden/heads


def _logits(model, tokens):
    """The real vocabulary's logits (the padded rows are -inf)."""
    from ebft_megatron.models import gpt

    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    vocab = model.architecture.vocab_size
    return gpt.forward(model, tokens, positions, reduce=lambda o: o[..., :vocab].clone())


def _tokens(arch, seed=0):
    return torch.randint(0, arch.vocab_size, (2, 17), generator=torch.Generator().manual_seed(seed))


def _randomize_b(model, seed=1):
    from ebft_megatron.models.lora import adapters

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, adapter in adapters(model):
            adapter.lora_b.copy_(torch.randn(adapter.lora_b.shape, generator=gen) * 0.2)


@pytest.mark.parametrize("family", FAMILIES)
def test_fresh_adapters_leave_the_logits_unchanged(tiny_models, family):
    from ebft_megatron.models.lora import attach_adapters

    model, arch = load_megatron_model(tiny_models[family][1])
    tokens = _tokens(arch)
    base = _logits(model, tokens)
    state = attach_adapters(model, rank=4, alpha=8.0)
    assert state.scale == 2.0
    assert torch.equal(_logits(model, tokens), base)


@pytest.mark.parametrize("family", FAMILIES)
def test_disabled_adapters_give_exactly_the_base_model(tiny_models, family):
    from ebft_megatron.models.lora import adapters, adapters_disabled, attach_adapters

    model, arch = load_megatron_model(tiny_models[family][1])
    tokens = _tokens(arch, seed=3)
    base = _logits(model, tokens)
    attach_adapters(model, rank=4, alpha=8.0)
    _randomize_b(model)
    # every target of every layer: 4 layers x qkv, proj, fc1, fc2
    assert len(list(adapters(model))) == arch.num_layers * 4
    enabled = _logits(model, tokens)
    with adapters_disabled(model):
        with adapters_disabled(model):  # nests
            pass
        off = _logits(model, tokens)
    assert torch.equal(off, base)
    assert float((enabled - base).abs().max()) > 1e-2
    assert torch.equal(_logits(model, tokens), enabled)  # back on after the context


def test_only_adapters_require_and_receive_gradients(tiny_models):
    from ebft_megatron.models.gpt import model_forward
    from ebft_megatron.models.lora import attach_adapters, lora_parameters

    model, arch = load_megatron_model(tiny_models["llama"][1])
    attach_adapters(model, rank=2, alpha=4.0, targets=("qkv", "fc2"))
    _randomize_b(model)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * 2 * arch.num_layers
    assert all(name.endswith(("linear_qkv_lora.lora_a", "linear_qkv_lora.lora_b",
                              "linear_fc2_lora.lora_a", "linear_fc2_lora.lora_b")) for name in trainable)
    assert {id(p) for p in lora_parameters(model)} == {id(p) for p in model.parameters() if p.requires_grad}
    tokens = _tokens(arch)
    logits = model_forward(model, tokens, torch.arange(17).expand_as(tokens))
    logits[..., : arch.vocab_size].float().logsumexp(-1).sum().backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and float(param.grad.abs().max()) > 0, name
        else:
            assert param.grad is None, name


def test_adapter_shapes_and_tensor_parallel_attributes(tiny_models):
    from ebft_megatron.models.lora import adapters, attach_adapters

    model, arch = load_megatron_model(tiny_models["qwen2"][1])
    attach_adapters(model, rank=3)
    by_target = {a.target: a for _, a in adapters(model)}
    h, f = arch.hidden_size, arch.ffn_hidden_size
    qkv_out = model.decoder.layers[0].self_attention.linear_qkv.weight.shape[0]
    assert by_target["qkv"].lora_a.shape == (3, h) and by_target["qkv"].lora_b.shape == (qkv_out, 3)
    assert by_target["fc1"].lora_b.shape == (2, f, 3)  # gate and up
    assert by_target["fc2"].lora_a.shape == (3, f) and by_target["fc2"].lora_b.shape == (h, 3)
    for adapter in by_target.values():
        sharded = adapter.lora_b if adapter.kind == "column" else adapter.lora_a
        replicated = adapter.lora_a if adapter.kind == "column" else adapter.lora_b
        assert sharded.tensor_model_parallel and not replicated.tensor_model_parallel
        assert sharded.partition_stride == 1
        assert float(adapter.lora_b.abs().max()) == 0
        bound = 1 / adapter.lora_a.shape[1] ** 0.5
        assert 0.5 * bound < float(adapter.lora_a.abs().max()) <= bound


def test_lora_settings_and_sequence_parallel_refusal(tiny_models):
    from ebft_megatron.config import ConfigError, load_config
    from ebft_megatron.models.lora import LoraError, attach_adapters

    config = load_config(overrides=["model.load=/c", "lora.rank=8", "lora.targets=[qkv, fc2]"])
    assert config.lora.rank == 8 and config.lora.alpha == 16.0 and config.lora.targets == ["qkv", "fc2"]
    assert load_config(overrides=["model.load=/c"]).lora.targets == ["qkv", "proj", "fc1", "fc2"]
    with pytest.raises(ConfigError, match="lora.targets"):
        load_config(overrides=["model.load=/c", "lora.rank=8", "lora.targets=[qkv, out]"])
    with pytest.raises(ConfigError, match="sequence_parallel"):
        load_config(overrides=["model.load=/c", "lora.rank=8", "parallel.tp=2", "parallel.sequence_parallel=true"])
    model, _ = load_megatron_model(tiny_models["llama"][1])
    model.config.sequence_parallel = True
    try:
        with pytest.raises(LoraError, match="sequence parallelism"):
            attach_adapters(model, rank=2)
    finally:
        model.config.sequence_parallel = False


def test_adapter_gradients_are_the_same_under_activation_recompute(tiny_models):
    """Selective recompute frees the norms' outputs (the qkv and fc1 inputs, which the adapters'
    A also keeps) and restores them before backward; full recompute re-runs each layer, hooks
    included. Either way the adapters get the gradients of a run without recompute."""
    from ebft_megatron.checkpoint import store
    from ebft_megatron.models.gpt import build_model, model_forward
    from ebft_megatron.models.lora import adapters, attach_adapters
    from ebft_megatron.runtime import distributed
    from ebft_megatron.training.builder import recompute_overrides

    distributed.initialize(1, 1)
    ckpt = tiny_models["qwen3"][1]
    arch = store.architecture_of(ckpt)
    tokens = _tokens(arch, seed=4)
    results = {}
    for mode in ("none", "selective", "full"):
        model = build_model(arch, **recompute_overrides(mode))
        store.load_model_weights(model, ckpt)
        attach_adapters(model, rank=4, alpha=8.0)
        _randomize_b(model)
        model.train()
        logits = model_forward(model, tokens, torch.arange(17).expand_as(tokens))
        logits[..., : arch.vocab_size].float().logsumexp(-1).sum().backward()
        results[mode] = {name: (a.lora_a.grad.clone(), a.lora_b.grad.clone()) for name, a in adapters(model)}
    for mode in ("selective", "full"):
        for name, (grad_a, grad_b) in results["none"].items():
            torch.testing.assert_close(results[mode][name][0], grad_a, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(results[mode][name][1], grad_b, rtol=1e-5, atol=1e-6)


def test_adapter_dropout_acts_in_training_only(tiny_models):
    from ebft_megatron.models.gpt import model_forward
    from ebft_megatron.models.lora import attach_adapters

    model, arch = load_megatron_model(tiny_models["llama"][1])
    tokens = _tokens(arch, seed=6)
    attach_adapters(model, rank=4, alpha=8.0, dropout=0.5)
    _randomize_b(model)
    evaluated = _logits(model, tokens)  # gpt.forward runs the model in eval mode
    model.train()
    with torch.no_grad():
        positions = torch.arange(17).expand_as(tokens)
        first, second = (model_forward(model, tokens, positions)[..., : arch.vocab_size] for _ in range(2))
    assert not torch.equal(first, second) and not torch.equal(first, evaluated)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model_forward(model, tokens, positions)[..., : arch.vocab_size], evaluated)


def test_a_mixture_of_experts_takes_adapters_on_its_attention_only(tiny_models):
    """The MLP targets are refused in one line naming the setting; on qkv and proj the adapters are
    the only trained parameters (router and experts frozen) and switched off give the base model."""
    from ebft_megatron.models.lora import LoraError, adapters, adapters_disabled, attach_adapters

    model, arch = load_megatron_model(tiny_models["qwen3_moe"][1])
    with pytest.raises(LoraError) as err:
        attach_adapters(model, rank=4)
    assert "\n" not in str(err.value) and "['fc1', 'fc2']" in str(err.value)
    assert "lora.targets=[qkv,proj]" in str(err.value)
    assert not list(adapters(model))  # nothing attached by the refused call
    tokens = _tokens(arch, seed=5)
    base = _logits(model, tokens)
    attach_adapters(model, rank=4, alpha=8.0, targets=("qkv", "proj"))
    _randomize_b(model)
    assert len(list(adapters(model))) == arch.num_layers * 2
    trained = [name for name, param in model.named_parameters() if param.requires_grad]
    assert trained and all("_lora." in name for name in trained)
    assert not torch.equal(_logits(model, tokens), base)
    with adapters_disabled(model):
        assert torch.equal(_logits(model, tokens), base)
