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
- :func:`adopt_moe_layers`: megatron's MoE layer, which also trains under tensor parallelism
  without sequence parallelism (see the class).
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
from ebft_megatron.runtime import device, rows


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


def _token_slices(count: int, group) -> tuple[int, int, list[int]]:
    """(start, size) of this TP rank's share of ``count`` tokens, and every rank's share size: the
    shares of ``torch.tensor_split``, each at most one token longer than the next. Each share is
    padded to the longest (``runtime.rows``), so that a rank whose share is empty still has a row
    to route."""
    ranks, rank = torch.distributed.get_world_size(group), torch.distributed.get_rank(group)
    base, extra = divmod(count, ranks)
    sizes = [base + (r < extra) for r in range(ranks)]
    return rank * base + min(rank, extra), sizes[rank], sizes


def _own_share(tokens: torch.Tensor, group) -> torch.Tensor:
    """This TP rank's share of ``tokens`` (which every TP rank holds whole), padded with zero rows
    to the longest share."""
    start, size, sizes = _token_slices(tokens.shape[0], group)
    return rows.pad_rows(tokens[start:start + size], max(sizes)).contiguous()


class _OwnTokens(torch.autograd.Function):
    """This TP rank's padded share of tokens every TP rank holds (:func:`_own_share`); backward
    gathers the shares' gradients, so the input's gradient is whole, and the same, on every rank."""

    @staticmethod
    def forward(ctx, tokens, group):
        ctx.sizes, ctx.group = _token_slices(tokens.shape[0], group)[2], group
        return _own_share(tokens, group)

    @staticmethod
    def backward(ctx, grad):
        return rows.gather_rows(grad, ctx.sizes, ctx.group), None


class _AllTokens(torch.autograd.Function):
    """The (padded) shares of every TP rank, joined without their padding; backward keeps this
    rank's padded share of the gradient (which every rank holds whole)."""

    @staticmethod
    def forward(ctx, part, count: int, group):
        ctx.group = group
        return rows.gather_rows(part, _token_slices(count, group)[2], group)

    @staticmethod
    def backward(ctx, grad):
        return _own_share(grad, ctx.group), None, None


def _moe_layer_class():
    from megatron.core.transformer.moe.moe_layer import MoELayer as MegatronMoELayer

    class MoELayer(MegatronMoELayer):
        """megatron's MoE layer, also at TP > 1 without sequence parallelism.

        megatron's all-to-all dispatcher assumes the tokens are split over the TP ranks, as
        sequence parallelism splits them: it gathers every TP rank's tokens for the experts and
        reduce-scatters their outputs back. Without sequence parallelism each TP rank holds the
        whole sequence, the experts would see each token TP times and their weights would get TP
        times its gradient, and megatron refuses to train so. Sequence parallelism needs
        Transformer Engine here (a CPU has none), so this layer splits the tokens itself: each TP
        rank routes and computes its own share (``_OwnTokens``) and the shares are gathered after
        (``_AllTokens``), in training and inference alike. The router then sees a share of the
        tokens on each rank, as under sequence parallelism: its weight's gradient is a partial sum,
        marked ``sum_grad_over_tp`` for :func:`sum_grads_over_tp`, and so is each rank's
        part of the load-balancing loss (``models.experts`` sums it)."""

        splits_tokens = False

        def forward(self, hidden_states, intermediate_tensors=None, padding_mask=None):
            if not self.splits_tokens:
                return super().forward(hidden_states, intermediate_tensors, padding_mask=padding_mask)
            if padding_mask is not None or intermediate_tensors is not None:
                raise ValueError("the MoE layer takes no padding mask or intermediate tensors at TP > 1 without "
                                 "sequence parallelism")
            group = self.attn_tp_group
            s, b, h = hidden_states.shape
            own = _OwnTokens.apply(hidden_states.reshape(s * b, 1, h), group)
            # the rows padding a share are marked (megatron's router: True = padding), which also
            # sends the load-balancing loss to megatron's counted path: its token total is the TP
            # ranks' counts of real tokens summed, not a rank's share times TP
            _, size, _ = _token_slices(s * b, group)
            padding = (torch.arange(own.shape[0], device=own.device) >= size)[None]
            # megatron's check against training at TP > 1 without sequence parallelism reads the
            # module's flag; the tokens are split already (nothing else in the forward reads it: the
            # router, which adds the load-balancing loss, has its own)
            training, self.training = self.training, False
            try:
                output, bias = super().forward(own, padding_mask=padding)
            finally:
                self.training = training
            return _AllTokens.apply(output, s * b, group).reshape(s, b, h), bias

    return MegatronMoELayer, MoELayer


def adopt_moe_layers(model) -> None:
    """Make each of the model's megatron MoE layers our :class:`MoELayer` (built by megatron's spec,
    which passes its process groups only to the classes it knows; ours adds no state but the flag)."""
    megatron_class, ours = _moe_layer_class()
    for module in model.modules():
        if type(module) is megatron_class:
            module.__class__ = ours
            config = module.config
            module.splits_tokens = config.tensor_model_parallel_size > 1 and not config.sequence_parallel
            if module.splits_tokens:
                for param in module.router.parameters():
                    param.sum_grad_over_tp = True


def tp_partial_parameters(model) -> list:
    """The parameters whose gradients are partial sums over the TP ranks (routers that see a share
    of the tokens on each rank; :func:`adopt_moe_layers` marks them), to be summed by
    :func:`sum_grads_over_tp` once a step; empty for a dense model or at TP1."""
    return [param for param in model.parameters() if getattr(param, "sum_grad_over_tp", False) and param.requires_grad]


def sum_grads_over_tp(parameters: list) -> None:
    """Sum the gradients (megatron DDP's ``main_grad``) of ``parameters`` over the TP ranks, in one
    all-reduce; before DDP reduces them over DP."""
    from megatron.core import parallel_state as ps

    grads = [param.main_grad for param in parameters]
    flat = torch.cat([grad.reshape(-1) for grad in grads])
    torch.distributed.all_reduce(flat, group=ps.get_tensor_model_parallel_group())
    torch._foreach_copy_(grads, [part.view_as(grad) for part, grad in zip(flat.split([g.numel() for g in grads]),
                                                                          grads)])
