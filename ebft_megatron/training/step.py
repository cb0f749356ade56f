"""The policy's forward and backward for one training step.

    batch -> objective.experience (rollouts -> features -> rewards)  [objective.objectives]
          -> forward_backward: objective.forward_inputs -> policy forward -> objective.loss
             -> backward, through megatron's pipeline schedule                  [here]
          -> optimizer step                                                     [training.loop]

``forward_backward`` runs megatron's schedule over the micro-batches' experiences, accumulating
gradients in the model (and reducing them over DP through DDP's finalize hook), and returns the
loss terms averaged over micro-batches and data-parallel ranks, on every rank.
"""

from __future__ import annotations

import torch

from ebft_megatron.models.gpt import model_forward
from ebft_megatron.models.output import model_output
from ebft_megatron.runtime import pipeline
from ebft_megatron.runtime.distributed import mean_over_data_parallel


def forward_backward(policy, experiences: list, objective, forward_only: bool = False) -> dict[str, float]:
    """Policy forward (+ backward unless ``forward_only``) of every experience, as ``objective``
    defines them; gradients accumulate in the model (DDP: its grad buffers)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    batches = iter(experiences)

    def forward_step(data_iterator, model):
        experience = next(data_iterator)
        tokens, positions, params, mask = objective.forward_inputs(experience)
        output = model_forward(model, tokens, positions, attention_mask=mask, block_params=params)

        def loss_func(output_tensor):
            return objective.loss(model_output(output_tensor, model), experience)

        return output, loss_func

    terms = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=batches, model=[policy],
        num_microbatches=len(experiences), seq_length=objective.tokens_per_chunk,
        micro_batch_size=experiences[0].batch.chunk.shape[0], forward_only=forward_only,
    )
    averaged = None
    if ps.is_pipeline_last_stage():
        # every term's mean over the micro-batches (the same sums as term by term), read from the
        # device in one copy rather than one read per term
        keys = list(terms[0])
        means = sum(torch.stack([t[key] for key in keys]) for t in terms) / len(terms)
        averaged = dict(zip(keys, means.tolist()))
    return mean_over_data_parallel(pipeline.broadcast_from_last_stage(averaged))
