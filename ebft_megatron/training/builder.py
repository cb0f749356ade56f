"""One way to build what a run needs from its validated config: the parallel groups, the tokenizer,
the policy, the frozen feature network, the optimizer and its schedule, and the data. The trainer,
``evaluate``, ``generate`` and the benchmarks that run a policy all build through here, so a
setting (recompute, FP8, sequence parallelism, the block attention's kernels, the output layer's
row chunks) means the same thing everywhere. What builds a model without a run's config: the
checkpoint converter (one process, TP1/PP1, ``checkpoint.convert``) and the GPU validation's
kernel and Transformer-Engine-against-local checks, which build single modules on purpose.
"""

from __future__ import annotations

from pathlib import Path

from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from ebft_megatron.checkpoint import lora as lora_checkpoint
from ebft_megatron.checkpoint import store
from ebft_megatron.config import Config
from ebft_megatron.data.mapped import open_chunks
from ebft_megatron.data.packing import check_tokenizer_matches
from ebft_megatron.data.tokenizers import Tokenizer
from ebft_megatron.features.network import load_feature_network, share_policy
from ebft_megatron.models import lora
from ebft_megatron.models.architecture import torch_dtype
from ebft_megatron.models.gpt import build_model, fp8_overrides, sequence_parallel_overrides, set_block_attention
from ebft_megatron.models.lora import has_adapters
from ebft_megatron.runtime import distributed
from ebft_megatron.training.optimizer import build_optimizer, wrap_ddp


def recompute_overrides(recompute: str) -> dict:
    """TransformerConfig settings for ``model.recompute``."""
    if recompute == "selective":
        # the core attention, and the norms' outputs (the next linear layer's input), which
        # megatron discards after use and recomputes before backward
        return {"recompute_granularity": "selective", "recompute_modules": ["core_attn", "layernorm"]}
    if recompute == "full":
        return {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
    return {}


def initialize(config: Config):
    """torch.distributed and megatron's parallel groups for ``config.parallel``; the rank's place."""
    distributed.initialize(config.parallel.tp, config.parallel.pp, seed=config.train.seed,
                           timeout_minutes=config.train.timeout_minutes, ep=config.parallel.ep)
    return distributed.parallel_info()


def architecture(config: Config):
    """The policy's architecture, checked against the parallel layout before anything is built."""
    arch = store.architecture_of(config.model.load)
    arch.check_parallel(config.parallel.tp, config.parallel.pp, config.parallel.ep)
    return arch


def aux_loss_weight(config: Config, arch) -> float:
    """The weight of a mixture of experts' load-balancing loss: ``moe.aux_loss_weight``, else the
    checkpoint's own (0 for a dense model)."""
    if not arch.is_moe:
        return 0.0
    weight = config.moe.aux_loss_weight
    return float(arch.router_aux_loss_coef or 0.0) if weight is None else float(weight)


def tokenizer(config: Config, arch):
    """The checkpoint's tokenizer, checked against the model's vocabulary."""
    folder = Path(config.model.load) / "tokenizer"
    result = Tokenizer(folder)
    check_tokenizer_matches(result, arch.vocab_size, str(folder))
    return result


def _gpu_overrides(config: Config, fp8: bool) -> dict:
    return {**(fp8_overrides(config.model.fp8) if fp8 else {}),
            **sequence_parallel_overrides(config.parallel.sequence_parallel)}


def policy(config: Config, arch, load: bool = True):
    """This rank's pipeline stage of the policy, with the run's recompute, FP8, attention and output
    settings, and (``load``) the weights of ``model.load``; with ``lora.rank`` > 0, LoRA adapters
    attached after loading (base weights frozen, so base checkpoints load unchanged)."""
    m = config.model
    aux = {"moe_aux_loss_coeff": aux_loss_weight(config, arch)} if arch.is_moe else {}
    model = build_model(arch, params_dtype=torch_dtype(m.dtype), **recompute_overrides(m.recompute),
                        **_gpu_overrides(config, fp8=True), **aux)
    set_block_attention(model, m.attention)
    model.logit_chunk_rows = m.logit_chunk_rows
    if not load:
        return model
    saved = lora_checkpoint.lora_of(m.load)
    if saved is not None:  # a LoRA checkpoint: its base, then its adapters, as they were trained
        lora_checkpoint.check_settings_match(m.load, saved, config.lora)
        lora_checkpoint.load_lora_checkpoint(model, m.load, seed=config.train.seed)
        return model
    store.load_model_weights(model, m.load)
    if config.lora.rank:
        settings = config.lora
        state = lora.attach_adapters(model, settings.rank, settings.alpha, settings.dropout, settings.targets,
                                     seed=config.train.seed)
        state.base = m.load
    return model


def feature_network(config: Config, policy=None):
    """The frozen feature network: ``model.feature_load`` (else ``model.load``, or a LoRA
    checkpoint's base), kept up to its deepest feature layer. With LoRA adapters on the
    ``policy`` and no ``model.feature_load``, the policy itself (its base weights are frozen and
    its adapters are switched off for the feature forward): no second copy of the model."""
    m = config.model
    if not m.feature_load and policy is not None and has_adapters(policy):
        return share_policy(policy, m.feature_layers or None)
    # a LoRA checkpoint's features are its base model's
    model = load_feature_network(m.feature_load or lora_checkpoint.base_of(m.load), m.feature_layers or None,
                                 torch_dtype(m.dtype), **_gpu_overrides(config, fp8=m.feature_fp8))
    set_block_attention(model, m.attention)
    return model


def optimizer(config: Config, model):
    """(megatron DDP around ``model``, its (distributed) Adam)."""
    ddp = wrap_ddp(model, config.optimizer.distributed)
    return ddp, build_optimizer(ddp, config.optimizer, torch_dtype(config.model.dtype))


def scheduler(config: Config, optimizer):
    """Megatron's learning-rate and weight-decay schedule of the optimizer section: linear warmup
    over ``optimizer.warmup_fraction`` of the steps, then cosine decay to ``optimizer.min_lr`` or
    constant."""
    o, steps = config.optimizer, config.train.steps
    warmup = int(round(o.warmup_fraction * steps))
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0 if warmup else o.lr, max_lr=o.lr,
        min_lr=o.min_lr if o.schedule == "cosine" else o.lr, lr_warmup_steps=warmup,
        lr_decay_steps=max(steps, warmup + 1), lr_decay_style=o.schedule, start_wd=o.weight_decay,
        end_wd=o.weight_decay, wd_incr_steps=steps, wd_incr_style="constant",
    )


def chunks(config: Config, tokenizer, split: str, verbose: bool = False):
    """The data's ``split`` ("train" or "validation") as chunks of ``rollout.chunk_len``, read from a
    memory map when a batch needs them; raw input tokenized and the chunk index built once
    (``data.mapped``, ``data.cache_dir``)."""
    return open_chunks(config.data, tokenizer, config.rollout.chunk_len, split, verbose=verbose)
