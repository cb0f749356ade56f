"""CPU emulations of torch's CUDA memory-efficient attention operators that read memory the way
the CUDA kernels do, not the way torch's strides say.

``attention_kernels`` hands its CUDA branch to ``_scaled_dot_product_efficient_attention`` and its
backward. On a CPU those operators do not exist, and a stand-in that reads its inputs through
torch's strides proves nothing about what the kernels read. These emulations take each operand's
storage, storage offset and only the strides the CUDA launcher passes to the kernel, assume the
ones it does not pass, and read the elements there (an element past the end of the storage reads
as NaN, as garbage would). What they emulate, from PyTorch's sources (``aten/src/ATen/native/
transformers/cuda/attention.cu``, ``attention_backward.cu`` and ``mem_eff_attention/
kernel_forward.h``, ``kernel_backward.h``):

- operands arrive as [B, H, L, d] and are read as [B, L, H, d] (BMHK); the last dimension must be
  contiguous (the launchers check it);
- q, k, v are read through their batch, row and head strides, which must be multiples of 128 bits
  as must their offsets, and must have as many key heads as query heads; grad_out is copied to
  [B, L, H, d] by the operator;
- the backward reads ``out`` through its batch and head strides only: in half precision the kernel
  computes Delta = rowsum(dO * O) itself and takes O's row stride to be H * d (``o_strideM()``);
  in fp32 the launcher computes Delta in torch from the real strides;
- the bias is read through the strides of its [B, H, Lq, Lk] view, its last dimension contiguous,
  its other strides multiples of 128 bits (0 allowed), its dtype the query's; the kernel's softmax
  scales scores by log2(e) in fp32, where a bias at the dtype's lowest value overflows to -inf;
- the log-sum-exp the forward returns is [B, H, L padded to a multiple of 32], the padding +inf;
  the backward reads it as contiguous rows of that padded length, padding included;
- ``is_causal`` aligns the first query with the first key.

Beyond what the kernels read, the emulations hold the contract ``attention_kernels`` promises:
masks are finite (the kernels' running maximum turns a key block of -inf into NaN), and no row is
handed to a kernel without a visible key.
"""

from __future__ import annotations

import math

import torch

LSE_ALIGNMENT = 32
# strides and pointers the kernels need aligned: 128 bits (kAlignmentQ, kMinimumAlignment)
ALIGNMENT_BITS = 128
LOG2E = 1.4426950408889634
HALF = (torch.float16, torch.bfloat16)


# bias values at or below this hide a key (masks hold large negative values, visible keys 0)
MASKED_BELOW = -1e30


class KernelContractError(AssertionError):
    """An input the CUDA kernel would refuse, or read wrongly."""


def read_as_kernel(tensor: torch.Tensor, sizes, strides) -> torch.Tensor:
    """The elements a kernel reads from ``tensor``'s memory at its storage offset with ``strides``
    (elements) over ``sizes``, as fp32; reads past the end of the storage give NaN."""
    storage = torch.empty(0, dtype=tensor.dtype).set_(tensor.untyped_storage())
    offsets = torch.full((), tensor.storage_offset(), dtype=torch.long)
    for dim, (size, stride) in enumerate(zip(sizes, strides)):
        shape = [1] * len(sizes)
        shape[dim] = size
        offsets = offsets + (torch.arange(size) * stride).view(shape)
    inside = offsets < storage.numel()
    values = storage[offsets.clamp(max=storage.numel() - 1)].float()
    return values.masked_fill(~inside, float("nan"))


def _alignment(dtype) -> int:
    """Elements in the 128 bits the kernels load at a time."""
    return ALIGNMENT_BITS // torch.finfo(dtype).bits


def _bmhk(x: torch.Tensor, name: str) -> torch.Tensor:
    """[B, H, L, d] operand -> what the kernel reads through its B, M (row) and H strides: [B, L, H, d]."""
    if x.stride(-1) != 1:
        raise KernelContractError(f"{name}: the last dimension must be contiguous")
    alignment = _alignment(x.dtype)
    if any(stride % alignment for stride in x.stride()[:3]) or x.storage_offset() % alignment:
        raise KernelContractError(f"{name}: strides {x.stride()} or offset {x.storage_offset()} are not "
                                  f"multiples of {alignment} elements")
    B, H, L, d = x.shape
    return read_as_kernel(x, (B, L, H, d), (x.stride(0), x.stride(2), x.stride(1), 1))


def _out_as_read_by_backward(out: torch.Tensor) -> torch.Tensor:
    """``out`` [B, H, L, d] as the half-precision backward kernel reads it: batch and head strides
    as given, row stride H * d."""
    if out.stride(-1) != 1:
        raise KernelContractError("out: the last dimension must be contiguous")
    B, H, L, d = out.shape
    return read_as_kernel(out, (B, L, H, d), (out.stride(0), H * d, out.stride(1), 1))


