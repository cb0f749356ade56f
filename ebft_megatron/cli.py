"""Shared behaviour of the command-line entry points: user errors become one clear line and a
non-zero exit, never a stack trace from deep inside megatron."""

from __future__ import annotations

import os
import sys
import warnings

from ebft_megatron.errors import UsageError, UserError  # noqa: F401  (UsageError: for the entry points)


def quiet_imports() -> None:
    """Silence megatron's import-time notices about optional GPU packages (apex, TE)."""
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine|apex|ShardedTensor).*")
    for category in (UserWarning, FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(megatron|torch\.distributed)")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # megatron's distributed optimizer zeroes the grads of its fp32 shard views, which are not leaves
    warnings.filterwarnings("ignore", message=".*grad attribute of a Tensor that is not a leaf.*")
    os.environ.setdefault("WANDB_SILENT", "true")  # keep the console to our progress lines


def run_cli(job, also: tuple = ()) -> int:
    """Run ``job``; a user error (``errors.UserError``, a missing or existing file, and the types in
    ``also``) becomes one ``error:`` line for the whole job and exit code 2. Under torchrun the
    line comes from whichever rank finds the error first (``distributed.print_once_per_job``):
    a settings error reaches every rank, a bad data line or checkpoint may reach one."""
    quiet_imports()
    try:
        job()
    except (UserError, FileNotFoundError, FileExistsError, *also) as err:
        if int(os.environ.get("WORLD_SIZE", "1")) == 1:
            print(f"error: {err}", file=sys.stderr, flush=True)
        else:
            # torch and the job's store, for launches of several processes only (a one-process
            # tool need not pay for the import)
            from ebft_megatron.runtime.distributed import print_once_per_job

            print_once_per_job(f"error: {err}")
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
