"""Check a run before launching it: settings, model, data and checkpoints, in one process.

``python -m ebft_megatron.train --check --config ... [--gpus N]`` runs this; the launch scripts
run it once before torchrun, so a bad configuration stops with one ``error:`` line instead of one
traceback per node after every process has started. Nothing here initialises torch.distributed or
builds a model: it reads the checkpoint's metadata and the data, and prints what it found.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from torch.distributed.checkpoint import FileSystemReader

from ebft_megatron.checkpoint import lora as lora_checkpoint
from ebft_megatron.checkpoint import store
from ebft_megatron.config import Config, layout_of
from ebft_megatron.errors import UsageError
from ebft_megatron.models import lora
from ebft_megatron.objective.objectives import OBJECTIVES
from ebft_megatron.training import builder, memory
from ebft_megatron.training.checkpointing import latest_good_checkpoint


def check_weights(ckpt: str | Path) -> int:
    """A checkpoint folder is complete: its metadata, and every file its weights' index names, at
    least as large as the index says. Returns the number of weight tensors."""
    store.read_meta(ckpt)
    folder = Path(ckpt) / "model"
    try:
        metadata = FileSystemReader(str(folder)).read_metadata()
    except Exception as err:  # a damaged index reads as anything from EOFError to UnpicklingError
        raise store.CheckpointError(f"checkpoint {ckpt}: model/.metadata cannot be read "
                                    f"({store.describe_read_error(err)})") from None
    needed: dict[str, int] = {}
    for item in (metadata.storage_data or {}).values():
        name = getattr(item, "relative_path", None)
        if name is not None:
            needed[name] = max(needed.get(name, 0), item.offset + item.length)
    for name, size in sorted(needed.items()):
        path = folder / name
        if not path.is_file():
            raise store.CheckpointError(f"checkpoint {ckpt}: model/{name} is missing; the weights are incomplete")
        if path.stat().st_size < size:
            raise store.CheckpointError(f"checkpoint {ckpt}: model/{name} is truncated ({path.stat().st_size} of "
                                        f"{size} bytes); the weights are incomplete")
    return len(metadata.state_dict_metadata)


def _check_adapters(config: Config, say) -> None:
    """A LoRA checkpoint as ``model.load``: its base checkpoint (present, complete, the one the
    adapters were trained on) and adapter settings that match the lora section."""
    saved = lora_checkpoint.lora_of(config.model.load)
    if saved is None:
        if config.lora.rank:
            say(f"lora: new adapters of rank {config.lora.rank} on {', '.join(config.lora.targets)}")
        return
    lora_checkpoint.check_settings_match(config.model.load, saved, config.lora)
    base = lora_checkpoint.base_of(config.model.load)
    check_weights(base)
    say(f"lora: adapters of rank {saved['rank']} on {', '.join(saved['targets'])}, base {base} (complete, the "
        "one they were trained on)")


def check_run(config: Config, gpus: Optional[int] = None, say: Callable[[str], None] = print) -> None:
    """Everything a launch can know before it starts: raises the first user error, else prints a
    summary. ``gpus``: the job's processes over all nodes (default: tp x pp, i.e. DP 1)."""
    c = config
    tp, pp, ep = c.parallel.tp, c.parallel.pp, c.parallel.ep
    gpus = gpus or tp * pp * ep
    if gpus % (tp * pp):
        raise UsageError(f"{gpus} processes cannot hold parallel.tp={tp} x parallel.pp={pp}; launch a multiple "
                         f"of {tp * pp}")
    if gpus % (tp * ep * pp):
        raise UsageError(f"{gpus} processes cannot hold parallel.tp={tp} x parallel.ep={ep} x parallel.pp={pp}; "
                         f"launch a multiple of {tp * ep * pp}")
    dp = gpus // (tp * pp)
    c.train.check_data_parallel(dp)

    arch = builder.architecture(c)
    tensors = check_weights(c.model.load)
    say(f"model: {c.model.load}: {arch.family}, {arch.num_layers} layers, hidden {arch.hidden_size}, "
        f"{arch.num_attention_heads} heads ({arch.num_query_groups} key/value), vocabulary {arch.vocab_size}; "
        f"{tensors} weight tensors present")
    if arch.is_moe:
        say(f"experts: {arch.num_experts} per layer, {arch.experts_per_token} per token, dropless; "
            f"{arch.num_experts // ep} per rank at EP{ep}; load-balancing loss weight "
            f"{builder.aux_loss_weight(c, arch):g}")
    if c.lora.rank:
        lora.check_targets(c.lora.targets, arch.is_moe)
    _check_adapters(c, say)
    if c.model.feature_load:
        feature_arch = store.architecture_of(c.model.feature_load)
        feature_arch.check_parallel(tp, pp, ep if feature_arch.is_moe else 1)
        check_weights(c.model.feature_load)
        say(f"feature network: {c.model.feature_load}: {feature_arch.family}, {feature_arch.num_layers} layers")
    objective = OBJECTIVES[c.objective.mode]
    tokenizer = builder.tokenizer(c, arch)
    objective.check_setup(c, tokenizer)
    layout = layout_of(c)
    say(f"layout: {c.objective.mode}, chunks of {layout.chunk_len} tokens, {layout.num_blocks} blocks x "
        f"{layout.num_samples} samples x {layout.rollout_len} tokens; policy forward of "
        f"{objective.tokens_of(layout)} tokens per chunk")
    experts = f" (experts: EP{ep} x expert-DP{gpus // (tp * ep * pp)})" if arch.is_moe else ""
    say(f"parallel: {gpus} processes = TP{tp} x PP{pp} x DP{dp}{experts}, {c.train.chunks_per_step // (dp * c.train.micro_batch)} "
        f"micro-batches of {c.train.micro_batch} per step and rank")

    counts = {split: len(builder.chunks(c, tokenizer, split, verbose=True).tokens)
              for split in ("train", "validation")}
    steps_per_epoch = counts["train"] // c.train.chunks_per_step
    if steps_per_epoch == 0:
        raise UsageError(f"data: {counts['train']} training chunks, fewer than train.chunks_per_step="
                         f"{c.train.chunks_per_step}; add data or lower train.chunks_per_step")
    say(f"data: {counts['train']} training chunks ({steps_per_epoch} steps per epoch), {counts['validation']} "
        f"validation chunks")

    shape = memory.StepShape.of(c, arch, dp=dp)
    say(f"memory per process: {memory.estimate(arch, shape).describe()}")
    say(memory.micro_batch_advice(arch, shape))
    if c.train.save and c.train.resume:
        found = latest_good_checkpoint(c.train.save, log=say)
        say(f"resume: from {found}" if found else f"resume: no checkpoint in {c.train.save} yet; starts at step 0")
    say("check passed")
