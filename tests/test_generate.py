"""python -m ebft_megatron.generate, as a user runs it: greedy output equals plain greedy decoding
(a full forward of the growing sequence per token), and bad input is one error line."""

import os
import re
import subprocess
import sys
from pathlib import Path

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


def test_bad_input_is_one_error_line(tiny_models, tmp_path):
    result = _run("--load", tmp_path / "missing", "--prompt", "x")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: checkpoint {tmp_path / 'missing'} does not exist"]
