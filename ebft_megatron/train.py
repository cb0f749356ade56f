"""Train with EBFT, SFT or RLVR on megatron-core (any TP/PP/DP).

  python -m ebft_megatron.train --config examples/ebft_smollm2_stdlib.yaml
  torchrun --nproc_per_node=8 -m ebft_megatron.train --config examples/ebft_qwen.yaml parallel.tp=2 train.steps=500
  python -m ebft_megatron.train --check --gpus 16 --config examples/ebft_qwen.yaml parallel.tp=2

Settings come from the YAML file (sections below), then from ``section.key=value`` overrides.
A run with train.save set resumes from its latest good checkpoint when restarted.
--check validates the settings, the checkpoints and the data in this one process and prints what
it found (model, layout, chunk counts, memory estimate) without training; the launch scripts run
it before starting torchrun.
"""

from __future__ import annotations

import argparse
import sys

from ebft_megatron.cli import run_cli
from ebft_megatron.config import load_config, settings_help


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m ebft_megatron.train", description=__doc__,
        epilog="settings (section.key = default):" + settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML file with the sections below (optional)")
    parser.add_argument("--check", action="store_true",
                        help="validate settings, checkpoints and data, print a summary and exit (no training)")
    parser.add_argument("--gpus", type=int, metavar="N",
                        help="with --check: processes the job will run, over all nodes (default: tp x pp)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="settings that replace the file's")
    args = parser.parse_args(argv)
    if args.gpus is not None and (not args.check or args.gpus < 1):
        parser.error("--gpus takes a positive count and goes with --check")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)

    def job():
        # torch and megatron load here, once the arguments are read (--help and a bad flag answer at once)
        # and after run_cli has quieted megatron's import-time notices
        from ebft_megatron.runtime import distributed, watchdog
        from ebft_megatron.training.loop import Trainer
        from ebft_megatron.training.preflight import check_run

        config = load_config(args.config, args.overrides)
        if args.check:
            check_run(config, args.gpus)
            return
        try:
            Trainer(config).run()
        finally:
            watchdog.close()
            distributed.destroy()

    return run_cli(job)


if __name__ == "__main__":
    sys.exit(main())
