"""Rotary embeddings whose cos and sin are computed once per forward, not in every layer.

megatron-core's unfused RoPE (``rope_utils.apply_rotary_pos_emb``, what runs without Transformer
Engine's fused kernel) takes cos and sin of the same frequencies for the query and the key of
every layer: four elementwise kernels per layer and forward that compute nothing new. The model
computes the frequencies once per forward (``GPTModel.rotary_pos_emb``) and hands the same tensor
to every layer, so :func:`apply_rotary_pos_emb` keeps the cos and sin of the last frequencies it
saw and reuses them while that tensor is the one handed in. The arithmetic is megatron's, in
megatron's order: the results are the same to the bit. Fused RoPE, packed (THD) sequences and
multi-latent attention go to megatron's own function unchanged.
"""

from __future__ import annotations

import weakref

import torch

_megatron_apply = None
_last = None  # (weak reference to the frequencies, mscale, dtype, cos, sin)


def _cos_sin(freqs: torch.Tensor, mscale: float, dtype):
    global _last
    if _last is not None and _last[0]() is freqs and _last[1:3] == (mscale, dtype):
        return _last[3], _last[4]
    cos = (torch.cos(freqs) * mscale).to(dtype)
    sin = (torch.sin(freqs) * mscale).to(dtype)
    _last = (weakref.ref(freqs), mscale, dtype, cos, sin)
    return cos, sin


def apply_rotary_pos_emb(t, freqs, config, cu_seqlens=None, mscale: float = 1.0, cp_group=None):
    """megatron's ``apply_rotary_pos_emb``, with cos and sin shared by the layers of a forward."""
    if config.apply_rope_fusion or cu_seqlens is not None or config.multi_latent_attention:
        return _megatron_apply(t, freqs, config, cu_seqlens=cu_seqlens, mscale=mscale, cp_group=cp_group)
    from megatron.core.models.common.embeddings.rope_utils import _rotate_half

    rot_dim = freqs.shape[-1]
    t, t_pass = t[..., :rot_dim], t[..., rot_dim:]
    cos, sin = _cos_sin(freqs, mscale, t.dtype)
    t = (t * cos) + (_rotate_half(t, config.rotary_interleaved) * sin)
    return torch.cat((t, t_pass), dim=-1)


def install() -> None:
    """Put :func:`apply_rotary_pos_emb` where megatron's attention calls it. Safe to call many times."""
    global _megatron_apply
    from megatron.core.transformer import attention

    if _megatron_apply is None:
        _megatron_apply = attention.apply_rotary_pos_emb
        attention.apply_rotary_pos_emb = apply_rotary_pos_emb
