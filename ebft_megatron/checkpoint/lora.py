"""LoRA checkpoints. One is the store's format with the adapters alone in model/ and, in its
metadata, "lora": the settings (rank, alpha, dropout, targets), the base checkpoint's path and a
fingerprint of the base's metadata. Its size is the adapters', and a base that changed since
(another model at the same path) is refused rather than silently combined with adapters trained on
something else. Loading one reads the base's weights, attaches adapters with the recorded settings
(``models.lora``) and reads their weights."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

from ebft_megatron.checkpoint import store
from ebft_megatron.checkpoint.store import CheckpointError
from ebft_megatron.models.lora import LoraState, adapter_sharded_state_dict, attach_adapters
from ebft_megatron.settings import ConfigError


def base_fingerprint(ckpt) -> str:
    """sha256 of a checkpoint's metadata and its weights' index (tensor names, shapes, where
    each piece is stored): a re-saved or different model changes it."""
    ckpt = Path(ckpt)
    store.read_meta(ckpt)
    digest = hashlib.sha256()
    for path in (ckpt / store.META_FILE, ckpt / "model" / ".metadata"):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def checkpoint_meta(state: LoraState) -> dict:
    """The "lora" entry of a LoRA checkpoint's metadata."""
    return {"rank": state.rank, "alpha": state.alpha, "dropout": state.dropout, "targets": list(state.targets),
            "base": str(Path(state.base).resolve()), "base_fingerprint": base_fingerprint(state.base)}


def lora_of(ckpt) -> Optional[dict]:
    """A checkpoint's "lora" metadata, or None for a full checkpoint."""
    lora = store.read_meta(ckpt).get("lora")
    if lora is None:
        return None
    keys = {"rank": int, "alpha": (int, float), "dropout": (int, float), "targets": list, "base": str,
            "base_fingerprint": str}
    bad = [k for k, kind in keys.items() if not isinstance(lora, dict) or not isinstance(lora.get(k), kind)]
    if bad:
        raise CheckpointError(f"checkpoint {ckpt}: the LoRA metadata is corrupt ({', '.join(bad)}); save it again")
    return lora


def check_settings_match(ckpt, saved: dict, wanted) -> None:
    """A lora section (``config.lora``) must name the adapters a LoRA checkpoint holds, or rank 0
    (take the checkpoint's)."""
    if wanted.rank and (wanted.rank, list(wanted.targets), wanted.alpha) != (
            saved["rank"], list(saved["targets"]), saved["alpha"]):
        raise ConfigError(f"model.load={ckpt} holds LoRA adapters of rank {saved['rank']}, alpha "
                          f"{saved['alpha']} on {saved['targets']}; set the lora section to match or to rank 0")


def base_of(ckpt) -> Path:
    """The checkpoint holding a checkpoint's base weights: itself, or a LoRA checkpoint's base,
    checked against the fingerprint recorded when the adapters were saved."""
    lora = lora_of(ckpt)
    if lora is None:
        return Path(ckpt)
    base = Path(lora["base"])
    try:
        found = base_fingerprint(base)
    except CheckpointError as err:
        raise CheckpointError(f"LoRA checkpoint {ckpt}: its base checkpoint cannot be read ({err})") from None
    if found != lora["base_fingerprint"]:
        raise CheckpointError(f"LoRA checkpoint {ckpt}: the base checkpoint {base} is not the one the adapters were "
                              "trained on (its metadata changed since); put that base back at this path")
    return base


def load_adapter_weights(model, ckpt) -> None:
    """Load a LoRA checkpoint's adapters into a model with matching adapters attached."""
    from megatron.core import dist_checkpointing  # as in store: megatron's checkpointing loads on first use

    lora, state = lora_of(ckpt), getattr(model, "lora", None)
    if lora is None or state is None:
        holds = "holds no LoRA adapters" if lora is None else "holds LoRA adapters"
        has = "has" if state is not None else "has none"
        raise CheckpointError(f"checkpoint {ckpt}: {holds}, the model {has}; use matching lora settings")
    if (lora["rank"], list(lora["targets"])) != (state.rank, list(state.targets)):
        raise CheckpointError(f"checkpoint {ckpt}: adapters of rank {lora['rank']} on {lora['targets']}, the model's "
                              f"are rank {state.rank} on {list(state.targets)}; use the checkpoint's lora settings")
    try:
        loaded = dist_checkpointing.load(adapter_sharded_state_dict(model), str(Path(ckpt) / "model"))
    except store.read_errors() as err:
        raise CheckpointError(f"checkpoint {ckpt}: the adapters could not be read ({store.describe_read_error(err)})"
                              ) from err
    result = model.load_state_dict(loaded, strict=False)
    missing = [k for k in result.missing_keys if "_lora." in k]
    if missing:
        raise CheckpointError(f"checkpoint {ckpt}: adapter weights missing for {missing[:5]}")


def load_lora_checkpoint(model, ckpt, seed: int = 0) -> LoraState:
    """Into a freshly built model: the base weights (from the checkpoint's base), adapters with the
    recorded settings, and their weights."""
    lora = lora_of(ckpt)
    base = base_of(ckpt)
    store.load_model_weights(model, base)
    state = attach_adapters(model, lora["rank"], lora["alpha"], lora["dropout"], lora["targets"], seed=seed)
    state.base = str(base)
    load_adapter_weights(model, ckpt)
    return state
