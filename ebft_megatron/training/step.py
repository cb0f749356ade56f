"""The policy's forward and backward for one training step, and the step's one read of its figures.

    batch -> objective.experience (rollouts -> features -> rewards)  [objective.objectives]
          -> forward_backward: objective.forward_inputs -> policy forward -> objective.loss
             -> backward, through megatron's pipeline schedule                  [here]
          -> optimizer.prepare_step (main gradients and their norm, on the device)
          -> read_figures: loss terms, rewards and the gradient norm, read once [here]
          -> optimizer.finish_step, when they are finite                       [training.optimizer]

``loss_terms`` runs megatron's schedule over the micro-batches' experiences, accumulating
gradients in the model (and reducing them over DP through DDP's finalize hook), and returns the
loss terms averaged over micro-batches as a device tensor on every rank; ``read_figures`` averages
them (and the experiences' metrics) over data-parallel ranks and reads them with the gradient norm
in one copy to the host: a step waits on the device once, however many layers, micro-batches and
ranks it has. ``forward_backward`` is the same forward and backward with its terms read at once.
"""

from __future__ import annotations

import torch

from ebft_megatron.models import experts
from ebft_megatron.models.gpt import model_forward
from ebft_megatron.models.output import model_output
from ebft_megatron.runtime import pipeline
from ebft_megatron.runtime.distributed import data_parallel_size, sum_over_data_parallel


def term_names(objective, policy, forward_only: bool = False) -> tuple[str, ...]:
    """The names of :func:`loss_terms`' terms: the objective's, then, for a mixture of experts in
    training, its router's load-balancing loss (unweighted; its weighted gradient is megatron's,
    ``models.experts``)."""
    balancing = not forward_only and experts.tracks_load_balancing(policy)
    return tuple(objective.terms) + ((experts.LOAD_BALANCING_TERM,) if balancing else ())


def loss_terms(policy, experiences: list, objective, forward_only: bool = False) -> torch.Tensor:
    """Policy forward (+ backward unless ``forward_only``) of every experience, as ``objective``
    defines them; gradients accumulate in the model (DDP: its grad buffers). Returns the loss terms
    (:func:`term_names`, in that order) averaged over the micro-batches: fp32 [terms] on the run's
    device, on every rank, nothing read."""
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
    means = None
    if ps.is_pipeline_last_stage():  # the same sums as term by term
        means = sum(torch.stack([t[name].float() for name in objective.terms]) for t in terms) / len(terms)
    means = pipeline.broadcast_tensor_from_last_stage(means, (len(objective.terms),), torch.float32)
    if forward_only:
        return means
    balancing = experts.load_balancing_loss(policy, len(experiences))
    return means if balancing is None else torch.cat([means, balancing.reshape(1)])


def read_figures(term_names, terms: torch.Tensor, metrics: list[dict], squared_grad_norm=None) -> dict[str, float]:
    """The step's figures in one read from the device: the loss terms (:func:`loss_terms`, named
    ``term_names``) and the micro-batches' ``metrics`` (dicts of 0-dim tensors, the same keys in
    each), averaged over the micro-batches and data-parallel ranks, and with ``squared_grad_norm``
    ([1], global already: ``optimizer.prepare_step``) ``grad_norm``."""
    # in float64, as the host's floats summed them: the terms are fp32 means, the rewards fp64
    if len(term_names) != terms.numel():  # shapes are known on the host: nothing is read
        raise ValueError(f"{terms.numel()} loss terms for the {len(term_names)} names {tuple(term_names)}")
    names, values = list(term_names), [terms.double()]
    if metrics and metrics[0]:
        keys = list(metrics[0])
        names += keys
        values.append(sum(torch.stack([m[key].to(terms.device, torch.float64) for key in keys]) for m in metrics)
                      / len(metrics))
    averaged = sum_over_data_parallel(torch.cat(values)) / data_parallel_size()
    if squared_grad_norm is None:
        return dict(zip(names, averaged.tolist()))
    *figures, squared = torch.cat([averaged, squared_grad_norm.reshape(1).double()]).tolist()
    # megatron's own reading of the norm: the square root of the summed squares, taken on the host
    return {**dict(zip(names, figures)), "grad_norm": squared ** 0.5}


def forward_backward(policy, experiences: list, objective, forward_only: bool = False) -> dict[str, float]:
    """:func:`loss_terms`, read: the terms averaged over micro-batches and data-parallel ranks."""
    terms = loss_terms(policy, experiences, objective, forward_only)
    return read_figures(term_names(objective, policy, forward_only), terms, [])
