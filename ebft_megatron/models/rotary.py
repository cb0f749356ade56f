"""Rotary embeddings whose cos and sin are computed once per forward, not in every layer.

megatron-core's unfused RoPE (``rope_utils.apply_rotary_pos_emb``, what runs without Transformer
Engine's fused kernel) takes cos and sin of the same frequencies for the query and the key of
every layer: four elementwise kernels per layer and forward that compute nothing new. The model
computes the frequencies once per forward (``GPTModel.rotary_pos_emb``) and hands the same tensor
to every layer, so :func:`apply_rotary_pos_emb` keeps the cos and sin of the last frequencies it
saw and reuses them while that tensor is the one handed in.

The rotation itself takes fewer kernels than megatron's. Megatron rotates half of the head as
``cat(-x2, x1)`` (a negation and a copy), then copies the result once more to append the part
beyond the rotary dimension, even when that part is empty; its backward mirrors each step. Here
the sine is stored with its first half negated (once per forward), so that the rotated term is
``roll(x, half) * signed_sin``: ``(-x2) * s1`` is ``x2 * (-s1)`` exactly, so the forward and
the gradient are megatron's to the bit, in four kernels each way instead of six and seven.
Fused RoPE, interleaved rotation, packed (THD) sequences and multi-latent attention go to
megatron's own function unchanged.
"""

from __future__ import annotations

import weakref

import torch

_megatron_apply = None
_last = None  # (weak reference to the frequencies, mscale, dtype, cos, sin)


def _cos_sin(freqs: torch.Tensor, mscale: float, dtype):
    """cos and the signed sin ``[-sin1, sin2]`` of ``freqs`` (cast to ``dtype``), made once per forward."""
    global _last
    if _last is not None and _last[0]() is freqs and _last[1:3] == (mscale, dtype):
        return _last[3], _last[4]
    cos = (torch.cos(freqs) * mscale).to(dtype)
    sin = (torch.sin(freqs) * mscale).to(dtype)
    signed_sin = torch.cat((-sin[..., :sin.shape[-1] // 2], sin[..., sin.shape[-1] // 2:]), dim=-1)
    _last = (weakref.ref(freqs), mscale, dtype, cos, signed_sin)
    return cos, signed_sin


def apply_rotary_pos_emb(t, freqs, config, cu_seqlens=None, mscale: float = 1.0, cp_group=None):
    """megatron's ``apply_rotary_pos_emb`` (same values to the bit), with cos and sin shared by the
    layers of a forward and the half-rotation as a roll (see the module)."""
    if (config.apply_rope_fusion or cu_seqlens is not None or config.multi_latent_attention
            or config.rotary_interleaved):
        return _megatron_apply(t, freqs, config, cu_seqlens=cu_seqlens, mscale=mscale, cp_group=cp_group)
    rot_dim = freqs.shape[-1]
    cos, signed_sin = _cos_sin(freqs, mscale, t.dtype)
    if rot_dim == t.shape[-1]:
        return t * cos + t.roll(rot_dim // 2, dims=-1) * signed_sin
    t, t_pass = t[..., :rot_dim], t[..., rot_dim:]
    return torch.cat((t * cos + t.roll(rot_dim // 2, dims=-1) * signed_sin, t_pass), dim=-1)


def install() -> None:
    """Put :func:`apply_rotary_pos_emb` where megatron's attention calls it. Safe to call many times."""
    global _megatron_apply
    from megatron.core.transformer import attention

    if _megatron_apply is None:
        _megatron_apply = attention.apply_rotary_pos_emb
        attention.apply_rotary_pos_emb = apply_rotary_pos_emb
