"""An entry point under torchrun with its ranks timed on purpose (see test_error_lines.py).

    torchrun --nproc_per_node=2 tests/cli/error_launch.py --delay-rank0 S [--fail-rank1 MESSAGE] MODULE ARGS...

``--delay-rank0`` holds rank 0 back for S seconds before it starts the tool's job, so another rank
meets the error first (as on a cluster whose ranks start seconds apart); ``--fail-rank1`` makes
rank 1 alone fail with a user error (as a bad data line in that rank's shard would), while rank 0
goes on with the real job; with ``--after-init`` rank 1 fails once torch.distributed is up.
"""

import argparse
import importlib
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ebft_megatron import cli  # noqa: E402
from ebft_megatron.errors import UserError  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--delay-rank0", type=float, default=0.0)
    parser.add_argument("--fail-rank1")
    parser.add_argument("--after-init", action="store_true",
                        help="rank 1 fails once torch.distributed is up (a corrupt checkpoint found while loading)")
    parser.add_argument("module")
    args, rest = parser.parse_known_args()
    rank = int(os.environ["RANK"])
    run_cli = cli.run_cli

    def timed_run_cli(job, also=()):
        def timed_job():
            if rank == 0:
                time.sleep(args.delay_rank0)
            if rank == 1 and args.fail_rank1 and not args.after_init:
                raise UserError(args.fail_rank1)
            return job()

        return run_cli(timed_job, also)

    cli.run_cli = timed_run_cli
    if rank == 1 and args.fail_rank1 and args.after_init:
        from ebft_megatron.runtime import distributed

        initialize = distributed.initialize

        def failing_initialize(*a, **k):
            initialize(*a, **k)
            raise UserError(args.fail_rank1)

        distributed.initialize = failing_initialize
    return importlib.import_module(args.module).main(rest)


if __name__ == "__main__":
    sys.exit(main())
