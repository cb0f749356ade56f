"""Layer parts that keep less for backward than megatron's local ones, swapped in through the layer
spec. An EBFT forward runs about five times the chunk's tokens, so what each layer keeps per token
is what bounds a step's memory.

- :class:`RMSNorm`: keeps its input and the per-token inverse RMS (h + 1 values per token); the
  normalised input is recomputed in backward. torch's RMSNorm keeps the normalised input too
  (except in CUDA's fused kernel, which :mod:`norm_kernels` calls there). One op each way.
  As Qwen3's per-head q/k norm it keeps a contiguous copy of the key: the key megatron hands it
  is a view of the fused qkv projection's output, which would otherwise stay alive whole.
- :class:`SwiGLU`: the gated activation as one function of the fc1 output [.., 2f] that keeps only
  that input; megatron's unfused path keeps the input, silu(x1), a copy of x2 and the product's
  operands (5f per token where this keeps 2f).
- :class:`SelfAttention`: hands the core attention a contiguous value. Megatron's value is a view
  of the fused qkv projection's output, so keeping the value for backward kept the whole [q; k; v]
  buffer alive; query and key are new tensors after the rotary embedding anyway.

Numerics are those of the parts they replace (fp32 statistics for the norm, as Hugging Face's
RMSNorm computes them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ebft_megatron.models import norm_kernels
from ebft_megatron.runtime import device


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps: float):
        out, inverse_rms = norm_kernels.rms_norm(x, weight, eps)
        ctx.save_for_backward(x, weight, inverse_rms)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, inverse_rms = ctx.saved_tensors
        d_x, d_weight = norm_kernels.rms_norm_backward(grad, x, inverse_rms, weight)
        return d_x, d_weight, None


class RMSNorm(torch.nn.Module):
    """RMSNorm with the constructor megatron's layer spec calls norms with."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, persist_layer_norm: bool = False,
                 zero_centered_gamma: bool = False, normalization: str = "RMSNorm"):
        super().__init__()
        if normalization != "RMSNorm" or zero_centered_gamma or config.sequence_parallel:
            raise ValueError("this RMSNorm supports normalization=RMSNorm without zero-centered gamma or "
                             "sequence parallelism")
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype, device=device.current()))

    def forward(self, x):
        # a view (the key split from the fused qkv output) would keep its whole buffer for backward
        return _RMSNormFunction.apply(x.contiguous(), self.weight, self.eps)


class _SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        gate, linear = x.chunk(2, dim=-1)
        ctx.save_for_backward(x)
        return F.silu(gate) * linear

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        gate, linear = x.chunk(2, dim=-1)
        sigmoid = torch.sigmoid(gate)
        d_x = torch.empty_like(x)
        d_gate, d_linear = d_x.chunk(2, dim=-1)
        torch.mul(grad, gate * sigmoid, out=d_linear)  # d/d linear = silu(gate)
        # d/d gate = linear * sigmoid * (1 + gate * (1 - sigmoid))
        torch.mul(grad * linear, sigmoid * (1 + gate * (1 - sigmoid)), out=d_gate)
        return d_x


class SwiGLU(torch.nn.Module):
    """silu(x1) * x2 of the fc1 output [.., 2f] = [x1; x2] (megatron's gated-unit layout)."""

    def __init__(self, config=None):
        super().__init__()

    def forward(self, x):
        return _SwiGLUFunction.apply(x)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None) -> dict:
        return {}  # no parameters (megatron's MLP asks each of its parts)


def self_attention_class():
    from megatron.core.transformer.attention import SelfAttention as MegatronSelfAttention

    class SelfAttention(MegatronSelfAttention):
        """megatron's SelfAttention with a contiguous value (see the module docstring)."""

        def get_query_key_value_tensors(self, *args, **kwargs):
            query, key, value, *rest = super().get_query_key_value_tensors(*args, **kwargs)
            return (query, key, value.contiguous(), *rest)

    return SelfAttention
