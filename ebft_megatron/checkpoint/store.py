"""Our checkpoint folder: a megatron dist checkpoint plus what is needed to rebuild the model.

    CKPT/
      ebft_checkpoint.json   format, architecture, step, ... (written last: its presence and
                             "complete": true mark a finished checkpoint)
      hf_config.json         the original Hugging Face config.json
      tokenizer/             the model's tokenizer files
      model/                 megatron dist checkpoint (torch_dist), loadable at any TP/PP
      <other>/               e.g. optimizer/ from the trainer

Writes are atomic: everything goes to ``CKPT.partial`` and is renamed to ``CKPT`` only when every
rank has finished, so a kill during a save never leaves a folder that looks complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import typing
from pathlib import Path
from typing import Callable, Optional

import torch

from ebft_megatron.errors import UserError
from ebft_megatron.models.architecture import Llama3RopeScaling, ModelArchitecture
from ebft_megatron.settings import unknown_and_missing

FORMAT = "ebft_megatron.checkpoint"
VERSION = 1
META_FILE = "ebft_checkpoint.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "generation_config.json",
)


class CheckpointError(UserError, RuntimeError):
    pass


def _barrier():
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def _broadcast_error(message: Optional[str]) -> None:
    """Raise the same error on every rank if rank 0 found one (keeps ranks from deadlocking)."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [message]
        dist.broadcast_object_list(box, src=0)
        message = box[0]
    if message:
        raise CheckpointError(message)


# checkpoints written before the dtype names were unified call them this way
_OLD_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def stored_dtype(meta: dict) -> str:
    """The parameter dtype a checkpoint was written in (``config.DTYPES`` names)."""
    name = meta.get("dtype", "float32")
    return _OLD_DTYPE_NAMES.get(name, name)


def read_meta(ckpt_dir: str | Path) -> dict:
    """Validate a checkpoint folder and return its metadata; clear errors for partial/corrupt."""
    ckpt = Path(ckpt_dir)
    if not ckpt.exists():
        partial = ckpt.with_name(ckpt.name + ".partial")
        hint = f" (an unfinished save is at {partial})" if partial.exists() else ""
        raise CheckpointError(f"checkpoint {ckpt} does not exist{hint}")
    if not ckpt.is_dir():
        raise CheckpointError(f"checkpoint {ckpt} is not a folder")
    meta_path = ckpt / META_FILE
    if not meta_path.is_file():
        raise CheckpointError(
            f"checkpoint {ckpt} is incomplete or not an ebft_megatron checkpoint: {META_FILE} is missing"
        )
    meta = read_json(meta_path, f"checkpoint {ckpt}: {META_FILE}")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not meta.get("complete"):
        raise CheckpointError(f"checkpoint {ckpt}: {META_FILE} does not mark a complete {FORMAT}")
    version = meta.get("version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"checkpoint {ckpt}: {META_FILE} has version {version!r}, not a format version number; "
                              "convert or save the checkpoint again")
    if version > VERSION:
        raise CheckpointError(f"checkpoint {ckpt} has format version {meta['version']}; this ebft_megatron reads <= {VERSION}")
    # what the readers of the metadata take as they are (architecture_of, stored_dtype)
    if not isinstance(meta.get("architecture"), dict):
        raise CheckpointError(f"checkpoint {ckpt}: {META_FILE} has no 'architecture' object (got "
                              f"{meta.get('architecture')!r}); convert or save the checkpoint again")
    if not isinstance(meta.get("dtype", ""), str):
        raise CheckpointError(f"checkpoint {ckpt}: {META_FILE} has dtype {meta['dtype']!r}, not a dtype name; convert "
                              "or save the checkpoint again")
    model_dir = ckpt / "model"
    if not (model_dir / ".metadata").is_file():
        raise CheckpointError(f"checkpoint {ckpt}: model/.metadata is missing; the weights are incomplete")
    return meta


def read_json(path: Path, name: str):
    """The JSON value in ``path``; a CheckpointError, starting with ``name``, when it cannot be read."""
    try:
        return json.loads(path.read_text())
    except ValueError as err:  # bad JSON, bad UTF-8, or a number of thousands of digits that Python will not hold
        problem = str(err).split(";")[0]
    except RecursionError:
        problem = "nested too deeply"
    raise CheckpointError(f"{name} is corrupt ({problem}); the checkpoint must be written again")


def architecture_of(ckpt_dir: str | Path) -> ModelArchitecture:
    data = read_meta(ckpt_dir)["architecture"]
    where = f"checkpoint {ckpt_dir}: {META_FILE}: architecture"
    _check_keys(ModelArchitecture, data, where)
    if data.get("rope_scaling") is not None:
        _check_keys(Llama3RopeScaling, data["rope_scaling"], f"{where}.rope_scaling")
    arch = ModelArchitecture.from_json(data)
    _check_fields(arch, where)
    return arch


