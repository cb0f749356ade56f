"""Fused attention kernels that return each query row's log-sum-exp, forward and backward.

The block attention (``models.fused_attention``) splits a query's keys into parts (the chunk, the
chunk prefix of a rollout block, the block's own earlier tokens), attends to each part with one
of these kernels, and merges the parts exactly through their log-sum-exps. None of the kernels
writes a score matrix to memory.

- CPU: torch's flash-attention operators for CPU (``_scaled_dot_product_flash_attention_for_cpu``
  and its backward).
- CUDA: torch's memory-efficient attention operators (``_scaled_dot_product_efficient_attention``
  and its backward), the CUDA kernels that take an additive mask and return the log-sum-exp.

Both backward operators take the attention output and the log-sum-exp as inputs, and recompute
the probabilities from them as exp(q.k * scale - lse). Given the *merged* output and log-sum-exp
of all parts, the backward of one part is that part's exact share of the gradient (the way ring
attention computes its backward one key block at a time).

Tensors are [batch, heads, rows, head_dim]; keys and values may have fewer heads than the queries
(grouped-query attention: query head h uses key head h // (heads / key heads), megatron's
grouping). The CPU kernels take grouped keys as they are; the CUDA ones get them expanded here and
their gradients summed back. Masks are additive, in the query's dtype, broadcastable to [batch,
heads, rows, keys], and prepared once with :func:`prepare_mask`.
"""

from __future__ import annotations

import functools

import torch

