"""python -m ebft_megatron.generate, as a user runs it: greedy output equals plain greedy decoding
(a full forward of the growing sequence per token) and, for Qwen3, transformers' greedy generate;
bad input is one error line."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _run(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "ebft_megatron.generate", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=300, cwd=ROOT)


def test_greedy_generation_equals_full_forward_greedy_decoding(tiny_models):
    from ebft_megatron.data.tokenizers import Tokenizer
    from ebft_megatron.models.gpt import model_forward
    from tests.fixtures import load_megatron_model

    ckpt = tiny_models["llama"][1]
    model, arch = load_megatron_model(ckpt)
    prompt = "def add(a, b):\n"
    ids = Tokenizer(ckpt / "tokenizer").encode(prompt)
    expected = []
    with torch.no_grad():
        for _ in range(8):
            sequence = torch.tensor([ids + expected])
            logits = model_forward(model, sequence, torch.arange(sequence.shape[1])[None])
            expected.append(int(logits[0, -1, : arch.vocab_size].argmax()))
    result = _run("--load", ckpt, "--prompt", prompt, "--max-new-tokens", 8, "--temperature", 0, "--print-ids",
                  "--no-stop-at-eos")
    assert result.returncode == 0, result.stderr
    got = [int(token) for token in re.search(r"ids: \[([^\]]*)\]", result.stderr).group(1).split(",")]
    assert got == expected


# prompts on which these tiny random models do not fall into repeating one token at once
QWEN3_PROMPTS = {"qwen3": "self.items.append(item)", "qwen3_tied": "    def pop(self):\n        return"}


@pytest.mark.parametrize("family", sorted(QWEN3_PROMPTS))
def test_qwen3_greedy_generation_equals_transformers_greedy(tiny_models, family):
    """The KV-cached prefill and decode steps apply Qwen3's q/k norms as a full forward does: the
    tokens equal transformers' own greedy generate (its cache, its attention) on the same weights,
    with an untied and a tied output layer."""
    from transformers import AutoModelForCausalLM

    from ebft_megatron.data.tokenizers import Tokenizer

    hf_dir, ckpt = tiny_models[family]
    prompt, new_tokens = QWEN3_PROMPTS[family], 12
    ids = Tokenizer(ckpt / "tokenizer").encode(prompt)
    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, attn_implementation="eager").eval()
    hf.generation_config.eos_token_id = None  # as --no-stop-at-eos
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                          attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    expected = out[0, len(ids):].tolist()
    assert len(expected) == new_tokens and len(set(expected)) > 1  # not a degenerate repetition
    result = _run("--load", ckpt, "--prompt", prompt, "--max-new-tokens", new_tokens, "--temperature", 0,
                  "--print-ids", "--no-stop-at-eos")
    assert result.returncode == 0, result.stderr
    got = [int(token) for token in re.search(r"ids: \[([^\]]*)\]", result.stderr).group(1).split(",")]
    assert got == expected


def test_bad_input_is_one_error_line(tiny_models, tmp_path):
    result = _run("--load", tmp_path / "missing", "--prompt", "x")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: checkpoint {tmp_path / 'missing'} does not exist"]


def test_defaults_are_the_settings_and_read_without_torch():
    """generate samples as the trainer samples rollouts (the settings' defaults), and reading its
    arguments loads no torch (--help answers at once)."""
    from ebft_megatron.config import RolloutSettings, TrainSettings

    probe = ("import sys; from ebft_megatron import generate; "
             "a = generate.parse_args(['--load', 'x', '--prompt', 'p']); "
             "print(a.temperature, a.top_p, a.seed, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=60)
    rollout, train = RolloutSettings(), TrainSettings()
    assert out.stdout.split() == [str(rollout.temperature), str(rollout.top_p), str(train.seed), "False"], out.stderr
