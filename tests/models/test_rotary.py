"""Rotary embeddings take cos and sin once per forward, and give megatron's results to the bit."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ebft_megatron.models import rotary


class _CountCos(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += func.overloadpacket is torch.ops.aten.cos
        return func(*args, **(kwargs or {}))


def test_one_cos_per_forward_and_megatrons_numbers(tiny_models, monkeypatch):
    from megatron.core.transformer import attention

    from ebft_megatron.models import gpt
    from tests.fixtures import load_megatron_model

    net, arch = load_megatron_model(tiny_models["qwen2"][1])
    assert arch.num_layers >= 2 and attention.apply_rotary_pos_emb is rotary.apply_rotary_pos_emb
    tokens = torch.randint(0, arch.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(12).expand(2, 12)

    def logits():
        counter = _CountCos()
        with torch.no_grad(), counter:
            out = gpt.forward(net, tokens, positions, reduce=lambda x: x)
        return out, counter.calls

    ours, cos_calls = logits()
    assert cos_calls == 1  # one for the forward: every layer's query and key reuse it
    monkeypatch.setattr(attention, "apply_rotary_pos_emb", rotary._megatron_apply)
    theirs, their_calls = logits()
    assert their_calls == 2 * arch.num_layers
    assert torch.equal(ours, theirs)