def _check_keys(cls, data, where: str) -> None:
    """``data`` is an object with the fields of the dataclass ``cls``: no unknown ones, none missing."""
    if not isinstance(data, dict):
        raise CheckpointError(f"{where} is {data!r}, not an object; convert the checkpoint again")
    unknown, missing = unknown_and_missing(cls, data)
    if unknown or missing:
        problems = [f"unknown key(s) {unknown}"] if unknown else []
        problems += [f"missing key(s) {missing}"] if missing else []
        raise CheckpointError(f"{where}: {' and '.join(problems)}; convert the checkpoint again")


def _check_fields(described, where: str) -> None:
    """Each field of a dataclass read from JSON has its declared type, and its sizes are positive:
    the model is built from them far from here."""
    hints = typing.get_type_hints(type(described))
    for f in dataclasses.fields(described):
        value, kind = getattr(described, f.name), hints[f.name]
        optional = type(None) in typing.get_args(kind)
        if optional:
            kind = next(k for k in typing.get_args(kind) if k is not type(None))
            if value is None:
                continue
        if dataclasses.is_dataclass(kind) and isinstance(value, kind):
            _check_fields(value, f"{where}.{f.name}")
            continue
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        fits = {int: isinstance(value, int) and number, float: number}.get(kind, isinstance(value, kind))
        if fits and number and not optional and not value > 0:
            fits = False
        if not fits:
            expected = f"a positive {kind.__name__}" if kind in (int, float) and not optional else kind.__name__
            raise CheckpointError(f"{where}.{f.name} is {value!r}, expected {expected}; convert the checkpoint again")


def save_checkpoint(
    ckpt_dir: str | Path,
    model_sharded_state: dict,
    arch: ModelArchitecture,
    hf_config: dict,
    tokenizer_dir: Optional[str | Path] = None,
    extra_meta: Optional[dict] = None,
    extra_shards: Optional[dict[str, dict]] = None,
    extra_writer: Optional[Callable[[Path], None]] = None,
    overwrite: bool = False,
) -> Path:
    """Collective: every rank calls it with its own sharded state dicts.

    ``extra_shards`` maps a subfolder name to another sharded state dict (e.g. the optimizer);
    ``extra_writer(partial_dir)`` runs on rank 0 to add plain files before the folder is sealed.
    """
    from megatron.core import dist_checkpointing

    final = Path(ckpt_dir)
    partial = final.with_name(final.name + ".partial")
    error = None
    if _rank() == 0:
        if final.exists() and not overwrite:
            error = f"output {final} already exists; choose another path or remove it first"
        else:
            if partial.exists():
                shutil.rmtree(partial)
            (partial / "model").mkdir(parents=True)
            for name in extra_shards or {}:
                (partial / name).mkdir()
    _broadcast_error(error)
    _barrier()

    dist_checkpointing.save(model_sharded_state, str(partial / "model"))
    for name, sharded in (extra_shards or {}).items():
        dist_checkpointing.save(sharded, str(partial / name))
    _barrier()

    if _rank() == 0:
        (partial / "hf_config.json").write_text(json.dumps(hf_config, indent=2))
        if tokenizer_dir is not None:
            copy_tokenizer_files(tokenizer_dir, partial / "tokenizer")
        if extra_writer is not None:
            extra_writer(partial)
        meta = {"format": FORMAT, "version": VERSION, "complete": True, "architecture": arch.to_json()}
        meta.update(extra_meta or {})
        meta_path = partial / META_FILE
        with open(meta_path, "w") as handle:
            json.dump(meta, handle, indent=2)
            handle.flush()
            os.fsync(handle.fileno())
        if final.exists():
            # overwrite: move the old one aside first so that a crash here keeps one good copy
            old = final.with_name(final.name + ".old")
            if old.exists():
                shutil.rmtree(old)
            os.rename(final, old)
            os.rename(partial, final)
            shutil.rmtree(old)
        else:
            os.rename(partial, final)
    _barrier()
    return final


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> list[str]:
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def read_errors() -> tuple:
    """What a failed dist-checkpoint read raises. torch's CheckpointException derives from
    BaseException, so ``except Exception`` alone would let it through as a traceback."""
    from torch.distributed.checkpoint.api import CheckpointException

    return (Exception, CheckpointException)


def describe_read_error(err: BaseException) -> str:
    """One line for the user: torch DCP errors carry whole remote tracebacks in their text."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    return f"{type(err).__name__}: {last}" if last and len(lines) == 1 else (last or type(err).__name__)


def load_model_weights(model, ckpt_dir: str | Path) -> dict:
    """Load the model weights of a checkpoint into this rank's stage (any TP/PP)."""
    from megatron.core import dist_checkpointing

    meta = read_meta(ckpt_dir)
    try:
        state = dist_checkpointing.load(model.sharded_state_dict(), str(Path(ckpt_dir) / "model"))
    except read_errors() as err:  # name the checkpoint, keep the cause
        raise CheckpointError(f"checkpoint {ckpt_dir}: the model weights could not be read ({describe_read_error(err)})") from err
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing:
        raise CheckpointError(f"checkpoint {ckpt_dir}: weights missing for {missing[:5]}")
    return meta


def gather_full_state_dict(model) -> dict:
    """TP1/PP1 only: the model's plain state dict without megatron's extra-state entries."""
    return {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
