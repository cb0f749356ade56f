"""Generate a continuation from an ebft_megatron checkpoint.

  python -m ebft_megatron.generate --load CKPT --prompt "def add(a, b):" --max-new-tokens 32 --temperature 0
  torchrun --nproc_per_node=4 -m ebft_megatron.generate --load CKPT --tp 2 --pp 2 --prompt ...

Prints the continuation (only the new text) on stdout. Works at any TP/PP: the checkpoint is
resharded on load. Generation is the rollout sampler's (KV-cached: one prefill, then one decode
step per token), with the prompt as a one-block layout (``evaluation.completions``).
"""

from __future__ import annotations

import argparse
import sys

from ebft_megatron.cli import run_cli
from ebft_megatron.config import RolloutSettings, TrainSettings, load_config
from ebft_megatron.errors import UsageError
from ebft_megatron.settings import default_of


def parse_args(argv=None):
    # sampling as the trainer samples rollouts, from the same seed: the settings' own defaults
    temperature, top_p = default_of(RolloutSettings, "temperature"), default_of(RolloutSettings, "top_p")
    seed = default_of(TrainSettings, "seed")
    parser = argparse.ArgumentParser(
        prog="python -m ebft_megatron.generate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--load", required=True, help="ebft_megatron checkpoint folder")
    parser.add_argument("--prompt", required=True, help="prompt text (encoded without special tokens)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default 32)")
    parser.add_argument("--temperature", type=float, default=temperature,
                        help=f"sampling temperature; 0 = greedy (default {temperature:g}, rollout.temperature's)")
    parser.add_argument("--top-p", type=float, default=top_p,
                        help=f"nucleus sampling mass (default {top_p:g}, rollout.top_p's; 1 = off)")
    parser.add_argument("--seed", type=int, default=seed, help=f"sampling seed (default {seed}, train.seed's)")
    parser.add_argument("--tp", type=int, default=1, help="tensor parallel size (default 1)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline parallel size (default 1)")
    parser.add_argument("--no-stop-at-eos", action="store_true", help="keep going after the EOS token")
    parser.add_argument("--print-ids", action="store_true", help="also print the generated token ids on stderr")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be >= 1")
    if args.temperature < 0:
        parser.error("--temperature must be >= 0")
    if not 0 < args.top_p <= 1:
        parser.error("--top-p must be in (0, 1]")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)

    def job():
        # torch and megatron load here, once the arguments are read (--help and a bad flag answer at once)
        # and after run_cli has quieted megatron's import-time notices
        import torch

        from ebft_megatron.checkpoint import store
        from ebft_megatron.evaluation.completions import complete_ids
        from ebft_megatron.rollouts.sampling import SamplingSettings
        from ebft_megatron.runtime import distributed
        from ebft_megatron.training import builder

        dtype = store.stored_dtype(store.read_meta(args.load))
        config = load_config(None, [f"model.load={args.load}", f"model.dtype={dtype}", f"parallel.tp={args.tp}",
                                    f"parallel.pp={args.pp}", f"train.seed={args.seed}"])
        arch = builder.architecture(config)
        tokenizer = builder.tokenizer(config, arch)
        prompt_ids = tokenizer.encode(args.prompt)
        if not prompt_ids:
            raise UsageError("--prompt encodes to no tokens")
        if len(prompt_ids) + args.max_new_tokens > arch.max_position_embeddings:
            raise UsageError(f"prompt + new tokens exceed the model's {arch.max_position_embeddings} positions")
        builder.initialize(config)
        model = builder.policy(config, arch)
        eos = None if args.no_stop_at_eos else tokenizer.eos_id
        ids = complete_ids(model, prompt_ids, 1, args.max_new_tokens, arch.vocab_size,
                           SamplingSettings(args.temperature, args.top_p), torch.Generator().manual_seed(args.seed),
                           pad_id=tokenizer.eos_id or 0)[0]
        if eos is not None and eos in ids:
            ids = ids[: ids.index(eos) + 1]
        if distributed.is_rank0():
            if args.print_ids:
                print("ids:", ids, file=sys.stderr)
            print(tokenizer.decode(ids), flush=True)
        distributed.destroy()

    return run_cli(job)


if __name__ == "__main__":
    sys.exit(main())
