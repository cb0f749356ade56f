"""Generate a continuation from an ebft_megatron checkpoint.

  python -m ebft_megatron.generate --load CKPT --prompt "def add(a, b):" --max-new-tokens 32 --temperature 0
  torchrun --nproc_per_node=4 -m ebft_megatron.generate --load CKPT --tp 2 --pp 2 --prompt ...

Prints the continuation (only the new text) on stdout. Works at any TP/PP: the checkpoint is
resharded on load. Each step is a full forward of the growing sequence through the pipeline
stages (simple and exact; the KV-cached engine lives in ``rollouts``).
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m ebft_megatron.generate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--load", required=True, help="ebft_megatron checkpoint folder")
    parser.add_argument("--prompt", required=True, help="prompt text (encoded without special tokens)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default 32)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0 = off)")
    parser.add_argument("--seed", type=int, default=1234, help="sampling seed (default 1234)")
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


def generate_ids(model, arch, prompt_ids, max_new_tokens, temperature=0.0, top_p=1.0, seed=1234, eos_id=None):
    """Token ids of the continuation (greedy when temperature == 0). Collective over all ranks."""
    import torch

    from ebft_megatron.rollouts.sampling import sample_tokens
    from ebft_megatron.runtime import pipeline

    generator = torch.Generator().manual_seed(seed)
    tokens = torch.tensor([prompt_ids], dtype=torch.long)
    new_ids = []
    for _ in range(max_new_tokens):
        positions = torch.arange(tokens.shape[1])[None]

        def next_token(logits):
            last = pipeline.gather_vocab_parallel(logits[:, -1:])[..., : arch.vocab_size]
            return sample_tokens(last[:, 0], temperature, top_p, generator)

        token = pipeline.forward(model, tokens, positions, reduce=next_token)
        new_ids.append(int(token[0]))
        if eos_id is not None and new_ids[-1] == eos_id:
            break
        tokens = torch.cat([tokens, token.view(1, 1)], dim=1)
    return new_ids


def main(argv=None) -> int:
    args = parse_args(argv)
    from ebft_megatron.cli import run_cli

    def job():
        from ebft_megatron.checkpoint import store
        from ebft_megatron.errors import UsageError
        from ebft_megatron.data.tokenizers import Tokenizer
        from ebft_megatron.models.gpt import build_model
        from ebft_megatron.runtime import distributed

        meta = store.read_meta(args.load)
        arch = store.architecture_of(args.load)
        arch.check_parallel(args.tp, args.pp)
        tokenizer = Tokenizer(f"{args.load}/tokenizer")
        prompt_ids = tokenizer.encode(args.prompt)
        if not prompt_ids:
            raise UsageError("--prompt encodes to no tokens")
        if len(prompt_ids) + args.max_new_tokens > arch.max_position_embeddings:
            raise UsageError(f"prompt + new tokens exceed the model's {arch.max_position_embeddings} positions")
        distributed.initialize(args.tp, args.pp, seed=args.seed)
        from ebft_megatron.config import torch_dtype

        model = build_model(arch, params_dtype=torch_dtype(store.stored_dtype(meta)))
        store.load_model_weights(model, args.load)
        eos = None if args.no_stop_at_eos else tokenizer.eos_id
        ids = generate_ids(model, arch, prompt_ids, args.max_new_tokens, args.temperature, args.top_p, args.seed, eos)
        if distributed.is_rank0():
            if args.print_ids:
                print("ids:", ids, file=sys.stderr)
            print(tokenizer.decode(ids), flush=True)
        distributed.destroy()

    return run_cli(job)


if __name__ == "__main__":
    sys.exit(main())
