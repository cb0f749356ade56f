"""Tiny random Hugging Face models and a tokenizer, built in the test itself (no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

# Qwen3 twice: untied and tied output layer. Its head_dim (32) is not hidden/heads (16), and its q/k
# norm weights are random (around 1), so that a norm skipped, swapped or sharded wrongly
# changes the logits. Heads, KV heads and layers are even: every family shards at TP2 and PP2.
# The two mixtures of experts have 4 experts (EP2 splits them), 2 chosen per token: Qwen3-MoE's
# weights as they are (norm_topk_prob false, its default), Mixtral's renormalised.
FAMILIES = ("llama", "qwen2", "mistral", "qwen3", "qwen3_tied", "qwen3_moe", "mixtral")
MOE_FAMILIES = ("qwen3_moe", "mixtral")
TOKENIZER_CORPUS = (
    "def add(a, b):\n    return a + b\n\nclass Stack:\n    def push(self, item):\n"
    "        self.items.append(item)\n    def pop(self):\n        return self.items.pop()\n"
) * 4


def make_tokenizer(out_dir: str | Path, vocab_size: int = 300) -> Path:
    """A byte-level BPE tokenizer trained on a few lines of code, saved as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([TOKENIZER_CORPUS], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.save_pretrained(str(out_dir))
    return out_dir


def make_tiny_hf(family: str, out_dir: str | Path, seed: int = 0, vocab_size: int = 300,
                 num_layers: int = 4, tie: bool | None = None, with_tokenizer: bool = True) -> Path:
    """A tiny random HF model of ``family`` (one of FAMILIES) with weights drawn N(0, 0.2) (so logits
    are not flat); Qwen3's q/k norm weights are drawn around 1 instead, so that they shape the
    attention scores rather than shrink them towards uniform attention."""
    import torch
    import transformers as tf

    qwen3 = (tf.Qwen3Config, tf.Qwen3ForCausalLM, dict(rope_theta=1e6, head_dim=32, rms_norm_eps=1e-6))
    cls = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(rope_theta=5e5)),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, dict(rope_theta=1e6)),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM, dict(rope_theta=1e4, sliding_window=None)),
        "qwen3": qwen3,
        "qwen3_tied": qwen3,
        "qwen3_moe": (tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM,
                      dict(rope_theta=1e6, head_dim=32, rms_norm_eps=1e-6, num_experts=4, num_experts_per_tok=2,
                           moe_intermediate_size=64, norm_topk_prob=False)),
        "mixtral": (tf.MixtralConfig, tf.MixtralForCausalLM,
                    dict(rope_theta=1e6, num_local_experts=4, num_experts_per_tok=2, sliding_window=None)),
    }
    config_cls, model_cls, extra = cls[family]
    if tie is None:
        tie = family in ("llama", "qwen3_tied")
    config = config_cls(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=tie, bos_token_id=0, eos_token_id=0, pad_token_id=0, **extra,
    )
    torch.manual_seed(seed)
    model = model_cls(config).float()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                param.normal_(1.0, 0.5)
            else:
                param.normal_(0.0, 0.2)
    out_dir = Path(out_dir)
    model.save_pretrained(str(out_dir))
    if with_tokenizer:
        make_tokenizer(out_dir, vocab_size)
    return out_dir


def hf_logits(hf_dir: str | Path, tokens, position_ids=None, attention_mask=None):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        return model(input_ids=tokens, position_ids=position_ids, attention_mask=attention_mask).logits


def write_json(path: str | Path, data) -> None:
    Path(path).write_text(json.dumps(data, indent=2))


def load_megatron_model(ckpt):
    """(model, architecture) of a converted checkpoint, single process (TP1, PP1)."""
    from ebft_megatron.checkpoint import store
    from ebft_megatron.models.gpt import build_model
    from ebft_megatron.runtime import distributed

    distributed.initialize(1, 1)
    arch = store.architecture_of(ckpt)
    model = build_model(arch)
    store.load_model_weights(model, ckpt)
    return model, arch
