"""The foreach stand-ins for megatron's multi-tensor fallbacks give megatron's numbers, and are
the ones megatron calls once the runtime is up."""

import pytest
import torch

from ebft_megatron.runtime import distributed, multi_tensor


@pytest.fixture(autouse=True, scope="module")
def runtime():
    distributed.initialize(1, 1)  # megatron's own fallbacks allocate on "cuda": the CPU fallbacks


def _tensors(seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen).to(dtype) for shape in [(7,), (3, 5), (64, 33), (1,), (2, 2, 9)]]


def test_the_norm_is_megatrons():
    from megatron.core.utils import local_multi_tensor_l2_norm

    grads = _tensors(0)
    ours, _ = multi_tensor.l2_norm(2048 * 32, None, [grads], False)
    theirs, _ = local_multi_tensor_l2_norm(2048 * 32, None, [grads], False)
    assert ours.shape == (1,) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs.to(ours.device), rtol=1e-6, atol=0)
    by_hand = torch.cat([g.flatten() for g in grads]).double().norm()
    torch.testing.assert_close(ours.double(), by_hand.reshape(1), rtol=1e-6, atol=0)


def test_scaling_and_copies_are_megatrons():
    from megatron.core.utils import local_multi_tensor_scale

    for factor in (1.0, 0.37):
        sources = _tensors(1)
        ours, theirs = _tensors(2, torch.bfloat16), _tensors(2, torch.bfloat16)
        multi_tensor.scale(None, None, [sources, ours], factor)
        local_multi_tensor_scale(None, None, [sources, theirs], factor)
        for a, b in zip(ours, theirs):
            assert torch.equal(a, b)
        in_place, expected = _tensors(3), [t * factor for t in _tensors(3)]
        multi_tensor.scale(None, None, [in_place, in_place], factor)
        for a, b in zip(in_place, expected):
            assert torch.equal(a, b)


def test_megatron_calls_them_after_initialisation():
    from megatron.core.optimizer import clip_grads, optimizer

    assert clip_grads.l2_norm_impl is multi_tensor.l2_norm
    assert clip_grads.multi_tensor_scale_impl is multi_tensor.scale
    assert optimizer.multi_tensor_scale_impl is multi_tensor.scale


def test_the_distributed_optimizers_copy_back_is_megatrons():
    """After a bf16 optimizer step the model holds the same values whether the updated fp32 shards
    were copied back by one foreach copy or by megatron's loop."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    from ebft_megatron.config import OptimizerSettings
    from ebft_megatron.models import architecture, gpt
    from ebft_megatron.training.optimizer import build_optimizer, wrap_ddp

    arch = architecture.from_hf_config(dict(
        architectures=["Qwen2ForCausalLM"], hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, num_hidden_layers=2, vocab_size=128))
    assert DistributedOptimizer._copy_main_params_to_model_params is multi_tensor.copy_main_params_to_model_params

    def stepped(copy):
        torch.manual_seed(0)
        model = gpt.build_model(arch, params_dtype=torch.bfloat16)
        ddp = wrap_ddp(model)
        optimizer = build_optimizer(ddp, OptimizerSettings(lr=1e-2), params_dtype=torch.bfloat16)
        for buffer in ddp.buffers:
            buffer.grad_data.copy_(torch.randn(buffer.grad_data.shape, generator=torch.Generator().manual_seed(1)))
        before = [p.detach().clone() for p in model.parameters()]
        DistributedOptimizer._copy_main_params_to_model_params = copy
        try:
            optimizer.step()
        finally:
            DistributedOptimizer._copy_main_params_to_model_params = multi_tensor.copy_main_params_to_model_params
        after = [p.detach().clone() for p in model.parameters()]
        assert any(not torch.equal(a, b) for a, b in zip(before, after))  # the step moved the model
        return after

    ours, theirs = stepped(multi_tensor.copy_main_params_to_model_params), stepped(multi_tensor._megatron_copy_main_params)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
