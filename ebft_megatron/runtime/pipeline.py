"""Forward passes through the pipeline stages, using megatron's own schedules.

Inference-style forwards (generation, rollout decode steps, the feature network, evaluation) go
through ``get_forward_backward_func()(forward_only=True)`` so that PP>1 sends activations between
stages exactly as training does. What runs on a stage is the caller's (``models.gpt.forward``
runs a GPT model's stage). The last stage reduces its output with ``reduce`` (for example:
gather the TP shards of the logits for some rows, or take the sampled tokens), and the result is
broadcast to every stage of the pipeline so that all ranks continue in lockstep.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from ebft_megatron.runtime import device


def gather_vocab_parallel(logits: torch.Tensor) -> torch.Tensor:
    """[..., V/TP] -> [..., V] (all-gather over the tensor parallel group)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    if ps.get_tensor_model_parallel_world_size() == 1:
        return logits
    return gather_from_tensor_model_parallel_region(logits)


def broadcast_from_last_stage(value: Any) -> Any:
    """Send a picklable value (tensors included) from the last pipeline stage to all stages; its
    tensors arrive on each rank's own device (unpickled they would be where the sender had them:
    another GPU of the node, or the host)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() == 1:
        return value
    box = [value if ps.is_pipeline_last_stage() else None]
    dist.broadcast_object_list(box, src=ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group())
    return value if ps.is_pipeline_last_stage() else device.to_device(box[0])


def broadcast_tensor_from_last_stage(value: Optional[torch.Tensor], shape, dtype) -> torch.Tensor:
    """Send one tensor of a known ``shape`` and ``dtype`` from the last pipeline stage to all
    stages, as a tensor collective on the run's device (nothing pickled, nothing read on the host:
    it can sit inside a decode step)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() == 1:
        return value
    if not ps.is_pipeline_last_stage():
        value = torch.empty(shape, dtype=dtype, device=device.current())
    dist.broadcast(value, src=ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group())
    return value


def forward(model, forward_stage: Callable[[Any], torch.Tensor], seq_length: int, micro_batch_size: int,
            reduce: Callable[[torch.Tensor], Any], result: Optional[tuple] = None) -> Any:
    """No-grad forward of one micro-batch through all stages of ``model`` (eval mode for the call):
    ``forward_stage(stage_model)`` runs this rank's stage on the batch (it knows the batch; the
    schedule passes activations between stages), and ``reduce(output)`` of the last stage's output
    is returned on every rank: as a tensor collective when ``result`` gives its (shape, dtype),
    otherwise as a picklable object."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(data_iterator, stage_model):
        def collect(output_tensor, non_loss_data=False):
            return reduce(output_tensor)

        return forward_stage(stage_model), collect

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            results = get_forward_backward_func()(
                forward_step_func=forward_step,
                data_iterator=iter([None]),
                model=[model],
                num_microbatches=1,
                seq_length=seq_length,
                micro_batch_size=micro_batch_size,
                forward_only=True,
                collect_non_loss_data=True,
            )
    finally:
        model.train(was_training)
    from megatron.core import parallel_state as ps

    output = results[0] if ps.is_pipeline_last_stage() else None
    if result is not None:
        return broadcast_tensor_from_last_stage(output, *result)
    return broadcast_from_last_stage(output)
