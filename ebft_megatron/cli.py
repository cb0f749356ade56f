"""Shared behaviour of the command-line entry points: user errors become one clear line and a
non-zero exit, never a stack trace from deep inside megatron."""

from __future__ import annotations

import os
import sys
import warnings


def quiet_imports() -> None:
    """Silence megatron's import-time notices about optional GPU packages (apex, TE)."""
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine|apex|ShardedTensor).*")
    for category in (UserWarning, FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(megatron|torch\.distributed)")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # megatron's distributed optimizer zeroes the grads of its fp32 shard views, which are not leaves
    warnings.filterwarnings("ignore", message=".*grad attribute of a Tensor that is not a leaf.*")
    os.environ.setdefault("WANDB_SILENT", "true")  # keep the console to our progress lines


class UsageError(ValueError):
    """A bad setting or input found by an entry point itself."""


def user_error_types() -> tuple:
    from ebft_megatron.checkpoint.convert import ConversionError
    from ebft_megatron.checkpoint.hf_mapping import MappingError
    from ebft_megatron.checkpoint.store import CheckpointError
    from ebft_megatron.config import ConfigError
    from ebft_megatron.data.sources import DataError
    from ebft_megatron.data.tokenizers import TokenizerError
    from ebft_megatron.features.network import FeatureConfigError
    from ebft_megatron.models.architecture import ModelConfigError
    from ebft_megatron.objective.rlvr import RewardFunctionError
    from ebft_megatron.rollouts.layout import LayoutError
    from ebft_megatron.runtime.distributed import ParallelLayoutError
    from ebft_megatron.training.loop import TrainingAborted

    return (UsageError, ConfigError, DataError, TokenizerError, ConversionError, MappingError, CheckpointError,
            ModelConfigError, FeatureConfigError, LayoutError, ParallelLayoutError, RewardFunctionError,
            TrainingAborted, FileNotFoundError, FileExistsError)


def run_cli(job, error_types: tuple = ()) -> int:
    """Run ``job``; a user error (``error_types``, by default every error type of the package) becomes
    one ``error:`` line on rank 0 and exit code 2. Light tools pass their own types, because the
    default list imports megatron."""
    quiet_imports()
    try:
        job()
    except (error_types or user_error_types()) as err:
        if os.environ.get("RANK", "0") == "0":  # the same error on every rank: say it once
            print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
