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


def _rotate_both_ways(dtype, head_dim: int, rot_dim: int):
    """Our rotation and megatron's of the same tensor: (outputs, input gradients) of each."""
    from types import SimpleNamespace

    from megatron.core.models.common.embeddings import rope_utils

    config = SimpleNamespace(apply_rope_fusion=False, multi_latent_attention=False, rotary_interleaved=False)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(12, 2, 3, head_dim, generator=generator).to(dtype)
    freqs = torch.randn(12, 1, 1, rot_dim, generator=generator) * 3
    grad = torch.randn(12, 2, 3, head_dim, generator=generator).to(dtype)
    results = []
    for apply in (rotary.apply_rotary_pos_emb, rope_utils.apply_rotary_pos_emb):
        t = x.clone().requires_grad_()
        out = apply(t, freqs, config)
        out.backward(grad)
        results.append((out.detach(), t.grad))
    return results


def test_the_rolled_rotation_is_megatrons_to_the_bit_forward_and_backward():
    for dtype in (torch.float32, torch.bfloat16):
        for head_dim, rot_dim in ((16, 16), (16, 8)):  # whole head, and a partial rotary dimension
            (ours, our_grad), (theirs, their_grad) = _rotate_both_ways(dtype, head_dim, rot_dim)
            assert ours.shape == theirs.shape
            assert torch.equal(ours, theirs), (dtype, head_dim, rot_dim)
            assert torch.equal(our_grad, their_grad), (dtype, head_dim, rot_dim)


def test_the_rotation_launches_four_kernels_each_way():
    seen = []

    class _Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    from types import SimpleNamespace

    config = SimpleNamespace(apply_rope_fusion=False, multi_latent_attention=False, rotary_interleaved=False)
    t = torch.randn(4, 1, 2, 8, requires_grad=True)
    freqs = torch.randn(4, 1, 1, 8)
    rotary.apply_rotary_pos_emb(t, freqs, config)  # cos and sin made (once per forward)
    with _Ops():
        out = rotary.apply_rotary_pos_emb(t, freqs, config)
    forward = [name for name in seen if name in ("mul", "roll", "add", "cat", "neg")]
    seen.clear()
    with _Ops():
        out.backward(torch.ones_like(out))
    backward = [name for name in seen if name in ("mul", "roll", "add", "cat", "neg", "slice_backward")]
    assert sorted(forward) == ["add", "mul", "mul", "roll"], forward
    assert len(backward) <= 4, backward
