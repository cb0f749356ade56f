#!/usr/bin/env python
"""Convert between Hugging Face folders and ebft_megatron (megatron-core dist) checkpoints.

  python tools/convert_checkpoint.py hf-to-mcore --hf-dir HF --out CKPT [--dtype float32|bfloat16]
  python tools/convert_checkpoint.py mcore-to-hf --ckpt CKPT --out HF
  python tools/convert_checkpoint.py merge-lora --ckpt LORA_CKPT --out CKPT

A LoRA checkpoint (adapters only) is merged into its base weights (W + scale * B A) on export:
mcore-to-hf writes the merged model, merge-lora a full megatron checkpoint of it.

The megatron checkpoint loads at any tensor/pipeline parallel layout. Supported families: Llama,
Qwen2, Mistral, Qwen3 (dense; Qwen3-MoE is refused). The output path must not exist; nothing is
left behind on failure.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ebft_megatron.models.architecture import DTYPES  # noqa: E402  (light: no torch)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    to_mcore = sub.add_parser("hf-to-mcore", help="Hugging Face folder -> megatron dist checkpoint")
    to_mcore.add_argument("--hf-dir", required=True, help="folder with config.json, weights and tokenizer files")
    to_mcore.add_argument("--out", required=True, help="checkpoint folder to create (must not exist)")
    to_mcore.add_argument("--dtype", default="float32", choices=DTYPES,
                          help="parameter dtype stored in the checkpoint (default: float32)")
    to_hf = sub.add_parser("mcore-to-hf", help="megatron dist checkpoint -> Hugging Face folder")
    to_hf.add_argument("--ckpt", required=True, help="ebft_megatron checkpoint folder")
    to_hf.add_argument("--out", required=True, help="Hugging Face folder to create (must not exist)")
    merge = sub.add_parser("merge-lora", help="LoRA checkpoint -> full megatron checkpoint of the merged weights")
    merge.add_argument("--ckpt", required=True, help="LoRA checkpoint folder (a training checkpoint of a LoRA run)")
    merge.add_argument("--out", required=True, help="checkpoint folder to create (must not exist)")
    args = parser.parse_args(argv)

    from ebft_megatron.cli import run_cli

    def job():
        from ebft_megatron.checkpoint import convert

        if args.command == "hf-to-mcore":
            convert.hf_to_mcore(args.hf_dir, args.out, dtype=args.dtype)
        elif args.command == "merge-lora":
            convert.merge_lora(args.ckpt, args.out)
        else:
            convert.mcore_to_hf(args.ckpt, args.out)

    return run_cli(job)


if __name__ == "__main__":
    sys.exit(main())
