"""Hugging Face folder <-> our megatron checkpoint (single process, TP1/PP1 in memory).

A LoRA checkpoint (adapters only, ``models.lora``) exports merged: its base weights plus
scale * B A, to Hugging Face or to a full megatron checkpoint (``merge_lora``).

The megatron checkpoint is a dist checkpoint, so it loads at any TP/PP afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch

from ebft_megatron.checkpoint import hf_mapping, store
from ebft_megatron.checkpoint import lora as lora_checkpoint
from ebft_megatron.errors import UserError
from ebft_megatron.models import lora
from ebft_megatron.models.architecture import ModelConfigError, load_hf_config, torch_dtype
from ebft_megatron.models.gpt import build_model
from ebft_megatron.runtime import distributed



class ConversionError(UserError, RuntimeError):
    pass


def read_hf_weights(hf_dir: str | Path) -> dict:
    """All tensors of a HF folder: model.safetensors, a sharded safetensors index, or a .bin."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    hf_dir = Path(hf_dir)
    index = hf_dir / "model.safetensors.index.json"
    if (hf_dir / "model.safetensors").is_file():
        files = [hf_dir / "model.safetensors"]
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise ConversionError(f"{index}: not a valid safetensors index ({err})") from None
        files = [hf_dir / name for name in sorted(set(weight_map.values()))]
    elif (hf_dir / "pytorch_model.bin").is_file():
        try:
            return torch.load(hf_dir / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except Exception as err:
            raise ConversionError(f"{hf_dir / 'pytorch_model.bin'}: cannot be read ({err})") from None
    else:
        raise ConversionError(
            f"{hf_dir}: no weights found (expected model.safetensors, model.safetensors.index.json "
            "or pytorch_model.bin)"
        )
    tensors = {}
    for path in files:
        if not path.is_file():
            raise ConversionError(f"{path}: listed in the safetensors index but missing")
        try:
            tensors.update(load_file(str(path)))
        except (SafetensorError, OSError, ValueError) as err:
            raise ConversionError(f"{path}: corrupt or truncated safetensors file ({err})") from None
    return tensors


def _refuse_existing(out: Path) -> None:
    if out.exists():
        raise ConversionError(f"output {out} already exists; choose another path or remove it first")


def hf_to_mcore(hf_dir: str | Path, out: str | Path, dtype: str = "float32", log=print) -> Path:
    hf_dir, out = Path(hf_dir), Path(out)
    _refuse_existing(out)
    if not hf_dir.is_dir():
        raise ConversionError(f"{hf_dir}: not a folder")
    hf_config, arch = load_hf_config(hf_dir)
    start = time.time()
    hf_weights = read_hf_weights(hf_dir)
    log(f"read {len(hf_weights)} tensors from {hf_dir} ({time.time() - start:.1f}s)")
    try:
        mcore_state = hf_mapping.hf_to_mcore(hf_weights, arch)
    except hf_mapping.MappingError as err:
        raise ConversionError(f"{hf_dir}: {err}") from None
    del hf_weights

    distributed.initialize(1, 1)
    params_dtype = torch_dtype(dtype)
    model = build_model(arch, params_dtype=params_dtype)
    expected = store.gather_full_state_dict(model)
    for name, tensor in mcore_state.items():
        if name not in expected:
            raise ConversionError(f"internal mapping produced an unknown parameter {name}")
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ConversionError(
                f"{hf_dir}: tensor for {name} has shape {tuple(tensor.shape)}, the config implies "
                f"{tuple(expected[name].shape)}; config.json and the weights do not match"
            )
    result = model.load_state_dict({k: v.to(params_dtype) for k, v in mcore_state.items()}, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing:
        raise ConversionError(f"internal mapping left parameters unset: {missing[:5]}")
    store.save_checkpoint(
        out, model.sharded_state_dict(), arch, hf_config, tokenizer_dir=hf_dir,
        extra_meta={"source": str(hf_dir), "dtype": dtype, "step": 0},
    )
    log(f"wrote megatron checkpoint {out} ({arch.family}, {arch.num_layers} layers, {time.time() - start:.1f}s)")
    return out


def _load_merged(ckpt: Path, log=print):
    """(model, architecture, dtype name) of a checkpoint at TP1/PP1; a LoRA checkpoint's adapters
    are merged into its base weights (W + scale * B A), so the model is a plain one."""
    meta = store.read_meta(ckpt)
    arch = store.architecture_of(ckpt)
    distributed.initialize(1, 1)
    saved = lora_checkpoint.lora_of(ckpt)
    # a LoRA checkpoint's weights are its base's, in the base's dtype
    dtype = store.stored_dtype(store.read_meta(lora_checkpoint.base_of(ckpt)) if saved else meta)
    model = build_model(arch, params_dtype=torch_dtype(dtype))
    if saved is None:
        store.load_model_weights(model, ckpt)
    else:
        lora_checkpoint.load_lora_checkpoint(model, ckpt)
        lora.merge_adapters(model)
        log(f"merged LoRA adapters (rank {saved['rank']}, alpha {saved['alpha']}, {', '.join(saved['targets'])}) "
            f"into the base {saved['base']}")
    return model, arch, dtype


def merge_lora(ckpt: str | Path, out: str | Path, log=print) -> Path:
    """A LoRA checkpoint -> a full checkpoint of the merged weights (W + scale * B A), loadable at
    any TP/PP like a converted one."""
    ckpt, out = Path(ckpt), Path(out)
    _refuse_existing(out)
    if lora_checkpoint.lora_of(ckpt) is None:
        raise ConversionError(f"{ckpt} holds no LoRA adapters; it is a full checkpoint already")
    model, arch, dtype = _load_merged(ckpt, log)
    hf_config = json.loads((ckpt / "hf_config.json").read_text())
    tokenizer = ckpt / "tokenizer" if (ckpt / "tokenizer").is_dir() else None
    step = store.read_meta(ckpt).get("step", 0)
    store.save_checkpoint(out, model.sharded_state_dict(), arch, hf_config, tokenizer_dir=tokenizer,
                          extra_meta={"source": str(ckpt), "dtype": dtype, "step": step})
    log(f"wrote merged megatron checkpoint {out}")
    return out


def mcore_to_hf(ckpt: str | Path, out: str | Path, log=print) -> Path:
    from safetensors.torch import save_file

    ckpt, out = Path(ckpt), Path(out)
    _refuse_existing(out)
    model, arch, dtype = _load_merged(ckpt, log)
    hf_state = hf_mapping.mcore_to_hf(store.gather_full_state_dict(model), arch)

    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    hf_config = json.loads((ckpt / "hf_config.json").read_text())
    hf_config["torch_dtype"] = dtype
    (partial / "config.json").write_text(json.dumps(hf_config, indent=2))
    save_file(hf_state, str(partial / "model.safetensors"), metadata={"format": "pt"})
    if (ckpt / "tokenizer").is_dir():
        store.copy_tokenizer_files(ckpt / "tokenizer", partial)
    os.rename(partial, out)
    log(f"wrote Hugging Face folder {out} ({len(hf_state)} tensors)")
    return out


__all__ = ["hf_to_mcore", "mcore_to_hf", "merge_lora", "ConversionError", "ModelConfigError", "read_hf_weights"]
