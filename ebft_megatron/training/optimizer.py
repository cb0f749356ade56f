"""megatron DDP (bucketed gradient reduction) and megatron's (distributed) Adam for the policy."""

from __future__ import annotations

import torch

from ebft_megatron.config import OptimizerSettings


def wrap_ddp(model, use_distributed_optimizer: bool = True):
    """Wrap this rank's stage in megatron's DDP and hook it into the pipeline schedules: gradients
    are reduced over DP (and tied embeddings over the first/last stage) when the schedule calls
    ``finalize_model_grads`` after the last micro-batch; accumulation steps run under no_sync."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    config = model.config
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=use_distributed_optimizer,
    )
    ddp = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
    config.no_sync_func = ddp.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    return ddp


def build_optimizer(ddp_model, settings: OptimizerSettings, params_dtype=torch.float32):
    """megatron's Adam over the DDP model; ``settings.distributed`` shards its state over DP."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = OptimizerConfig(
        optimizer="adam", lr=settings.lr, min_lr=settings.min_lr, weight_decay=settings.weight_decay,
        adam_beta1=settings.adam_beta1, adam_beta2=settings.adam_beta2, adam_eps=settings.adam_eps,
        clip_grad=settings.clip_grad, use_distributed_optimizer=settings.distributed,
        bf16=params_dtype == torch.bfloat16, params_dtype=params_dtype,
    )
    return get_megatron_optimizer(config, [ddp_model])
