"""The packed policy loss (chunk once + all n samples' rollouts, real-pair attention) against the
reference's unpacked computation (n copies of chunk + one sample's rollouts, dense block mask),
loss and gradients; and its CE term against Hugging Face's causal-LM loss. Both with full logits
and with the output layer applied in row chunks."""

import pytest
import torch

from ebft_megatron.models.attention import BlockAttentionParams, packed_attention
from ebft_megatron.models.gpt import model_forward
from ebft_megatron.models.output import HiddenStates, Logits, model_output
from ebft_megatron.objective.loss import LossSettings, ebft_loss, sft_loss
from ebft_megatron.block_layout import BlockLayout

# full logits, and the output layer in chunks of 7 rows (several chunks and a partial last one)
OUTPUTS = {"logits": 0, "chunked": 7}


@pytest.fixture(scope="module")
def policy(tiny_models):
    from tests.fixtures import load_megatron_model

    return load_megatron_model(tiny_models["qwen2"][1])


def forward_output(model, tokens, positions, params, logit_chunk_rows):
    """The model's output of one forward, as the losses take it."""
    model.logit_chunk_rows = logit_chunk_rows
    params.return_hidden = True
    output = model_output(model_forward(model, tokens, positions, block_params=params), model)
    assert isinstance(output, HiddenStates if logit_chunk_rows else Logits)
    return output


def grads_of(model):
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def unpacked_reference_loss(model, layout, chunk, lengths, rollouts, advantages, settings):
    """The reference's way (reference §1.4, §4), written independently of objective.loss: for each of
    the n copies, the chunk plus that sample's blocks (block-major, G tokens each), a dense block
    mask, plain log_softmax; per-copy mean of -adv * log pi_T over (block, step) and per-copy CE at
    T = 1, then the mean over copies and chunks."""
    B, P = chunk.shape
    NB, n, G, T = layout.num_blocks, layout.num_samples, layout.rollout_len, settings.temperature
    single = BlockLayout(P, layout.first_anchor, layout.stride, G, 1)
    masked_out = ~single.dense_attention_mask()
    anchors = layout.anchor_positions.tolist()
    total = 0.0
    for i in range(n):
        seq = torch.cat([chunk, rollouts[:, :, i].reshape(B, NB * G)], dim=1)
        params = BlockAttentionParams(layout=single, mode="dense")
        logits = model_forward(model, seq, single.position_ids.expand(B, -1), masked_out[None, None], params)
        logits = logits[..., : 300].float()
        logp_T = torch.log_softmax(logits / T, dim=-1)
        logp_1 = torch.log_softmax(logits, dim=-1)
        rl = torch.zeros(B)
        for b, anchor in enumerate(anchors):
            for t in range(G):
                row = anchor - 1 if t == 0 else P + b * G + t - 1
                token = rollouts[:, b, i, t]
                rl = rl - advantages[:, b, i] * logp_T[torch.arange(B), row, token]
        rl = rl / (NB * G)
        nll = -logp_1[:, : P - 1].gather(-1, chunk[:, 1:, None])[..., 0]
        real = torch.arange(1, P)[None, :] < lengths[:, None]
        ce = (nll * real).sum(-1) / real.sum(-1)
        total = total + (settings.rl_coef * rl + settings.ce_coef * ce).mean()
    return total / n


@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("shape", [(24, 4, 4, 4, 3), (20, 2, 2, 4, 2)])
def test_packed_loss_and_gradients_equal_the_unpacked_computation(policy, shape, output):
    model, arch = policy
    layout = BlockLayout(*shape)
    gen = torch.Generator().manual_seed(sum(shape))
    B = 2
    chunk = torch.randint(0, arch.vocab_size, (B, layout.chunk_len), generator=gen)
    lengths = torch.tensor([layout.chunk_len, layout.chunk_len - 3])
    rollouts = torch.randint(0, arch.vocab_size, (B, layout.num_blocks, layout.num_samples, layout.rollout_len),
                             generator=gen)
    advantages = torch.randn(B, layout.num_blocks, layout.num_samples, generator=gen, dtype=torch.float64)
    settings = LossSettings(rl_coef=1.0, ce_coef=0.3, temperature=0.7)

    model.zero_grad()
    packed = forward_output(model, layout.pack(chunk, rollouts), layout.position_ids.expand(B, -1),
                            packed_attention(layout), OUTPUTS[output])
    packed_loss, terms = ebft_loss(packed, layout, chunk, lengths, rollouts, advantages, settings)
    packed_loss.backward()
    packed_grads = grads_of(model)

    model.zero_grad()
    reference = unpacked_reference_loss(model, layout, chunk, lengths, rollouts, advantages.float(), settings)
    reference.backward()
    reference_grads = grads_of(model)

    assert abs(float(packed_loss) - float(reference)) < 1e-5
    assert packed_grads.keys() == reference_grads.keys() and len(packed_grads) > 10
    for name, grad in packed_grads.items():
        scale = reference_grads[name].abs().max().clamp_min(1e-3)
        assert (grad - reference_grads[name]).abs().max() / scale < 1e-4, name
    assert abs(float(terms["loss"]) - float(packed_loss)) < 1e-7


@pytest.mark.parametrize("output", OUTPUTS)
def test_ce_term_equals_hugging_face_causal_lm_loss(policy, tiny_models, output):
    from transformers import AutoModelForCausalLM

    model, arch = policy
    layout = BlockLayout(24, 4, 4, 4, 2)
    gen = torch.Generator().manual_seed(21)
    chunk = torch.randint(0, arch.vocab_size, (2, 24), generator=gen)
    rollouts = torch.randint(0, arch.vocab_size, (2, layout.num_blocks, 2, 4), generator=gen)
    lengths = torch.tensor([24, 24])
    with torch.no_grad():
        packed = forward_output(model, layout.pack(chunk, rollouts), layout.position_ids.expand(2, -1),
                                packed_attention(layout), OUTPUTS[output])
        _, terms = ebft_loss(packed, layout, chunk, lengths, rollouts, torch.zeros(2, layout.num_blocks, 2),
                             LossSettings(rl_coef=1.0, ce_coef=1.0, temperature=0.6))
        plain = forward_output(model, chunk, torch.arange(24).expand(2, -1), BlockAttentionParams(mode="dense"),
                               OUTPUTS[output])
        sft, _ = sft_loss(plain, chunk, lengths)
        hf = AutoModelForCausalLM.from_pretrained(str(tiny_models["qwen2"][0]), dtype=torch.float32).eval()
        expected = hf(input_ids=chunk, labels=chunk).loss
    assert abs(float(terms["loss/ce"]) - float(expected)) < 1e-5
    assert abs(float(sft) - float(expected)) < 1e-5
