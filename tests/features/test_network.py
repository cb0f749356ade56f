"""The feature network against the full Hugging Face model's hidden states (single process; the
TP/PP versions run in tests/parallel)."""

import pytest
import torch

from ebft_megatron.features.network import (
    FeatureConfigError,
    check_feature_layers,
    embed,
    load_feature_network,
)
from ebft_megatron.block_layout import BlockLayout


def hf_gram_by_length(hf_dir, layout, chunk, rollouts, layers, pooling):
    """Features from HF hidden_states of independent forwards, pooled, as Gram matrices."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    B, G, n = chunk.shape[0], layout.rollout_len, layout.num_samples

    def features(seq, start):
        with torch.no_grad():
            hidden = model(input_ids=seq, output_hidden_states=True).hidden_states
        token = torch.cat([hidden[layer][:, start:start + G] for layer in layers], dim=-1).double()
        token = token / token.norm(dim=-1, keepdim=True)
        if pooling == "mean":
            token = token.cumsum(1) / torch.arange(1, G + 1, dtype=token.dtype)[None, :, None]
        return token  # [B, G, D]: the pooled feature for every completion length

    grams = []
    for b, anchor in enumerate(layout.anchor_positions.tolist()):
        group = [features(chunk[:, : anchor + G], anchor)]
        group += [features(torch.cat([chunk[:, :anchor], rollouts[:, b, i]], 1), anchor) for i in range(n)]
        stacked = torch.stack(group, dim=2)  # [B, G, n+1, D]
        grams.append(stacked @ stacked.transpose(-1, -2))
    return torch.stack(grams, dim=1)  # [B, NB, G, n+1, n+1]


@pytest.mark.parametrize("pooling", ["last_token", "mean"])
@pytest.mark.parametrize("family,layers", [("llama", (1, 2, 3)), ("qwen2", (2, 3))])
def test_feature_moments_equal_hf_hidden_states(tiny_models, family, layers, pooling):
    from ebft_megatron.runtime import distributed

    distributed.initialize(1, 1)
    hf_dir, ckpt = tiny_models[family]
    model = load_feature_network(ckpt, layers)
    assert len(model.decoder.layers) == max(layers)  # built only up to the deepest feature layer
    layout = BlockLayout(20, 4, 4, 4, 3)
    gen = torch.Generator().manual_seed(11)
    chunk = torch.randint(0, 300, (2, 20), generator=gen)
    rollouts = torch.randint(0, 300, (2, layout.num_blocks, 3, 4), generator=gen)
    rollouts[:, :, 1] = rollouts[:, :, 0]  # duplicates must give identical features
    ours = embed(model, layout, layout.pack(chunk, rollouts), pooling).gram_by_length
    ref = hf_gram_by_length(hf_dir, layout, chunk, rollouts, layers, pooling)
    assert ours.shape == ref.shape == (2, layout.num_blocks, 4, 4, 4)
    assert (ours - ref).abs().max() < 1e-5
    assert (ours[..., 1, 1] - ours[..., 1, 2]).abs().max() < 1e-6  # duplicates: phi_1 . phi_1 = phi_1 . phi_2


def test_feature_layer_settings_are_checked():
    assert check_feature_layers([3, 1], 4) == (1, 3)
    with pytest.raises(FeatureConfigError, match="outside 1..4"):
        check_feature_layers([0, 2], 4)
    with pytest.raises(FeatureConfigError, match="repeat"):
        check_feature_layers([2, 2], 4)
