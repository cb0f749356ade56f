"""RMSNorm's kernels: one op for the forward and one for the backward, on every device.

The arithmetic is Hugging Face's RMSNorm (statistics in fp32: ``x * rsqrt(mean(x^2) + eps)``, then
the weight) with what :class:`layers.RMSNorm` keeps for backward (the input and the per-token
inverse RMS). Written as torch ops it is 8 kernels forward and 13 backward: with two norms a layer,
recomputed in backward under selective recompute, that was 60 of the 137 kernels a layer launches
per micro-batch on a GPU without Transformer Engine (``runtime.launch_count``).

- On CUDA: torch's fused RMSNorm (``aten._fused_rms_norm`` and its backward), one op each way.
  It rounds the output to the input's dtype once, after the weight (Hugging Face rounds before the
  weight as well): in bf16 the two differ in the last bit of some values; in fp32 they agree.
- Elsewhere (CPU, and the device guard's emulated GPU, whose data is on the host): the same
  arithmetic in Hugging Face's order, registered as one op each way (``ebft::rms_norm``,
  ``ebft::rms_norm_backward``), so that a counted run sees one op where CUDA runs one.
"""

from __future__ import annotations

import torch

from ebft_megatron.runtime import device


@torch.library.custom_op("ebft::rms_norm", mutates_args=())
def _host_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    x32 = x.float()
    inverse_rms = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True).add_(eps))
    return (x32 * inverse_rms).to(x.dtype) * weight, inverse_rms


@torch.library.custom_op("ebft::rms_norm_backward", mutates_args=())
def _host_rms_norm_backward(grad: torch.Tensor, x: torch.Tensor, inverse_rms: torch.Tensor,
                            weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    normed = x.float() * inverse_rms  # recomputed, not kept
    grad32 = grad.float()
    d_weight = (grad32 * normed.to(x.dtype).float()).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
    d_normed = grad32 * weight.float()
    projection = (d_normed * normed).mean(-1, keepdim=True)
    d_x = d_normed.sub_(normed.mul_(projection)).mul_(inverse_rms)
    return d_x.to(x.dtype), d_weight


@_host_rms_norm.register_fake
def _(x, weight, eps):
    return torch.empty_like(x), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


@_host_rms_norm_backward.register_fake
def _(grad, x, inverse_rms, weight):
    return torch.empty_like(x), torch.empty_like(weight)


def _fused(x: torch.Tensor) -> bool:
    """Whether torch's fused CUDA kernels take ``x`` (a real CUDA tensor; the device guard's
    emulated ones hold host data)."""
    return device.real_cuda(x.device)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalised ``x`` times ``weight``, the per-token inverse RMS [..., 1] in fp32) over the last
    dimension of a contiguous ``x``."""
    if _fused(x):
        return torch.ops.aten._fused_rms_norm(x, [x.shape[-1]], weight, eps)
    return torch.ops.ebft.rms_norm(x, weight, eps)


def rms_norm_backward(grad: torch.Tensor, x: torch.Tensor, inverse_rms: torch.Tensor,
                      weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(gradient of ``x``, gradient of ``weight``) of :func:`rms_norm`'s output gradient ``grad``."""
    if _fused(x):
        return torch.ops.aten._fused_rms_norm_backward(grad.contiguous(), x, [x.shape[-1]], inverse_rms, weight,
                                                       [True, True])
    return torch.ops.ebft.rms_norm_backward(grad, x, inverse_rms, weight)
