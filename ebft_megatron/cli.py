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
    ``also``) becomes one ``error:`` line on rank 0 and exit code 2."""
    quiet_imports()
    try:
        job()
    except (UserError, FileNotFoundError, FileExistsError, *also) as err:
        if os.environ.get("RANK", "0") == "0":  # the same error on every rank: say it once
            print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
