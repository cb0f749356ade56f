"""The memory-lean layer parts (models.layers) compute what megatron's local parts compute, forward
and backward, and keep less for backward."""

import pytest
import torch
import torch.nn.functional as F

from ebft_megatron.models import layers


class _Config:
    params_dtype = torch.float32
    sequence_parallel = False


def _saved_values(run) -> int:
    """Elements of the distinct storages autograd keeps while ``run()`` builds its graph."""
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes() // tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = run()
    return out, sum(storages.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_equals_torch_rms_norm_forward_and_backward(dtype):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(5, 3, 32, generator=gen) * 3).to(dtype)
    weight = (1 + 0.1 * torch.randn(32, generator=gen)).to(dtype)
    upstream = torch.randn(5, 3, 32, generator=gen).to(dtype)
    norm = layers.RMSNorm(_Config(), 32, eps=1e-6)
    norm.weight.data.copy_(weight)
    x1 = x.clone().requires_grad_(True)
    out, kept = _saved_values(lambda: norm(x1))
    (out.float() * upstream.float()).sum().backward()

    x2, w2 = x.float().requires_grad_(True), weight.float().requires_grad_(True)
    # Hugging Face's RMSNorm: fp32 statistics, cast back, then the weight
    reference = w2 * (x2 * torch.rsqrt(x2.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype).float()
    (reference * upstream.float()).sum().backward()
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(out.float(), reference, **tol)
    torch.testing.assert_close(x1.grad.float(), x2.grad, **tol)
    torch.testing.assert_close(norm.weight.grad.float(), w2.grad, **tol)
    if dtype == torch.float32:
        torch.testing.assert_close(out, F.rms_norm(x, (32,), weight, 1e-6), atol=1e-6, rtol=1e-6)
    # keeps the input, the weight and one value per token: not the normalised input
    assert kept == x.numel() + 32 + 5 * 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_equals_megatron_gated_unit_forward_and_backward(dtype):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 2, 2 * 24, generator=gen).to(dtype)
    upstream = torch.randn(4, 2, 24, generator=gen).to(dtype)
    x1 = x.clone().requires_grad_(True)
    out, kept = _saved_values(lambda: layers.SwiGLU()(x1))
    (out * upstream).sum().backward()

    x2 = x.clone().requires_grad_(True)
    gate, linear = torch.chunk(x2, 2, dim=-1)
    reference = F.silu(gate) * linear  # megatron's unfused gated unit with activation_func=silu
    (reference * upstream).sum().backward()
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out, reference, **tol)
    torch.testing.assert_close(x1.grad, x2.grad, **tol)
    assert kept == x.numel()  # the fc1 output only
