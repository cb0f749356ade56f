"""Training checkpoints: ``<save>/step_NNNNNN/``, each a complete, loadable model checkpoint.

A training checkpoint is the store's format (``checkpoint.store``: model dist checkpoint,
hf_config.json, tokenizer/, ebft_checkpoint.json written last) plus:
- ``optimizer/``: megatron's optimizer state as a dist checkpoint in the *fully reshardable*
  format, so a run saved at one TP/PP/DP layout resumes at another;
- ``trainer_state.json``: step, data position, LR schedule, skip counters, each DP rank's
  rollout RNG state, and the config the run was started with.
With LoRA (``models.lora``) model/ holds the adapters alone, and the metadata's "lora" entry the
adapters' settings, the base checkpoint's path and a fingerprint of it: resuming checks that the
run's base is still that one; the optimizer state is the adapters' too.
Writes go to ``step_NNNNNN.partial`` and are renamed when complete, so a kill during a save
leaves the previous checkpoint as the latest good one. Loading refuses a partial or corrupt
checkpoint, naming it and the latest good one before it.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path
from typing import Optional

import torch

from ebft_megatron.checkpoint import lora as lora_checkpoint
from ebft_megatron.checkpoint import store
from ebft_megatron.checkpoint.store import CheckpointError
from ebft_megatron.models import lora
from ebft_megatron.runtime.distributed import parallel_info

STEP_DIR = re.compile(r"^step_(\d{6,})$")
TRAINER_STATE = "trainer_state.json"
# The optimizer state in model space (one tensor per parameter and state): reshardable across TP, PP, DP.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def step_dir(save_dir: str | Path, step: int) -> Path:
    return Path(save_dir) / f"step_{step:06d}"


def _is_good(ckpt: Path) -> Optional[str]:
    """None if ``ckpt`` is a complete training checkpoint, else why not."""
    try:
        store.read_meta(ckpt)
    except CheckpointError as err:
        return str(err)
    if not (ckpt / TRAINER_STATE).is_file():
        return f"{ckpt} has no {TRAINER_STATE}"
    if not (ckpt / "optimizer").is_dir():
        return f"{ckpt} has no optimizer state"
    try:
        read_trainer_state(ckpt)
    except CheckpointError as err:
        return str(err)
    return None


# What resuming reads from the trainer state (training.loop and megatron's LR scheduler), each with
# the types it must have; anything else in it (the run's config, ...) is kept for the record only.
_INTEGER, _NUMBER, _TEXT = (("an integer", (int,)), ("a number", (int, float)), ("a string", (str,)))
_STATE_FIELDS = {"step": _INTEGER, "loader": ("an object", (dict,)), "scheduler": ("an object", (dict,)),
                 "rng_by_dp": ("an object", (dict,))}
_OPTIONAL_FIELDS = {"seed": _INTEGER, "skipped_steps": _INTEGER}
_LOADER_FIELDS = {"epoch": _INTEGER, "position": _INTEGER}
_SCHEDULER_FIELDS = {"max_lr": _NUMBER, "min_lr": _NUMBER, "lr_warmup_steps": _NUMBER, "lr_decay_steps": _NUMBER,
                     "lr_decay_style": _TEXT, "num_steps": _NUMBER, "start_wd": _NUMBER, "end_wd": _NUMBER,
                     "wd_incr_steps": _NUMBER, "wd_incr_style": _TEXT}


def read_trainer_state(ckpt: str | Path) -> dict:
    """``trainer_state.json`` of a training checkpoint, with what resuming needs checked."""
    path = Path(ckpt) / TRAINER_STATE
    name = f"checkpoint {ckpt}: {TRAINER_STATE}"
    state = store.read_json(path, name)

    def check(holder: dict, fields: dict, prefix: str, required: bool = True) -> None:
        for key, (expected, types) in fields.items():
            if key not in holder and not required:
                continue
            value = holder.get(key)
            if not isinstance(value, types) or isinstance(value, bool):
                shown = f"{prefix}{key}" if key.isprintable() else f"{prefix}{key!r}"  # a DP rank key may be junk
                raise CheckpointError(f"{name}: {shown} is {value!r}, expected {expected}; the state is corrupt, "
                                      "resume from another checkpoint")

    if not isinstance(state, dict):
        raise CheckpointError(f"{name}: expected a JSON object, got a {type(state).__name__}; the state is corrupt, "
                              "resume from another checkpoint")
    check(state, _STATE_FIELDS, "")
    check(state, _OPTIONAL_FIELDS, "", required=False)
    check(state["loader"], _LOADER_FIELDS, "loader.")
    check(state["scheduler"], _SCHEDULER_FIELDS, "scheduler.")
    check(state["rng_by_dp"], {dp_rank: _TEXT for dp_rank in state["rng_by_dp"]}, "rng_by_dp.")
    return state


def restore_generator(state: dict, generator: torch.Generator, dp_rank: int, ckpt: str | Path) -> None:
    """This DP rank's rollout RNG as saved, or a fresh reproducible stream for a rank that did not exist."""
    rng = state["rng_by_dp"].get(str(dp_rank))
    if rng is None:
        # more DP ranks than when saved: derive a fresh, still reproducible stream for this rank (torch takes
        # seeds modulo 2**64, but refuses larger ones)
        generator.manual_seed((int(state.get("seed", 0)) * 1000003 + dp_rank + 7919 * state["step"]) % (1 << 64))
        return
    try:
        generator.set_state(_decode_rng(rng))
    except (ValueError, RuntimeError) as err:  # not base64, or not the state of this kind of generator
        problem = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint {ckpt}: {TRAINER_STATE}: rng_by_dp.{dp_rank} is not a random generator "
                              f"state ({problem}); resume from another checkpoint") from None


