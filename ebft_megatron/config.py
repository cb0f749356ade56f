"""Typed run configuration: a YAML file plus ``section.key=value`` overrides, validated once here.

Every section is a dataclass; the comment lines above a field are its help text, which
``python -m ebft_megatron.train --help`` prints with the defaults. Errors name the setting (and
the file) and say what is expected; nothing downstream re-checks them.

Defaults follow the reference's paper settings (spec §6), scaled where CPU runs need it.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ebft_megatron.data.config import DataConfig


class ConfigError(ValueError):
    pass


@dataclass
class ModelSettings:
    # The policy's starting checkpoint: a folder written by tools/convert_checkpoint.py or a training run.
    load: str = ""
    # The frozen feature network's checkpoint; empty = the same as model.load (a frozen copy of the base model).
    feature_load: str = ""
    # Feature layers (1-based: the residual stream after that block); empty = floor(L/4), floor(L/2), floor(3L/4).
    feature_layers: list[int] = field(default_factory=list)
    # Parameter dtype: float32 or bfloat16.
    dtype: str = "float32"
    # Activation recompute for the policy's backward: none, selective (core attention and norms) or full.
    recompute: str = "selective"
    # Block attention of the packed sequence: fused (flash / memory-efficient attention kernels merged
    # through their log-sum-exps; no score matrices, forward or backward) or generic (score tiles in
    # plain torch ops: the reference the fused kernels are tested against).
    attention: str = "fused"
    # Rows of the output layer computed at a time by the losses and the validation CE; each chunk's
    # logits are recomputed in backward, so no [rows x vocab] tensor larger than this exists.
    # 0 = full logits for every row at once (megatron's output layer and vocab-parallel cross entropy).
    logit_chunk_rows: int = 1024
    # FP8 training of the policy through Transformer Engine (GPU): none, delayed, tensorwise, blockwise
    # or mxfp8 (the last two need hardware that supports them). Needs model.dtype=bfloat16.
    fp8: str = "none"
    # Run the frozen feature network in FP8 too (with model.fp8's recipe); otherwise bf16/fp32.
    feature_fp8: bool = False

    @property
    def params_dtype(self):
        import torch

        return torch.bfloat16 if self.dtype == "bfloat16" else torch.float32


@dataclass
class ParallelSettings:
    # Tensor parallel size (must divide the attention and KV heads).
    tp: int = 1
    # Pipeline parallel size (must divide the number of layers). DP = world size / (tp * pp).
    pp: int = 1
    # Megatron sequence parallelism: norms and dropouts split over the TP ranks along the sequence
    # (needs tp > 1 and a GPU with Transformer Engine; megatron's CPU norm refuses it).
    sequence_parallel: bool = False


@dataclass
class RolloutSettings:
    # P: tokens per training chunk (documents joined with EOS, cut into chunks of this length).
    chunk_len: int = 1024
    # C: the first anchor; block b continues the prefix x[:C + b*stride].
    first_anchor: int = 8
    # s: tokens between anchors. (chunk_len - rollout_len - first_anchor) must be divisible by it.
    stride: int = 8
    # G: tokens sampled per rollout.
    rollout_len: int = 8
    # n: samples per anchor.
    num_samples: int = 4
    # Sampling temperature T (> 0 for ebft and rlvr: rollout log-probs use logits / T).
    temperature: float = 0.6
    # Nucleus sampling threshold (1.0 = off).
    top_p: float = 1.0


@dataclass
class ObjectiveSettings:
    # ebft (feature matching), sft (cross entropy only) or rlvr (a verifiable reward).
    mode: str = "ebft"
    # alpha: weight of the alignment reward 2*cos(phi_i, g).
    alignment_coef: float = 1.0
    # beta: weight of the diversity penalty 2/(n-1) sum_j phi_i.phi_j.
    diversity_coef: float = 0.5
    # Whiten the n samples' features per block (the reference's SVD whitening).
    whiten: bool = True
    # Pooling of the G completion features: last_token (code) or mean (translation).
    pooling: str = "last_token"
    # Weight of the REINFORCE term.
    rl_coef: float = 1.0
    # gamma: weight of the cross entropy on the chunk.
    ce_coef: float = 0.03
    # rlvr only: a built-in reward name or module.path:function (see ebft_megatron.objective.rlvr).
    reward: str = "ground_truth_token_match"


@dataclass
class OptimizerSettings:
    # Peak learning rate (the paper: 1e-6 for EBFT).
    lr: float = 1e-6
    # Learning-rate schedule after warmup: constant or cosine (decays to min_lr at the last step).
    schedule: str = "constant"
    # Final learning rate of the cosine schedule.
    min_lr: float = 0.0
    # Warmup as a fraction of train.steps (the paper: 3%).
    warmup_fraction: float = 0.03
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    # Clip the global gradient norm to this (0 = off).
    clip_grad: float = 1.0
    # Shard the optimizer state over data-parallel ranks (megatron's distributed optimizer).
    distributed: bool = True


@dataclass
class TrainSettings:
    # Optimizer steps to run.
    steps: int = 100
    # Chunks per optimizer step, over all data-parallel ranks (the paper: 16).
    chunks_per_step: int = 16
    # Chunks per micro-batch (per forward); gradients accumulate over chunks_per_step / (dp * this).
    micro_batch: int = 1
    # Run seed: data order, rollout sampling (per DP rank), initialization.
    seed: int = 43
    # Folder for checkpoints (step_NNNNNN subfolders), logs and evaluation reports; empty = no saving.
    save: str = ""
    # Save every N steps (and at the end); 0 = only at the end.
    save_interval: int = 50
    # Keep this many latest checkpoints (older ones are deleted after a successful save); 0 = all.
    keep_last: int = 2
    # Resume from the latest good checkpoint in train.save if there is one.
    resume: bool = True
    # Print and log metrics every N steps.
    log_interval: int = 1
    # Abort after this many consecutive steps with a non-finite loss or gradient (each one is skipped).
    max_nonfinite_steps: int = 3
    # Write tensorboard event files under train.save/tensorboard.
    tensorboard: bool = True
    # wandb: disabled, offline (files under train.save/wandb) or online.
    wandb: str = "offline"
    wandb_project: str = "ebft_megatron"
    # Peak dense TFLOP/s of one GPU in the training dtype, for the logged MFU (989 = H100 SXM bf16).
    peak_tflops: float = 989.0


@dataclass
class EvalSettings:
    # Evaluate every N steps (and before the first and after the last); 0 = only before and after.
    interval: int = 0
    # Validation chunks for the cross entropy (0 = all).
    ce_chunks: int = 16
    # Validation chunks for the feature-matching curve (CFM vs completion length).
    cfm_chunks: int = 4
    # Sampling temperature for the CFM curve (the reference evaluates at the training temperature).
    temperature: float = 0.6
    # Evaluate before the first step and after the last (off: another job evaluates the checkpoints).
    before_and_after: bool = True


@dataclass
class Config:
    model: ModelSettings = field(default_factory=ModelSettings)
    parallel: ParallelSettings = field(default_factory=ParallelSettings)
    rollout: RolloutSettings = field(default_factory=RolloutSettings)
    objective: ObjectiveSettings = field(default_factory=ObjectiveSettings)
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    data: DataConfig = field(default_factory=DataConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = {f.name: f.default_factory for f in dataclasses.fields(Config)}


# --- parsing --------------------------------------------------------------------------------
def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, annotation, where: str):
    """Turn a YAML value or an override string into the field's type, or say what is wrong."""
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
            return None
        return _coerce(value, args[0], where)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            number = float(value) if isinstance(value, str) else value
            if int(number) != number:
                raise ValueError
            return int(number)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if annotation is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return "" if value is None else str(value)
    if origin is list:
        if isinstance(value, str):
            import yaml

            value = yaml.safe_load(value) if value.strip() else []
            if isinstance(value, (str, int, float)):
                value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item = typing.get_args(annotation)[0] if typing.get_args(annotation) else str
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def _build_section(name: str, values: dict, where: str):
    cls = SECTIONS[name]
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: section '{name}' must be a mapping of settings, got {values!r}")
    types = _field_types(cls)
    unknown = sorted(set(values) - set(types))
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {', '.join(f'{name}.{k}' for k in unknown)}; "
                          f"valid ones: {', '.join(f'{name}.{k}' for k in types)}")
    kwargs = {key: _coerce(value, types[key], f"{where}: {name}.{key}") for key, value in values.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as err:  # DataConfig raises DataError naming data.<key>
        raise ConfigError(f"{where}: {err}") from None


def load_config(path: Optional[str | Path] = None, overrides: tuple[str, ...] | list[str] = ()) -> Config:
    """YAML file (optional) + ``section.key=value`` overrides -> a validated Config."""
    raw: dict[str, dict] = {}
    where = "command line"
    if path is not None:
        import yaml

        path = Path(path)
        where = str(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            line = f" line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{path}:{line} is not valid YAML ({getattr(err, 'problem', err)})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of sections ({', '.join(SECTIONS)})")
        unknown = sorted(set(loaded) - set(SECTIONS))
        if unknown:
            raise ConfigError(f"{path}: unknown section(s) {unknown}; valid sections: {', '.join(SECTIONS)}")
        raw = {name: dict(values or {}) for name, values in loaded.items()}
    for override in overrides:
        key, sep, value = override.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or section not in SECTIONS:
            raise ConfigError(f"override {override!r}: write section.key=value with a section among "
                              f"{', '.join(SECTIONS)} (e.g. train.steps=10)")
        raw.setdefault(section, {})[name] = value
    config = Config(**{name: _build_section(name, raw.get(name, {}), where) for name in SECTIONS})
    _expand_user_paths(config)
    validate(config, where)
    return config


def _expand_user_paths(config: Config) -> None:
    """``~`` in path settings means the home folder, as in a shell."""
    import os

    for section, name in (("model", "load"), ("model", "feature_load"), ("train", "save"), ("data", "path"),
                          ("data", "eval_path")):
        holder = getattr(config, section)
        value = getattr(holder, name)
        if isinstance(value, str) and value.startswith("~"):
            setattr(holder, name, os.path.expanduser(value))


def validate(config: Config, where: str = "config") -> None:
    """Cross-field checks; what passes here is trusted by the rest of the code."""
    from ebft_megatron.rollouts.layout import BlockLayout, LayoutError

    def fail(message):
        raise ConfigError(f"{where}: {message}")

    m, r, o, opt, t, e = config.model, config.rollout, config.objective, config.optimizer, config.train, config.eval
    if not m.load:
        fail("model.load is required: a checkpoint folder (tools/convert_checkpoint.py converts a Hugging Face model)")
    choices = {"model.dtype": (m.dtype, ("float32", "bfloat16")),
               "model.recompute": (m.recompute, ("none", "selective", "full")),
               "model.attention": (m.attention, ("fused", "generic")),
               "model.fp8": (m.fp8, ("none", "delayed", "tensorwise", "blockwise", "mxfp8")),
               "objective.mode": (o.mode, ("ebft", "sft", "rlvr")),
               "objective.pooling": (o.pooling, ("last_token", "mean")),
               "optimizer.schedule": (opt.schedule, ("constant", "cosine")),
               "train.wandb": (t.wandb, ("disabled", "offline", "online"))}
    for name, (value, allowed) in choices.items():
        if value not in allowed:
            fail(f"{name}: {value!r} is not one of {', '.join(allowed)}")
    positive = {"parallel.tp": config.parallel.tp, "parallel.pp": config.parallel.pp, "train.steps": t.steps,
                "train.chunks_per_step": t.chunks_per_step, "train.micro_batch": t.micro_batch,
                "train.log_interval": t.log_interval, "train.max_nonfinite_steps": t.max_nonfinite_steps}
    for name, value in positive.items():
        if value < 1:
            fail(f"{name} must be at least 1, got {value}")
    non_negative = {"train.save_interval": t.save_interval, "train.keep_last": t.keep_last, "eval.interval": e.interval,
                    "eval.ce_chunks": e.ce_chunks, "eval.cfm_chunks": e.cfm_chunks, "optimizer.lr": opt.lr,
                    "optimizer.clip_grad": opt.clip_grad, "objective.ce_coef": o.ce_coef,
                    "model.logit_chunk_rows": m.logit_chunk_rows}
    for name, value in non_negative.items():
        if value < 0:
            fail(f"{name} must be >= 0, got {value}")
    if not 0 <= opt.warmup_fraction < 1:
        fail(f"optimizer.warmup_fraction must be in [0, 1), got {opt.warmup_fraction}")
    if config.parallel.sequence_parallel and config.parallel.tp < 2:
        fail("parallel.sequence_parallel needs parallel.tp >= 2 (it splits the sequence over the tensor-parallel ranks)")
    if t.chunks_per_step % t.micro_batch:
        fail(f"train.chunks_per_step={t.chunks_per_step} is not a multiple of train.micro_batch={t.micro_batch}")
    if not 0 < r.top_p <= 1:
        fail(f"rollout.top_p must be in (0, 1], got {r.top_p}")
    if r.temperature < 0 or (o.mode != "sft" and r.temperature == 0):
        fail(f"rollout.temperature must be > 0 for mode {o.mode} (rollout log-probs use logits / T), got {r.temperature}")
    if o.mode != "sft" and r.num_samples < 2:
        fail(f"rollout.num_samples must be at least 2 for mode {o.mode} (the leave-one-out baseline needs a sibling)")
    if m.fp8 != "none" and m.dtype != "bfloat16":
        fail(f"model.fp8={m.fp8} needs model.dtype=bfloat16 (FP8 GEMMs keep bf16 weights and activations)")
    if m.feature_fp8 and m.fp8 == "none":
        fail("model.feature_fp8=true needs an FP8 recipe in model.fp8")
    try:
        BlockLayout(r.chunk_len, r.first_anchor, r.stride, r.rollout_len, r.num_samples)
    except LayoutError as err:
        fail(f"rollout settings: {err}")


def layout_of(config: Config):
    from ebft_megatron.rollouts.layout import BlockLayout

    r = config.rollout
    return BlockLayout(r.chunk_len, r.first_anchor, r.stride, r.rollout_len, r.num_samples)


# --- help -----------------------------------------------------------------------------------
def _field_comments(cls) -> dict[str, str]:
    """The comment lines directly above each field in the class source."""
    comments, pending = {}, []
    for line in inspect.getsource(cls).splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("#").strip())
            continue
        match = re.match(r"(\w+)\s*:", stripped)
        if match and pending:
            comments[match.group(1)] = " ".join(pending)
        pending = []
    return comments


def settings_help() -> str:
    lines = []
    defaults = Config.__new__(Config)
    for name, factory in SECTIONS.items():
        try:
            section = factory()
        except Exception:  # DataConfig() may need files; show the declared defaults instead
            section = None
        setattr(defaults, name, section)
        lines.append(f"\n{name}:")
        comments = _field_comments(SECTIONS[name])
        for f in dataclasses.fields(SECTIONS[name]):
            value = getattr(section, f.name) if section is not None else f.default
            shown = "(required)" if f.name == "load" and name == "model" else repr(value)
            lines.append(f"  {name}.{f.name} = {shown}")
            if f.name in comments:
                lines.append(f"      {comments[f.name]}")
    return "\n".join(lines)
