"""megatron DDP (bucketed gradient reduction) and megatron's (distributed) Adam for the policy."""

from __future__ import annotations

import torch

from ebft_megatron.config import OptimizerSettings
from ebft_megatron.models import layers
from ebft_megatron.runtime import device


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
    # a mixture of experts' routers at TP > 1 see a share of the tokens on each TP rank
    partial = layers.tp_partial_parameters(model)
    if partial:
        def finalize(model_chunks, *args, **kwargs):
            layers.sum_grads_over_tp(partial)
            return finalize_model_grads(model_chunks, *args, **kwargs)

        config.finalize_model_grads_func = finalize
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


# megatron's optimizer.step() in two halves with nothing read in between: the trainer reads the
# gradient norm together with the step's other figures (training.step.read_figures) and decides
# there whether the step is taken. Megatron's own step reads the norm by itself (an .item()), and
# a finiteness check beside it read every gradient buffer once more.

def _parts(optimizer) -> list:
    """The optimizers a (chained) megatron optimizer is made of, stub ones (a rank without
    parameters of that kind) included: they still take part in the norm's all-reduce."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


@torch.no_grad()
def prepare_step(optimizer) -> torch.Tensor:
    """The first half: the model's gradients copied into the main ones (megatron's
    ``prepare_grads``), and the squared global L2 norm of the main gradients as an fp32 [1] device
    tensor, not read: megatron's ``get_grad_norm_fp32`` up to its ``.item()`` (each parameter
    counted once over TP and PP, summed over the group megatron sums it over, with every part of a
    chained optimizer joining its group's all-reduce as megatron's own norm does). A gradient that
    is not finite anywhere makes it not finite on every rank."""
    from megatron.core.optimizer import clip_grads

    parts = _parts(optimizer)
    if any(getattr(part, "grad_scaler", None) is not None for part in parts):
        raise NotImplementedError("a loss-scaled (fp16) optimizer checks its gradients itself: use optimizer.step()")
    optimizer.prepare_grads()
    by_group: dict = {}
    for part in parts:
        by_group.setdefault(part.get_grad_stats_parallel_group(), []).extend(part.get_main_grads_for_grad_norm())
    squared = None
    for group, grads in by_group.items():
        if grads:
            overflow = torch.zeros(1, dtype=torch.int, device=device.current())
            norm, _ = clip_grads.multi_tensor_applier(clip_grads.l2_norm_impl, overflow, [grads], False)
            part_squared = norm ** 2
        else:
            part_squared = torch.zeros(1, dtype=torch.float32, device=device.current())
        torch.distributed.all_reduce(part_squared, op=torch.distributed.ReduceOp.SUM, group=group)
        squared = part_squared if squared is None else squared + part_squared
    return squared


@torch.no_grad()
def finish_step(optimizer, grad_norm: float) -> None:
    """The second half, once the step's figures are read and finite: the main gradients clipped by
    ``grad_norm`` (the square root of :func:`prepare_step`'s value, read on the host) as megatron
    clips them, then Adam and the copies back to the model."""
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    for part in _parts(optimizer):
        if getattr(part, "is_stub_optimizer", False):  # nothing to clip (megatron skips them too)
            continue
        parameters = part.get_parameters()
        if part.config.clip_grad > 0.0 and parameters:
            clip_grad_by_total_norm_fp32(parameters, part.config.clip_grad, grad_norm,
                                         part.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
    optimizer.step_with_ready_grads()