def training_checkpoints(save_dir: str | Path) -> list[Path]:
    """Step folders under ``save_dir``, newest first (partial ones excluded by name)."""
    folder = Path(save_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), path) for path in folder.iterdir() if (m := STEP_DIR.match(path.name))]
    return [path for _, path in sorted(found, reverse=True)]


def latest_good_checkpoint(save_dir: str | Path, log=print) -> Optional[Path]:
    """The newest complete checkpoint in ``save_dir``; newer broken ones are reported and skipped."""
    for ckpt in training_checkpoints(save_dir):
        problem = _is_good(ckpt)
        if problem is None:
            return ckpt
        log(f"warning: skipping {ckpt}: {problem}")
    return None


def check_resumable(ckpt: str | Path) -> Path:
    """Refuse a partial or corrupt training checkpoint with a message naming a good one."""
    ckpt = Path(ckpt)
    problem = _is_good(ckpt)
    if problem is None:
        return ckpt
    raise CheckpointError(f"cannot resume from {ckpt}: {problem}{_earlier_good_hint(ckpt)}")


def _earlier_good_hint(ckpt: Path) -> str:
    earlier = [c for c in training_checkpoints(ckpt.parent) if c.name < ckpt.name and _is_good(c) is None]
    if earlier:
        return (f"; the latest good checkpoint before it is {earlier[0]} (remove or move {ckpt.name} to resume "
                "from there)")
    return "; no earlier good checkpoint exists"


def _encode_rng(state: torch.Tensor) -> str:
    return base64.b64encode(state.numpy().tobytes()).decode()


def _decode_rng(text: str) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.frombuffer(base64.b64decode(text, validate=True), dtype=np.uint8).copy())


def _gather_rng_by_dp(generator: torch.Generator) -> dict[str, str]:
    """Every DP rank's rollout-generator state (ranks of one model-parallel group share it)."""
    import torch.distributed as dist

    mine = (parallel_info().dp_rank, _encode_rng(generator.get_state()))
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return {str(dp): state for dp, state in everyone}


