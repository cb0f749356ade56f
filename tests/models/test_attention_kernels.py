"""The CUDA side of the fused attention kernels (attention_kernels), run on CPU against stand-ins of
torch's memory-efficient attention operators that follow their contract: equal query and key
heads, a bias expanded to [B, H, Lq, Lk] with an aligned row stride, a log-sum-exp padded to a
multiple of 32 rows, and a backward that recomputes the probabilities from the given output and
log-sum-exp. The packed block attention through that side must equal the CPU kernels' result."""

import pytest
import torch

from ebft_megatron.models import attention_kernels as kernels

from tests.models.test_attention import LAYOUTS, _assert_all_close, _forward_backward, _packed, core  # noqa: F401

IDS = ["s=G", "s<G", "s>G", "G=1", "n=1", "NB=17", "NB=24"]


def _scores(q, k, scale, bias, causal):
    assert q.shape[1] == k.shape[1], "the memory-efficient kernel needs as many key heads as query heads"
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if bias is not None:
        assert bias.shape == scores.shape and bias.stride(-2) % 16 == 0, "bias: expanded, rows aligned to 16"
        scores = scores + bias
    if causal:
        L, K = scores.shape[-2:]
        scores = scores.masked_fill(~torch.ones(L, K, dtype=torch.bool).tril(), float("-inf"))
    return scores


def fake_forward(q, k, v, bias, compute_lse, dropout_p, causal, *, scale):
    assert compute_lse and dropout_p == 0.0
    scores = _scores(q, k, scale, bias, causal)
    lse = torch.logsumexp(scores, dim=-1)
    rows = q.shape[2]
    padded = torch.full((*lse.shape[:-1], -(-rows // 32) * 32), float("nan"))
    padded[..., :rows] = lse
    return torch.softmax(scores, -1).matmul(v), padded, torch.empty(()), torch.empty(())


def fake_backward(grad_out, q, k, v, bias, out, lse, seed, offset, dropout_p, grad_input_mask, causal, *, scale):
    rows = q.shape[2]
    assert lse.shape[-1] % 32 == 0 and lse.shape[-1] >= rows and lse.is_contiguous()
    assert grad_input_mask == [True, True, True, False]
    probs = torch.exp(_scores(q, k, scale, bias, causal) - lse[..., :rows, None])
    d_probs = grad_out.matmul(v.transpose(-1, -2))
    delta = (grad_out * out).sum(-1, keepdim=True)
    d_scores = probs * (d_probs - delta)
    return d_scores.matmul(k) * scale, d_scores.transpose(-1, -2).matmul(q) * scale, probs.transpose(-1, -2).matmul(
        grad_out), None


@pytest.fixture
def cuda_side(monkeypatch):
    monkeypatch.setattr(kernels, "_uses_cpu_kernels", lambda tensor: False)
    monkeypatch.setattr(kernels, "_cuda_forward", fake_forward)
    monkeypatch.setattr(kernels, "_cuda_backward", fake_backward)


@pytest.mark.parametrize("settings", LAYOUTS, ids=IDS)
def test_packed_attention_through_the_cuda_side_equals_the_cpu_kernels(core, settings, monkeypatch):
    from ebft_megatron.block_layout import BlockLayout

    layout = BlockLayout(*settings)
    on_cpu = _forward_backward(core, layout, _packed)
    with monkeypatch.context() as patch:
        patch.setattr(kernels, "_uses_cpu_kernels", lambda tensor: False)
        patch.setattr(kernels, "_cuda_forward", fake_forward)
        patch.setattr(kernels, "_cuda_backward", fake_backward)
        through_cuda_side = _forward_backward(core, layout, _packed)
    _assert_all_close(through_cuda_side, on_cpu)


def test_masks_for_the_cuda_side_have_aligned_rows(cuda_side):
    allowed = torch.ones(5, 23, dtype=torch.bool).tril()
    mask = kernels.prepare_mask(allowed, torch.float32)
    assert tuple(mask.shape) == (5, 23) and mask.stride(0) == 32
    assert torch.equal(mask == 0, allowed)