_aten = torch.ops.aten
# absent from old builds; the packed block attention then falls back to the generic path
_cpu_forward = getattr(_aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_cpu_backward = getattr(_aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
_cuda_forward = getattr(_aten, "_scaled_dot_product_efficient_attention", None)
_cuda_backward = getattr(_aten, "_scaled_dot_product_efficient_attention_backward", None)

# What the CUDA operators assume of what they are handed (PyTorch's aten/src/ATen/native/
# transformers/cuda/attention.cu, attention_backward.cu and mem_eff_attention/kernel_forward.h,
# kernel_backward.h; the same from torch 2.3 through 2.13). Operands arrive as [B, H, L, d] and are
# read as [B, L, H, d]:
# - q, k, v: the last dimension contiguous; batch, row and head strides are passed to the kernel
#   and must be multiples of 128 bits (8 bf16/fp16 or 4 fp32 elements), as must the data pointer;
#   key heads equal to query heads.
# - out, in the backward: only its batch and head strides are passed. In half precision the kernel
#   computes Delta = rowsum(dO * O) itself and takes O's row stride to be H * d
#   (``Params::o_strideM()``), so ``out`` must be laid out dense as [B, L, H, d]; any other view
#   (rows of a [S, B, H, d] tensor at B > 1) is read from the wrong rows and past its end.
#   grad_out is copied to that layout by the operator itself.
# - logsumexp, in the backward: fp32, contiguous [B, H, L padded to a multiple of 32]; the kernel
#   reads the padding too, which the forward fills with +inf (no probability for padded rows).
# - the bias: the query's dtype, shape [B, H, Lq, Lk] (stride 0 allowed), last dimension contiguous,
#   its other strides multiples of 128 bits; the operator does not pad it.
# - a query row whose keys are all masked gives NaN (its output is 0 * inf; the backward's
#   exp(score - lse) then spreads NaN over the whole head), and masked scores are multiplied by
#   log2(e) in fp32 inside the kernel, where the dtype's lowest value overflows to -inf.
_CUDA_MASK_ALIGNMENT = 16  # bias rows: 16 elements covers 128 bits of every dtype
_CUDA_LSE_ALIGNMENT = 32


def masked_value(dtype: torch.dtype) -> float:
    """The additive mask's value for a hidden key: finite (the kernels' maxima and sums stay
    defined) and still finite after the CUDA kernel scales it by log2(e) in fp32, so half the
    dtype's lowest value, not the lowest (which the authors' code and Axolotl use with dense
    attention, and which overflows to -inf there)."""
    return torch.finfo(dtype).min / 2


def _kernel_type(device: torch.device) -> str:
    """Which kernels run on ``device``'s data: without CUDA that is the host's, also for the device
    guard's emulated GPU tensors (their data is on the host)."""
    return device.type if torch.cuda.is_available() else "cpu"


def available(device: torch.device) -> bool:
    """Whether fused kernels exist for tensors on ``device``."""
    if _kernel_type(device) == "cpu":
        return _cpu_forward is not None and _cpu_backward is not None
    if _kernel_type(device) == "cuda":
        return _cuda_forward is not None and _cuda_backward is not None
    return False


def prepare_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool visibility (True = may attend), [..., rows, keys] -> the additive mask the kernels
    take on this device (0 where visible, :func:`masked_value` where not). On CUDA the rows are
    stored with an aligned stride; the returned tensor is a view of the visible width.

    A row without any visible key is left open (every key visible): no kernel is handed a row
    without a visible key (see above). The caller discards such rows (:func:`blind_rows`): their
    output and log-sum-exp are overwritten, and their output gradient is zero in the backward."""
    keys = allowed.shape[-1]
    pad = 0 if _uses_cpu_kernels(allowed) else (-keys) % _CUDA_MASK_ALIGNMENT
    mask = torch.zeros(*allowed.shape[:-1], keys + pad, dtype=dtype, device=allowed.device)
    hidden = ~allowed & allowed.any(dim=-1, keepdim=True)
    mask[..., :keys].masked_fill_(hidden, masked_value(dtype))
    return mask[..., :keys]


def blind_rows(allowed: torch.Tensor) -> torch.Tensor:
    """Bool [..., rows]: the rows of ``allowed`` [..., rows, keys] that see no key (whether there
    are any is not asked: that would wait for the device)."""
    return ~allowed.any(dim=-1)


def _expand_heads(x, heads: int):
    """[B, Hkv, L, d] -> [B, heads, L, d] (a copy) for the CUDA kernels, which need equal heads."""
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


def _sum_heads(grad, key_heads: int):
    """The gradient of :func:`_expand_heads`."""
    B, H, L, d = grad.shape
    return grad if H == key_heads else grad.view(B, key_heads, H // key_heads, L, d).sum(2)


def _cuda_bias(mask, q, k):
    if mask is None:
        return None
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    return mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])


def _uses_cpu_kernels(tensor) -> bool:
    return _kernel_type(tensor.device) == "cpu"


def attend(q, k, v, scale: float, mask=None, causal: bool = False, key_bounds: tuple = ()):
    """-> (out [B, H, L, d] in q's dtype, lse [B, H, L] fp32). ``causal`` aligns the first query
    with the first key (used for square parts only). ``key_bounds`` ((row_stop, key_stop), ...),
    row stops increasing to L, promises that the rows before each row stop see no key at or after
    its key stop (the mask hides them): the host's kernel may then skip such keys (see
    :func:`_cpu_bounded_forward`). CUDA's kernel takes all rows in one call (its cost there is the
    launch, not the masked keys), and so does the device guard's emulated GPU."""
    if _uses_cpu_kernels(q):
        if key_bounds and not q.is_cuda:
            return _cpu_bounded_forward(q, k, v, scale, mask, key_bounds)
        return _cpu_forward(q, k, v, 0.0, causal, attn_mask=mask, scale=scale)
    k, v = _expand_heads(k, q.shape[1]), _expand_heads(v, q.shape[1])
    out, lse, _, _ = _cuda_forward(q, k, v, _cuda_bias(mask, q, k), True, 0.0, causal, scale=scale)
    return out, lse[..., : q.shape[2]]


# The host's decode prefix call runs over runs of rows, each over the keys its rows can see rounded
# up to a whole tile of this many (at P = 1024, 8 runs, each block's rows reading on average 64
# keys its mask hides, against 256 with torch's own 512-key blocks). A tile's hidden keys add
# exactly zero to a row's sums, but the host's matrix products over fewer keys add in another
# order: the values equal one call over all keys to fp32 rounding, not to the bit.
CPU_KEY_TILE = 128


@functools.lru_cache(maxsize=64)
def _cpu_tiles(key_bounds: tuple, key_len: int) -> tuple:
    """``key_bounds`` with key stops rounded up to whole key tiles, runs with the same stop merged."""
    tiles = []
    for row_stop, key_stop in key_bounds:
        stop = min(key_len, -(-key_stop // CPU_KEY_TILE) * CPU_KEY_TILE)
        if tiles and tiles[-1][1] == stop:
            tiles[-1] = (row_stop, stop)
        else:
            tiles.append((row_stop, stop))
    return tuple(tiles)


def _cpu_bounded_forward(q, k, v, scale: float, mask, key_bounds: tuple):
    """The host's kernel over runs of rows, each over the key tiles it can see: a decode step's
    rows see prefixes that grow block by block, so with all keys in one call a row would read
    twice the keys it sees, on average."""
    tiles = _cpu_tiles(key_bounds, k.shape[2])
    if len(tiles) == 1:
        return _cpu_forward(q, k, v, 0.0, False, attn_mask=mask, scale=scale)[:2]
    outs, lses, row_start = [], [], 0
    for row_stop, key_stop in tiles:
        tile_mask = None if mask is None else mask[..., row_start:row_stop, :key_stop]
        out, lse = _cpu_forward(q[..., row_start:row_stop, :], k[..., :key_stop, :], v[..., :key_stop, :], 0.0, False,
                                attn_mask=tile_mask, scale=scale)[:2]
        outs.append(out)
        lses.append(lse)
        row_start = row_stop
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def _rows_dense(x):
    """[B, H, L, d] -> the same values laid out dense as [B, L, H, d] (a view of it; no copy when
    they already are)."""
    rows = x.transpose(1, 2)
    return x if rows.is_contiguous() else rows.contiguous().transpose(1, 2)


def attend_backward(grad_out, q, k, v, out, lse, scale: float, mask=None, causal: bool = False):
    """-> (dq, dk, dv) of this key part, given the merged ``out`` and ``lse`` of all parts."""
    if _uses_cpu_kernels(q):
        return _cpu_backward(grad_out, q, k, v, out, lse, 0.0, causal, attn_mask=mask, scale=scale)
    rows = lse.shape[-1]
    padded = torch.nn.functional.pad(lse, (0, (-rows) % _CUDA_LSE_ALIGNMENT), value=float("inf")).contiguous()
    unused = torch.zeros((), dtype=torch.long)  # dropout's RNG seed and offset (no dropout): defined values
    key_heads = k.shape[1]
    k, v = _expand_heads(k, q.shape[1]), _expand_heads(v, q.shape[1])
    dq, dk, dv, _ = _cuda_backward(
        grad_out, q, k, v, _cuda_bias(mask, q, k), _rows_dense(out), padded, unused, unused, 0.0,
        [True, True, True, False], causal, scale=scale,
    )
    return dq, _sum_heads(dk, key_heads), _sum_heads(dv, key_heads)


def merge(out_a, lse_a, out_b, lse_b):
    """Two attention results over disjoint key sets -> the result over their union, exactly:
    out = out_a + sigmoid(lse_b - lse_a) * (out_b - out_a), lse = logaddexp(lse_a, lse_b).
    Outputs must be finite; a row that sees no key of a part carries lse -inf there, and that part
    then contributes nothing."""
    weight = torch.sigmoid(lse_b - lse_a).unsqueeze(-1).to(out_a.dtype)
    return out_a.lerp(out_b, weight), torch.logaddexp(lse_a, lse_b)
