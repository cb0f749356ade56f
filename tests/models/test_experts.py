"""The router's load-balancing loss: the figure a step logs and the gradient it adds, against the
Switch Transformer loss written out from its definition (E / k * sum_e P_e f_e per layer, P_e the
mean softmax weight of expert e over the tokens, f_e the fraction of tokens that chose it)."""

import pytest
import torch

from ebft_megatron.block_layout import BlockLayout
from ebft_megatron.checkpoint import store
from ebft_megatron.models.gpt import build_model
from ebft_megatron.objective.objectives import SFT, Batch
from ebft_megatron.runtime import distributed
from ebft_megatron.training.optimizer import wrap_ddp
from ebft_megatron.training.step import forward_backward


def switch_loss(router_input, weight, top_k: int):
    tokens = router_input.reshape(-1, router_input.shape[-1]).float()
    scores = torch.softmax(tokens @ weight.float().t(), dim=-1)  # [T, E]
    chosen = torch.zeros_like(scores).scatter(1, scores.topk(top_k, dim=-1).indices, 1.0)
    experts = scores.shape[1]
    return experts / top_k * (scores.mean(0) * chosen.mean(0)).sum()


def sft_step(ckpt, weight: float, seen: dict):
    distributed.initialize(1, 1)
    arch = store.architecture_of(ckpt)
    model = build_model(arch, moe_aux_loss_coeff=weight)
    store.load_model_weights(model, ckpt)
    for layer in model.decoder.layers:
        layer.mlp.router.register_forward_hook(
            lambda module, args, output, number=layer.layer_number: seen.__setitem__(number, args[0].detach()))
    ddp = wrap_ddp(model, use_distributed_optimizer=False)
    chunk = torch.randint(0, arch.vocab_size, (2, 24), generator=torch.Generator().manual_seed(4))
    experiences = [SFT(BlockLayout(24, 4, 4, 4, 3)).experience(Batch(chunk, torch.tensor([24, 24])), ddp)]
    ddp.zero_grad_buffer()
    figures = forward_backward(ddp, experiences, SFT(BlockLayout(24, 4, 4, 4, 3)))
    grads = {layer.layer_number: layer.mlp.router.weight.main_grad.clone() for layer in model.decoder.layers}
    return arch, model, figures, grads


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_load_balancing_loss_is_logged_and_added_to_the_gradient(tiny_models, family):
    ckpt = tiny_models[family][1]
    weight = 0.3
    seen: dict = {}
    arch, model, figures, grads = sft_step(ckpt, weight, seen)
    _, _, plain, plain_grads = sft_step(ckpt, 0.0, {})
    assert "loss/load_balancing" not in plain  # off: nothing added, nothing logged
    assert figures["loss"] == pytest.approx(plain["loss"], abs=1e-6)  # the forward is the same
    routers = {layer.layer_number: layer.mlp.router.weight.detach() for layer in model.decoder.layers}
    losses = {n: switch_loss(seen[n], routers[n], arch.experts_per_token) for n in routers}
    # logged: unweighted, averaged over the layers
    assert figures["loss/load_balancing"] == pytest.approx(float(sum(losses.values()) / len(losses)), rel=1e-5)
    assert 1.0 <= figures["loss/load_balancing"] < arch.num_experts / arch.experts_per_token
    # the last layer's router: what the weight adds to its gradient is weight * d(its own loss)/dW
    # (earlier routers' losses reach it through the hidden states as well)
    last = max(routers)
    own = routers[last].clone().requires_grad_(True)
    expected = weight * torch.autograd.grad(switch_loss(seen[last], own, arch.experts_per_token), own)[0]
    added = grads[last] - plain_grads[last]
    assert float(expected.abs().max()) > 1e-4
    assert torch.allclose(added, expected, rtol=1e-4, atol=1e-7)
