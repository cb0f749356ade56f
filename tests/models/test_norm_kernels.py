"""RMSNorm's kernels: Hugging Face's arithmetic, one op each way, and the CUDA branch's calls
checked for shapes and dtypes on meta tensors (torch registers meta kernels for its fused ops)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ebft_megatron.models import layers, norm_kernels


def _hugging_face_rms_norm(x, weight, eps):
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def _inputs(dtype):
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 5, 16, generator=generator) * 4).to(dtype)
    weight = (1 + torch.randn(16, generator=generator) / 4).to(dtype)
    grad = torch.randn(3, 5, 16, generator=generator).to(dtype)
    return x, weight, grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_norm_is_hugging_faces_forward_and_backward(dtype):
    x, weight, grad = _inputs(dtype)
    ours_x, ours_w = x.clone().requires_grad_(), weight.clone().requires_grad_()
    out = layers._RMSNormFunction.apply(ours_x, ours_w, 1e-6)
    out.backward(grad)
    ref_x, ref_w = x.double().requires_grad_(), weight.double().requires_grad_()
    reference = _hugging_face_rms_norm(ref_x, ref_w, 1e-6)
    reference.backward(grad.double())
    assert torch.equal(out, _hugging_face_rms_norm(x, weight, 1e-6))  # the same ops in the same order
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    scale = ref_x.grad.abs().max()
    assert (ours_x.grad.double() - ref_x.grad).abs().max() <= tolerance * scale
    assert (ours_w.grad.double() - ref_w.grad).abs().max() <= tolerance * ref_w.grad.abs().max()


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def test_one_op_each_way():
    x, weight, grad = _inputs(torch.bfloat16)
    x.requires_grad_()
    with _Ops() as forward:
        out = layers._RMSNormFunction.apply(x, weight, 1e-6)
    with _Ops() as backward:
        out.backward(grad)
    assert forward.names == ["ebft.rms_norm"]
    assert [n for n in backward.names if n.startswith("ebft")] == ["ebft.rms_norm_backward"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_cuda_branch_calls_torchs_fused_ops_with_what_they_take(monkeypatch, dtype):
    """What CUDA runs, on meta tensors: the same shapes and dtypes as the host op's."""
    x, weight, grad = _inputs(dtype)
    host_out, host_rms = norm_kernels.rms_norm(x, weight, 1e-6)
    host_dx, host_dw = norm_kernels.rms_norm_backward(grad, x, host_rms, weight)
    monkeypatch.setattr(norm_kernels, "_fused", lambda tensor: True)
    meta = [t.to("meta") for t in (x, weight, grad)]
    out, inverse_rms = norm_kernels.rms_norm(meta[0], meta[1], 1e-6)
    d_x, d_weight = norm_kernels.rms_norm_backward(meta[2], meta[0], inverse_rms, meta[1])
    for fused, host in ((out, host_out), (inverse_rms, host_rms), (d_x, host_dx), (d_weight, host_dw)):
        assert (fused.shape, fused.dtype) == (host.shape, host.dtype)
