"""Train with EBFT, SFT or RLVR on megatron-core (any TP/PP/DP).

  python -m ebft_megatron.train --config examples/ebft_smollm2_stdlib.yaml
  torchrun --nproc_per_node=8 -m ebft_megatron.train --config examples/ebft_qwen.yaml parallel.tp=2 train.steps=500

Settings come from the YAML file (sections below), then from ``section.key=value`` overrides.
A run with train.save set resumes from its latest good checkpoint when restarted.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv=None):
    from ebft_megatron.config import settings_help

    parser = argparse.ArgumentParser(
        prog="python -m ebft_megatron.train", description=__doc__,
        epilog="settings (section.key = default):" + settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML file with the sections below (optional)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="settings that replace the file's")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from ebft_megatron.cli import run_cli

    def job():
        from ebft_megatron.config import load_config
        from ebft_megatron.runtime import distributed
        from ebft_megatron.training.loop import Trainer

        config = load_config(args.config, args.overrides)
        try:
            Trainer(config).run()
        finally:
            distributed.destroy()

    return run_cli(job)


if __name__ == "__main__":
    sys.exit(main())