def save_training_checkpoint(save_dir, step: int, policy, optimizer, arch, source_checkpoint, trainer_state: dict,
                             generator: torch.Generator, keep_last: int = 0) -> Path:
    """Collective. Writes ``step_NNNNNN`` atomically, then prunes to the ``keep_last`` newest."""
    extra_meta = {"step": step, "kind": "training"}
    if lora.has_adapters(policy):  # the adapters only: the frozen base stays where it is
        model_state = lora.adapter_sharded_state_dict(policy)
        extra_meta["lora"] = lora_checkpoint.checkpoint_meta(policy.lora)
    else:
        model_state = policy.sharded_state_dict()
    optimizer_state = optimizer.sharded_state_dict(model_state, metadata=OPTIMIZER_METADATA)
    state = dict(trainer_state, step=step, rng_by_dp=_gather_rng_by_dp(generator))
    source = Path(source_checkpoint)

    def write_state(partial: Path) -> None:
        (partial / TRAINER_STATE).write_text(json.dumps(state, indent=1))

    hf_config = json.loads((source / "hf_config.json").read_text())
    tokenizer = source / "tokenizer" if (source / "tokenizer").is_dir() else None
    final = store.save_checkpoint(
        step_dir(save_dir, step), model_state, arch, hf_config, tokenizer_dir=tokenizer,
        extra_meta=extra_meta, extra_shards={"optimizer": optimizer_state},
        extra_writer=write_state, overwrite=True,
    )
    if keep_last and store._rank() == 0:
        for old in training_checkpoints(save_dir)[keep_last:]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _allocate_optimizer_state(optimizer) -> None:
    """A fresh distributed optimizer has no Adam state yet, and megatron's loading path needs the
    state tensors to exist (it loads into them in place). megatron fills them with one step on
    zero gradients; the loaded checkpoint then overwrites everything it touched."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(sub, DistributedOptimizer):
            if not sub.optimizer.state:
                sub._init_optimizer_states_with_dummy_values()
            _skip_step_when_setting_states(sub)


def _skip_step_when_setting_states(distributed_optimizer) -> None:
    """Without Transformer Engine or apex, megatron-core 0.16 runs torch's Adam, which keeps a
    per-parameter "step" tensor. The fully reshardable loader restores "step" from the common
    state but then copies every per-parameter state key from the checkpoint, where "step" is not
    stored, and fails with KeyError('step'). Copy the keys the checkpoint has; "step" is set by
    the common state as megatron intends."""
    original = type(distributed_optimizer)._set_main_param_and_optimizer_states

    def set_states(model_param, tensors):
        group, order = distributed_optimizer.model_param_group_index_map[model_param]
        main_param = distributed_optimizer.optimizer.param_groups[group]["params"][order]
        state = distributed_optimizer.optimizer.state[main_param]
        step = state.pop("step", None) if "step" not in tensors else None
        try:
            original(distributed_optimizer, model_param, tensors)
        finally:
            if step is not None:
                state["step"] = step

    distributed_optimizer._set_main_param_and_optimizer_states = set_states


def _unshare_adam_steps(optimizer) -> None:
    """megatron's loader hands one "step" tensor to every parameter's torch-Adam state; Adam then
    increments it in place once per parameter, which corrupts the bias correction. Give each
    parameter its own copy (as a fresh torch Adam has)."""
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(sub, "optimizer", None)
        for state in getattr(inner, "state", {}).values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()


def _check_same_base(ckpt: Path, policy) -> None:
    """A LoRA checkpoint resumes only onto the base its adapters were trained on."""
    saved, state = lora_checkpoint.lora_of(ckpt), getattr(policy, "lora", None)
    if saved is None or state is None:
        lora_checkpoint.load_adapter_weights(policy, ckpt)  # raises, saying which side has adapters
    if saved["base_fingerprint"] != lora_checkpoint.base_fingerprint(state.base):
        raise CheckpointError(f"checkpoint {ckpt}: its adapters were trained on the base {saved['base']}, but this "
                              f"run's base {state.base} is another checkpoint; set model.load to that base")


def load_training_checkpoint(ckpt: str | Path, policy, optimizer, generator: torch.Generator) -> dict:
    """Restore model, optimizer and this DP rank's RNG; returns the trainer state (step, data
    position, schedule) for the caller to restore."""
    from megatron.core import dist_checkpointing

    ckpt = check_resumable(ckpt)
    try:
        _allocate_optimizer_state(optimizer)  # before the weights: the dummy step must not touch loaded params
        if lora.has_adapters(policy) or lora_checkpoint.lora_of(ckpt) is not None:
            _check_same_base(ckpt, policy)
            lora_checkpoint.load_adapter_weights(policy, ckpt)
            model_state = lora.adapter_sharded_state_dict(policy)
        else:
            store.load_model_weights(policy, ckpt)
            model_state = policy.sharded_state_dict()
        sharded = optimizer.sharded_state_dict(model_state, is_loading=True, metadata=OPTIMIZER_METADATA)
        try:
            optimizer.load_state_dict(dist_checkpointing.load(sharded, str(ckpt / "optimizer")))
            _unshare_adam_steps(optimizer)
        except store.read_errors() as err:  # name the checkpoint, keep the cause
            raise CheckpointError(f"checkpoint {ckpt}: the optimizer state could not be read "
                                  f"({store.describe_read_error(err)})") from err
    except CheckpointError as err:
        raise CheckpointError(f"{err}{_earlier_good_hint(ckpt)}") from err
    state = read_trainer_state(ckpt)  # checked by check_resumable; read again as it is now
    restore_generator(state, generator, parallel_info().dp_rank, ckpt)
    return state
