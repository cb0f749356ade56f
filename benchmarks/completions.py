#!/usr/bin/env python
"""Prompt completions one prompt at a time against many prompts per decode step (in context).

  python benchmarks/completions.py                 # SmolLM2-135M, 8 unit-test prompts, 4 samples, 32 tokens
  python benchmarks/completions.py --prompts 16 --max-new-tokens 64

Both ways use the same KV-cached block sampler (ebft_megatron.evaluation.completions) on the same
prompts in the same run: ``complete_text`` decodes the n samples of one prompt per step;
``complete_in_context`` places every prompt at one shared anchor (earlier tasks before it) and decodes
all prompts' samples together. Prints seconds per prompt for each way and their ratio.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", default=str(Path.home() / ".cache/ebft_megatron/smollm2/mcore"))
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--anchor", type=int, default=384, help="prompt tokens at most (in context)")
    args = parser.parse_args()

    from ebft_megatron.cli import quiet_imports

    quiet_imports()
    import torch

    from ebft_megatron.config import load_config
    from ebft_megatron.data.sources import python_stdlib_dir
    from tools.preparation.stdlib_functions import extract
    from ebft_megatron.evaluation.completions import complete_in_context, complete_text
    from ebft_megatron.evaluation.unit_tests import candidate_tasks
    from ebft_megatron.rollouts.sampler import SamplingSettings
    from ebft_megatron.training import builder

    config = load_config(None, [f"model.load={args.load}", "train.seed=0"])
    builder.initialize(config)
    arch = builder.architecture(config)
    model = builder.policy(config, arch)
    model.eval()
    tokenizer = builder.tokenizer(config, arch)
    pairs, _ = extract(python_stdlib_dir())
    tasks = [t for t in candidate_tasks(pairs) if len(tokenizer.encode(t.prompt)) <= args.anchor][: args.prompts]
    sampling = SamplingSettings(0.6, 1.0)

    started = time.perf_counter()
    for task in tasks:
        complete_text(model, tokenizer, task.prompt, args.samples, args.max_new_tokens, arch.vocab_size, sampling,
                      torch.Generator().manual_seed(0))
    one_by_one = (time.perf_counter() - started) / len(tasks)

    started = time.perf_counter()
    complete_in_context(model, tokenizer, [(t.prompt, t.response) for t in tasks], list(range(len(tasks))),
                        args.anchor, args.samples, args.max_new_tokens, arch.vocab_size, sampling,
                        torch.Generator().manual_seed(0), batch_size=len(tasks))
    batched = (time.perf_counter() - started) / len(tasks)

    print(f"{len(tasks)} prompts x {args.samples} samples x {args.max_new_tokens} tokens, {torch.get_num_threads()} threads")
    print(f"one prompt per step:        {one_by_one:.2f} s per prompt")
    print(f"all prompts per step:       {batched:.2f} s per prompt (anchor {args.anchor})")
    print(f"ratio: {one_by_one / batched:.2f}x")


if __name__ == "__main__":
    main()
