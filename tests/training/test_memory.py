"""The memory model (training.memory) against what autograd keeps and what the step shapes imply."""

from dataclasses import replace

import pytest
import torch

from ebft_megatron.models import architecture
from ebft_megatron.block_layout import BlockLayout
from ebft_megatron.training import memory

LAYOUT = BlockLayout(64, 8, 8, 8, 4)


def _arch(layers, family="llama"):
    if family == "mixtral":  # 4 experts of width 40, 2 per token
        return architecture.from_hf_config(dict(
            architectures=["MixtralForCausalLM"], hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=40, num_local_experts=4, num_experts_per_tok=2, num_hidden_layers=layers, vocab_size=300,
            tie_word_embeddings=True))
    if family == "qwen3":  # q/k norms, and a head width that is not hidden / heads
        return architecture.from_hf_config(dict(
            architectures=["Qwen3ForCausalLM"], hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
            head_dim=32, intermediate_size=160, num_hidden_layers=layers, vocab_size=300, tie_word_embeddings=True))
    return architecture.from_hf_config(dict(
        architectures=["LlamaForCausalLM"], hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=160, num_hidden_layers=layers, vocab_size=300, tie_word_embeddings=True))


def _kept_per_token(recompute, layers, family="llama"):
    """Elements autograd keeps per token after one packed forward of a fresh model (parameters
    excluded; each storage counted once, at its size after the forward: recompute may free some)."""
    from ebft_megatron.models.attention import packed_attention
    from ebft_megatron.models.gpt import build_model, model_forward
    from ebft_megatron.runtime import distributed
    from ebft_megatron.training.builder import recompute_overrides

    distributed.initialize(1, 1)
    model = build_model(_arch(layers, family), **recompute_overrides(recompute))
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = (storage, tensor.element_size())
        return tensor

    tokens = torch.randint(0, 300, (1, LAYOUT.packed_len), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model_forward(model, tokens, LAYOUT.position_ids[None], block_params=packed_attention(LAYOUT, return_hidden=True))
    return sum(storage.nbytes() // size for storage, size in storages.values()) / LAYOUT.packed_len


@pytest.mark.parametrize("family", ["llama", "qwen3", "mixtral"])
@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_activation_elements_per_layer_are_what_autograd_keeps(recompute, family):
    per_layer = _kept_per_token(recompute, 3, family) - _kept_per_token(recompute, 2, family)
    assert per_layer == pytest.approx(memory.layer_activation_elements(_arch(2, family), 1, recompute), abs=0.5)


def test_expert_parameters_are_counted_per_expert_parallel_rank():
    """A built mixture of experts holds what stage_parameters counts; at EP2 a rank holds half the
    experts, and the distributed optimizer shards the experts' state over dp / ep ranks only."""
    from ebft_megatron.models.gpt import build_model
    from ebft_megatron.runtime import distributed

    distributed.initialize(1, 1)
    arch = _arch(2, "mixtral")
    built = sum(p.numel() for p in build_model(arch).parameters())
    assert memory.stage_parameters(arch, 1, 1) == built
    experts = memory.stage_expert_parameters(arch, 1, 1, 1)
    assert experts == 2 * 4 * 3 * 64 * 40
    assert memory.stage_parameters(arch, 1, 1, ep=2) == built - experts / 2
    shape = memory.StepShape(64, 64, 0, False, dp=4)
    dense = built - experts
    # bf16 off: fp32 weights and gradients (8 bytes), Adam's moments (8) over the data-parallel ranks
    assert memory.estimate(arch, replace(shape, ep=2)).model_state == pytest.approx(
        dense * (8 + 8 / 4) + experts / 2 * (8 + 8 / 2))


def test_ebft_peak_grows_with_the_packed_length_and_full_recompute_caps_it():
    arch = _arch(8)

    def peak(mode, recompute, chunk_len=256):
        layout = BlockLayout(chunk_len, 8, 8, 8, 4)
        ebft = mode == "ebft"
        packed = layout.packed_len if ebft else chunk_len
        shape = memory.StepShape(chunk_len, packed, layout.num_rollout_tokens if ebft else 0, ebft,
                                 recompute=recompute, feature_layers=6)
        return memory.estimate(arch, shape)

    sft, ebft = peak("sft", "selective"), peak("ebft", "selective")
    assert ebft.phases["training"] > 4 * sft.phases["training"]  # about (P + NB*n*G) / P tokens
    assert ebft.model_state == sft.model_state and ebft.feature_network == sft.feature_network > 0
    assert peak("ebft", "full").phases["training"] < ebft.phases["training"] / 2
    assert peak("ebft", "selective", 512).peak > ebft.peak


def test_command_line_estimates_an_example_config_and_refuses_a_missing_architecture(capsys):
    root = __import__("pathlib").Path(__file__).resolve().parents[2]
    args = ["--config", str(root / "examples" / "ebft_qwen2.5_7b.yaml"), "--gpus", "8"]
    assert memory.main([*args, "--architecture", str(root / "examples" / "architectures" / "qwen2.5-7b.json")]) == 0
    line = capsys.readouterr().out.strip()
    assert "TP2 x PP1 x DP4" in line and "peak" in line and "GiB" in line
    assert memory.main([*args, "--architecture", "no/such/config.json"]) == 2
    assert "no/such/config.json does not exist" in capsys.readouterr().err