def _bias(bias, q: torch.Tensor, Lk: int):
    """The bias as the kernel reads it, [B, H, Lq, Lk] fp32, after the launcher's checks."""
    if bias is None:
        return None
    B, H, Lq, _ = q.shape
    if bias.dtype != q.dtype:
        raise KernelContractError(f"bias dtype {bias.dtype} is not the query's {q.dtype}")
    if tuple(bias.shape) != (B, H, Lq, Lk):
        raise KernelContractError(f"bias shape {tuple(bias.shape)} is not [B, H, Lq, Lk] = {(B, H, Lq, Lk)}")
    if bias.stride(-1) != 1:
        raise KernelContractError("bias: the last dimension must be contiguous")
    alignment = _alignment(bias.dtype)
    if any(stride % alignment for stride in bias.stride()[:3]):
        raise KernelContractError(f"bias strides {bias.stride()}: the row stride is not a multiple of {alignment}")
    values = read_as_kernel(bias, (B, H, Lq, Lk), bias.stride())
    if not torch.isfinite(values).all():
        raise KernelContractError("bias holds non-finite values (use the dtype's lowest finite value)")
    return values


def _scores(q, k, bias, causal: bool, scale: float) -> torch.Tensor:
    """q, k [B, L, H, d] fp32 -> scores [B, H, Lq, Lk] with the bias and the causal mask applied;
    refuses a row that sees no key."""
    scores = torch.einsum("blhd,bkhd->bhlk", q, k) * scale
    Lq, Lk = scores.shape[-2:]
    visible = torch.ones(Lq, Lk, dtype=torch.bool)
    if bias is not None:
        scores = scores + bias
        # the kernel's softmax works in base 2: a score the scaling takes past fp32 is -inf there
        scores = torch.where(torch.isfinite(scores * LOG2E), scores, float("-inf"))
        visible = visible & (bias > MASKED_BELOW)
    if causal:
        causal_visible = torch.ones(Lq, Lk, dtype=torch.bool).tril()
        scores = scores.masked_fill(~causal_visible, float("-inf"))
        visible = visible & causal_visible
    if not visible.any(-1).all():
        raise KernelContractError("a query row is handed to the kernel without a visible key")
    return scores


def _check_heads(q, k, v):
    if not (q.shape[1] == k.shape[1] == v.shape[1]):
        raise KernelContractError(f"heads {q.shape[1]}/{k.shape[1]}/{v.shape[1]}: the kernel needs equal heads")


def efficient_attention_forward(q, k, v, bias, compute_log_sumexp, dropout_p, is_causal, *, scale=None):
    """``aten._scaled_dot_product_efficient_attention`` as the CUDA kernel computes it."""
    if dropout_p != 0.0:
        raise KernelContractError("dropout is not emulated")
    _check_heads(q, k, v)
    B, H, L, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qs, ks, vs = _bmhk(q, "query"), _bmhk(k, "key"), _bmhk(v, "value")
    scores = _scores(qs, ks, _bias(bias, q, k.shape[2]), is_causal, scale)
    lse = torch.logsumexp(scores, dim=-1)  # [B, H, L]
    out = torch.einsum("bhlk,bkhd->blhd", torch.exp(scores - lse[..., None]), vs)
    out = out.to(q.dtype).transpose(1, 2)  # allocated [B, L, H, d], handed back as [B, H, L, d]
    padded = torch.full((B, H, -(-L // LSE_ALIGNMENT) * LSE_ALIGNMENT if compute_log_sumexp else 0), float("inf"))
    padded[..., :L] = lse if compute_log_sumexp else padded[..., :L]
    empty = torch.empty((), dtype=torch.long)
    return out, padded, empty, empty


def efficient_attention_backward(grad_out, q, k, v, bias, out, logsumexp, philox_seed, philox_offset,
                                 dropout_p, grad_input_mask, is_causal, *, scale=None):
    """``aten._scaled_dot_product_efficient_attention_backward`` as the CUDA kernel computes it."""
    if dropout_p != 0.0:
        raise KernelContractError("dropout is not emulated")
    _check_heads(q, k, v)
    B, H, L, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    lse_rows = -(-L // LSE_ALIGNMENT) * LSE_ALIGNMENT
    if tuple(logsumexp.shape) != (B, H, lse_rows) or not logsumexp.is_contiguous():
        raise KernelContractError(f"logsumexp must be contiguous [B, H, {lse_rows}], got "
                                  f"{tuple(logsumexp.shape)} strides {logsumexp.stride()}")
    if not torch.all(logsumexp[..., L:] == float("inf")):
        raise KernelContractError("logsumexp: the kernel reads its padding, which must be +inf as the forward wrote it")
    qs, ks, vs = _bmhk(q, "query"), _bmhk(k, "key"), _bmhk(v, "value")
    dout = grad_out.float().transpose(1, 2)  # the operator copies it to [B, L, H, d] itself
    if q.dtype in HALF:  # the kernel computes Delta from O, assuming O's row stride
        delta = (dout * _out_as_read_by_backward(out)).sum(-1).transpose(1, 2)  # [B, H, L]
    else:  # the launcher computes Delta in torch
        delta = (grad_out.float() * out.float()).sum(-1)
    scores = _scores(qs, ks, _bias(bias, q, k.shape[2]), is_causal, scale)
    probs = torch.exp(scores - logsumexp[..., :L, None])  # [B, H, Lq, Lk]
    d_probs = torch.einsum("blhd,bkhd->bhlk", dout, vs)
    d_scores = probs * (d_probs - delta[..., None])
    dq = torch.einsum("bhlk,bkhd->bhld", d_scores, ks) * scale
    dk = torch.einsum("bhlk,blhd->bhkd", d_scores, qs) * scale
    dv = torch.einsum("bhlk,blhd->bhkd", probs, dout)
    grads = [g.to(q.dtype) if wanted else None
             for g, wanted in zip((dq, dk, dv), grad_input_mask[:3])]
    return (*grads, None)
