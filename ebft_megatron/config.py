"""Typed run configuration: a YAML file plus ``section.key=value`` overrides, validated once here.

Every section is a :class:`~ebft_megatron.settings.Section`: each field's type (``Literal[...]``
for a fixed set of choices), default, help text and bounds are declared together, with
:func:`~ebft_megatron.settings.setting`, and ``python -m ebft_megatron.train --help`` prints them.
A section checks its own fields when it is built; :func:`validate` then checks the rules across
sections. Errors name the setting (and the file) and say what is expected; nothing downstream
re-checks them.

Defaults follow the reference's paper settings (``docs/reference.md``), scaled where CPU runs
need it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from ebft_megatron.data.config import DataConfig
from ebft_megatron.models.architecture import DTYPES, torch_dtype
from ebft_megatron.settings import ConfigError, Section, build, help_lines, setting

__all__ = ["Config", "ConfigError", "load_config", "layout_of", "settings_help"]

@dataclass
class ModelSettings(Section):
    section = "model"
    load: str = setting("", "The policy's starting checkpoint: a folder written by tools/convert_checkpoint.py or "
                            "a training run.", required=True)
    feature_load: str = setting("", "The frozen feature network's checkpoint; empty = the same as model.load (a "
                                    "frozen copy of the base model).")
    feature_layers: list[int] = setting(help="Feature layers (1-based: the residual stream after that block); "
                                             "empty = floor(L/4), floor(L/2), floor(3L/4).", factory=list)
    dtype: Literal["float32", "bfloat16"] = setting("float32", "Parameter dtype.")
    recompute: Literal["none", "selective", "full"] = setting(
        "selective", "Activation recompute for the policy's backward: none, selective (core attention and norms) "
                     "or full.")
    attention: Literal["fused", "generic"] = setting(
        "fused", "Block attention of the packed sequence: fused (flash / memory-efficient attention kernels "
                 "merged through their log-sum-exps; no score matrices, forward or backward) or generic (score tiles "
                 "in plain torch ops: the reference the fused kernels are tested against).")
    logit_chunk_rows: int = setting(
        1024, "Rows of the output layer computed at a time by the losses and the validation CE; each chunk's logits "
              "are recomputed in backward, so no [rows x vocab] tensor larger than this exists. 0 = full logits for "
              "every row at once (megatron's output layer and vocab-parallel cross entropy).", minimum=0)
    fp8: Literal["none", "delayed", "tensorwise", "blockwise", "mxfp8"] = setting(
        "none", "FP8 training of the policy through Transformer Engine (GPU): none, delayed, tensorwise, blockwise or "
                "mxfp8 (the last two need hardware that supports them). Needs model.dtype=bfloat16.")
    feature_fp8: bool = setting(False, "Run the frozen feature network in FP8 too (with model.fp8's recipe); "
                                       "otherwise bf16/fp32.")

    def check(self) -> None:
        if self.fp8 != "none" and self.dtype != "bfloat16":
            raise ConfigError(f"model.fp8={self.fp8} needs model.dtype=bfloat16 (FP8 GEMMs keep bf16 weights and "
                              "activations)")
        if self.feature_fp8 and self.fp8 == "none":
            raise ConfigError("model.feature_fp8=true needs an FP8 recipe in model.fp8")

    @property
    def params_dtype(self):
        return torch_dtype(self.dtype)


@dataclass
class ParallelSettings(Section):
    section = "parallel"
    tp: int = setting(1, "Tensor parallel size (must divide the attention and KV heads).", minimum=1)
    pp: int = setting(1, "Pipeline parallel size (must divide the number of layers). DP = world size / (tp * pp).",
                      minimum=1)
    ep: int = setting(1, "Expert parallel size, for mixture-of-experts models: each rank holds num_experts / ep of "
                         "each layer's experts and tokens reach them by all-to-all (must divide num_experts; "
                         "tp * ep * pp must divide the world size).", minimum=1)
    sequence_parallel: bool = setting(
        False, "Megatron sequence parallelism: norms and dropouts split over the TP ranks along the sequence (needs "
               "tp > 1 and a GPU with Transformer Engine; megatron's CPU norm refuses it).")

    def check(self) -> None:
        if self.sequence_parallel and self.tp < 2:
            raise ConfigError("parallel.sequence_parallel needs parallel.tp >= 2 (it splits the sequence over the "
                              "tensor-parallel ranks)")


@dataclass
class RolloutSettings(Section):
    section = "rollout"
    chunk_len: int = setting(1024, "P: tokens per training chunk (documents joined with EOS, cut into chunks of this "
                                   "length).", minimum=1)
    first_anchor: int = setting(8, "C: the first anchor; block b continues the prefix x[:C + b*stride].", minimum=1)
    stride: int = setting(8, "s: tokens between anchors. (chunk_len - rollout_len - first_anchor) must be divisible "
                             "by it.", minimum=1)
    rollout_len: int = setting(8, "G: tokens sampled per rollout.", minimum=1)
    num_samples: int = setting(4, "n: samples per anchor.", minimum=1)
    temperature: float = setting(0.6, "Sampling temperature T (> 0 for ebft and rlvr: rollout log-probs use "
                                      "logits / T).", minimum=0)
    top_p: float = setting(1.0, "Nucleus sampling threshold (1.0 = off).", above=0, maximum=1)
    cuda_graphs: bool = setting(True, "On CUDA, capture one rollout decode step (every layer and the sampling) as a "
                                      "CUDA graph and replay it for the others; used at tp=pp=1, ignored elsewhere.")

    def check(self) -> None:
        # torch loads on first use: --help reads this module and needs none
        from ebft_megatron.block_layout import BlockLayout, LayoutError

        try:
            BlockLayout(self.chunk_len, self.first_anchor, self.stride, self.rollout_len, self.num_samples)
        except LayoutError as err:
            raise ConfigError(f"rollout settings: {err}") from None


@dataclass
class ObjectiveSettings(Section):
    section = "objective"
    mode: Literal["ebft", "sft", "rlvr"] = setting(
        "ebft", "ebft (feature matching), sft (cross entropy only) or rlvr (a verifiable reward).")
    alignment_coef: float = setting(1.0, "alpha: weight of the alignment reward 2*cos(phi_i, g).")
    diversity_coef: float = setting(0.5, "beta: weight of the diversity penalty 2/(n-1) sum_j phi_i.phi_j.")
    whiten: bool = setting(True, "Whiten the n samples' features per block (the reference's SVD whitening).")
    pooling: Literal["last_token", "mean"] = setting(
        "last_token", "Pooling of the G completion features: last_token (code) or mean (translation).")
    rl_coef: float = setting(1.0, "Weight of the REINFORCE term.")
    ce_coef: float = setting(0.03, "gamma: weight of the cross entropy on the chunk.", minimum=0)
    reward: str = setting("ground_truth_token_match", "rlvr only: a built-in reward name or module.path:function "
                                                      "(see ebft_megatron.objective.rlvr).", nonempty=True)


@dataclass
class OptimizerSettings(Section):
    section = "optimizer"
    lr: float = setting(1e-6, "Peak learning rate (the paper: 1e-6 for EBFT).", minimum=0)
    schedule: Literal["constant", "cosine"] = setting(
        "constant", "Learning-rate schedule after warmup: constant or cosine (decays to min_lr at the last step).")
    min_lr: float = setting(0.0, "Final learning rate of the cosine schedule.", minimum=0)
    warmup_fraction: float = setting(0.03, "Warmup as a fraction of train.steps (the paper: 3%).", minimum=0, below=1)
    weight_decay: float = setting(0.0, "Adam's decoupled weight decay.", minimum=0)
    adam_beta1: float = setting(0.9, "Adam's beta1.", minimum=0, below=1)
    adam_beta2: float = setting(0.95, "Adam's beta2.", minimum=0, below=1)
    adam_eps: float = setting(1e-8, "Adam's epsilon.", above=0)
    clip_grad: float = setting(1.0, "Clip the global gradient norm to this (0 = off).", minimum=0)
    distributed: bool = setting(True, "Shard the optimizer state over data-parallel ranks (megatron's distributed "
                                      "optimizer).")


@dataclass
class TrainSettings(Section):
    section = "train"
    steps: int = setting(100, "Optimizer steps to run.", minimum=1)
    chunks_per_step: int = setting(16, "Chunks per optimizer step, over all data-parallel ranks (the paper: 16).",
                                   minimum=1)
    micro_batch: int = setting(1, "Chunks per micro-batch (per forward); gradients accumulate over chunks_per_step / "
                                  "(dp * this).", minimum=1)
    seed: int = setting(43, "Run seed: data order, rollout sampling (per DP rank), initialization.")
    save: str = setting("", "Folder for checkpoints (step_NNNNNN subfolders), logs and evaluation reports; empty = "
                            "no saving.")
    save_interval: int = setting(50, "Save every N steps (and at the end); 0 = only at the end.", minimum=0)
    keep_last: int = setting(2, "Keep this many latest checkpoints (older ones are deleted after a successful save); "
                                "0 = all.", minimum=0)
    resume: bool = setting(True, "Resume from the latest good checkpoint in train.save if there is one.")
    log_interval: int = setting(1, "Print and log metrics every N steps.", minimum=1)
    max_nonfinite_steps: int = setting(3, "Abort after this many consecutive steps with a non-finite loss or gradient "
                                          "(each one is skipped).", minimum=1)
    tensorboard: bool = setting(True, "Write tensorboard event files under train.save/tensorboard.")
    wandb: Literal["disabled", "offline", "online"] = setting(
        "offline", "wandb: disabled, offline (files under train.save/wandb) or online.")
    wandb_project: str = setting("ebft_megatron", "The wandb project.")
    timeout_minutes: float = setting(
        20.0, "A rank that makes no progress for this long (a stopped process, a lost node, a stuck reader) ends the "
              "job: every rank waiting on it says which rank and phase it was in and exits (code 3), so that "
              "torchrun's restarts resume from the last checkpoint. Also the collectives' timeout. Raise it for "
              "evaluations or saves that take longer.", above=0)
    peak_tflops: float = setting(989.0, "Peak dense TFLOP/s of one GPU in the training dtype, for the logged MFU "
                                        "(989 = H100 SXM bf16).", above=0)

    def check(self) -> None:
        if self.chunks_per_step % self.micro_batch:
            raise ConfigError(f"train.chunks_per_step={self.chunks_per_step} is not a multiple of "
                              f"train.micro_batch={self.micro_batch}")

    def check_data_parallel(self, dp_size: int) -> None:
        """A step's chunks split evenly over ``dp_size`` replicas' micro-batches (known once the
        job's size is: at launch, or by ``train --check --gpus``)."""
        if self.chunks_per_step % (dp_size * self.micro_batch):
            raise ConfigError(f"train.chunks_per_step={self.chunks_per_step} must be a multiple of data-parallel "
                              f"size {dp_size} x train.micro_batch {self.micro_batch}")


@dataclass
class EvalSettings(Section):
    section = "eval"
    interval: int = setting(0, "Evaluate every N steps (and before the first and after the last); 0 = only before "
                               "and after.", minimum=0)
    ce_chunks: int = setting(16, "Validation chunks for the cross entropy (0 = all).", minimum=0)
    cfm_chunks: int = setting(4, "Validation chunks for the feature-matching curve (CFM vs completion length).",
                              minimum=0)
    temperature: float = setting(0.6, "Sampling temperature for the CFM curve (the reference evaluates at the "
                                      "training temperature).", minimum=0)
    before_and_after: bool = setting(True, "Evaluate before the first step and after the last (off: another job "
                                           "evaluates the checkpoints).")


LORA_TARGETS = ("qkv", "proj", "fc1", "fc2")


@dataclass
class LoraSettings(Section):
    section = "lora"
    rank: int = setting(0, "LoRA rank r: train low-rank adapters on the policy's linear layers, base weights frozen "
                           "(the frozen feature network is then the policy with its adapters switched off, unless "
                           "model.feature_load names another checkpoint); 0 = full fine-tuning.", minimum=0)
    alpha: float = setting(16.0, "LoRA alpha: the adapters' update is scaled by alpha / rank.", above=0)
    dropout: float = setting(0.0, "Dropout on the adapters' input (training only).", minimum=0, below=1)
    targets: list[Literal["qkv", "proj", "fc1", "fc2"]] = setting(
        help="The linear layers that get adapters: qkv (attention input), proj (attention output), fc1 (MLP gate and "
             "up), fc2 (MLP down).", factory=lambda: list(LORA_TARGETS))

    def check(self) -> None:
        if self.rank and not self.targets:
            raise ConfigError("lora.targets is empty; name at least one of qkv, proj, fc1, fc2 (or set lora.rank=0)")
        if len(set(self.targets)) != len(self.targets):
            raise ConfigError(f"lora.targets {self.targets} repeats a layer")


@dataclass
class MoESettings(Section):
    section = "moe"
    aux_loss_weight: Optional[float] = setting(
        None, "Weight of the router's load-balancing loss (megatron's auxiliary loss, summed over the MoE layers), "
              "added to the sft, rlvr and ebft losses and logged as loss/load_balancing; empty = the checkpoint's "
              "router_aux_loss_coef; 0 = off. Dense models ignore it.", minimum=0)
    expert_capacity_factor: Optional[float] = setting(
        None, "Must stay empty: routing is dropless. A capacity would drop tokens, and a token's output would then "
              "depend on the other tokens of its batch, so identical rollouts would get different tokens and "
              "log-probs.")

    def check(self) -> None:
        if self.expert_capacity_factor is not None:
            raise ConfigError(f"moe.expert_capacity_factor={self.expert_capacity_factor}: routing that drops tokens is "
                              "not supported (a dropped token's output depends on the rest of its batch, so identical "
                              "rollouts would get different log-probs); leave it empty for dropless routing")


@dataclass
class Config:
    model: ModelSettings = field(default_factory=ModelSettings)
    parallel: ParallelSettings = field(default_factory=ParallelSettings)
    rollout: RolloutSettings = field(default_factory=RolloutSettings)
    objective: ObjectiveSettings = field(default_factory=ObjectiveSettings)
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)
    moe: MoESettings = field(default_factory=MoESettings)
    data: DataConfig = field(default_factory=DataConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = {f.name: f.default_factory for f in dataclasses.fields(Config)}


# --- parsing --------------------------------------------------------------------------------
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
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            line = data.count(b"\n", 0, err.start) + 1
            raise ConfigError(f"{path}: line {line} is not valid UTF-8 (byte {data[err.start]:#04x}); save the file "
                              "as UTF-8") from None
        try:
            loaded = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            line = f" line {mark.line + 1}" if mark is not None else ""
            if isinstance(err, yaml.reader.ReaderError):  # a character YAML refuses; the error has its offset
                line = " line " + str(text.count("\n", 0, err.position) + 1)
            # a reader error's text runs over two lines; its first line says the problem
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError(f"{path}:{line} is not valid YAML ({problem})") from None
        except ValueError as err:  # well-formed, but Python cannot hold it: 2001-02-30, a 5000-digit number
            raise ConfigError(f"{path}: a value cannot be read ({str(err).split(';')[0]}); fix it") from None
        except RecursionError:
            raise ConfigError(f"{path}: nested too deeply to read; a config holds sections of settings") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of sections ({', '.join(SECTIONS)})")
        unknown = sorted(set(loaded) - set(SECTIONS), key=str)  # keys may be numbers too
        if unknown:
            raise ConfigError(f"{path}: unknown section(s) {unknown}; valid sections: {', '.join(SECTIONS)}")
        for name, values in loaded.items():
            if values is not None and not isinstance(values, dict):
                raise ConfigError(f"{path}: section '{name}' must be a mapping of settings, got {values!r}")
        raw = {name: dict(values or {}) for name, values in loaded.items()}
    for override in overrides:
        key, sep, value = override.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or section not in SECTIONS:
            raise ConfigError(f"override {override!r}: write section.key=value with a section among "
                              f"{', '.join(SECTIONS)} (e.g. train.steps=10)")
        raw.setdefault(section, {})[name] = value
    config = Config(**{name: build(SECTIONS[name], raw.get(name, {}), where) for name in SECTIONS})
    _expand_user_paths(config, where)
    validate(config, where)
    return config


def _expand_user_paths(config: Config, where: str = "config") -> None:
    """``~`` in path settings means the home folder, as in a shell."""
    import os

    for section, name in (("model", "load"), ("model", "feature_load"), ("train", "save"), ("data", "path"),
                          ("data", "eval_path")):
        holder = getattr(config, section)
        value = getattr(holder, name)
        if isinstance(value, str) and "\0" in value:  # the OS refuses such a path wherever it is used
            raise ConfigError(f"{where}: {section}.{name}: {value!r} holds a NUL character, which no path can hold")
        if isinstance(value, str) and value.startswith("~"):
            setattr(holder, name, os.path.expanduser(value))


def validate(config: Config, where: str = "config") -> None:
    """The rules across sections; what passes here is trusted by the rest of the code."""
    # torch and megatron load on first use: --help reads this module and needs neither
    from ebft_megatron.objective.objectives import OBJECTIVES

    def fail(message):
        raise ConfigError(f"{where}: {message}")

    m, r, o = config.model, config.rollout, config.objective
    if not m.load:
        fail("model.load is required: a checkpoint folder (tools/convert_checkpoint.py converts a Hugging Face model)")
    if OBJECTIVES[o.mode].samples_rollouts:
        if r.temperature == 0:
            fail(f"rollout.temperature must be > 0 for mode {o.mode} (rollout log-probs use logits / T), got 0")
        if r.num_samples < 2:
            fail(f"rollout.num_samples must be at least 2 for mode {o.mode} (the leave-one-out baseline needs a "
                 "sibling)")
    if config.lora.rank and config.parallel.sequence_parallel:
        fail("lora.rank > 0 does not run with parallel.sequence_parallel=true (the adapters take the full sequence "
             "on every TP rank); turn one of them off")
    anchor = config.data.response_anchor
    if anchor is not None and anchor >= r.chunk_len:
        fail(f"data.response_anchor={anchor} must be below the chunk length rollout.chunk_len={r.chunk_len}")


def layout_of(config: Config):
    """The run's strided block layout (``block_layout.BlockLayout``) from the rollout section."""
    # torch loads on first use: --help reads this module and needs none
    from ebft_megatron.block_layout import BlockLayout

    r = config.rollout
    return BlockLayout(r.chunk_len, r.first_anchor, r.stride, r.rollout_len, r.num_samples)


# --- help -----------------------------------------------------------------------------------
def settings_help() -> str:
    lines = []
    for name, cls in SECTIONS.items():
        lines.append(f"\n{name}:")
        lines.extend(help_lines(cls))
    return "\n".join(lines)
