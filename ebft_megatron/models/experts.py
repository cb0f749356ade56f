"""What a training step reads from a mixture of experts: its router's load-balancing loss.

megatron's MoE layer adds the load-balancing loss (its auxiliary loss, weighted by
``moe_aux_loss_coeff``) to the gradient itself, through an autograd function on the router's
output, and only in a training forward; the pipeline schedule scales it by 1 / micro-batches as it
scales the main loss. So the losses of every objective (SFT, RLVR, EBFT) get it without a line of
their own. What the layer keeps for logging is each layer's unweighted loss, summed over the
micro-batches, in megatron's MoE tracker; :func:`load_balancing_loss` reads it as one device tensor
(nothing read on the host) and clears it for the next step.
"""

from __future__ import annotations

from typing import Optional

import torch

from ebft_megatron.models.output import unwrap
from ebft_megatron.runtime import device

LOAD_BALANCING_TERM = "loss/load_balancing"
_TRACKER_NAME = "load_balancing_loss"  # what megatron's router calls it


def tracks_load_balancing(model) -> bool:
    """Whether a training forward of ``model`` adds a load-balancing loss (an MoE model whose
    loss has a weight above 0)."""
    config = unwrap(model).config
    return config.num_moe_experts is not None and config.moe_aux_loss_coeff > 0


def load_balancing_loss(model, num_microbatches: int) -> Optional[torch.Tensor]:
    """The unweighted load-balancing loss of the forwards since the last call, averaged over the
    MoE layers and micro-batches: a 0-dim fp32 device tensor on every rank of the pipeline (None
    for a model without one). Clears megatron's tracker."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    if not tracks_load_balancing(model):
        return None
    config = unwrap(model).config
    entry = get_moe_layer_wise_logging_tracker().get(_TRACKER_NAME)
    if entry is None:  # no training forward on this rank yet: every stage still joins the sum
        total = torch.zeros((), device=device.current())
    else:
        # each stage holds its own layers' losses, each TP rank the part of its share of the
        # tokens (``layers.adopt_moe_layers``; as under sequence parallelism)
        total = entry["values"].sum()
        entry["values"].zero_()
    for size, group in ((ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_group),
                        (ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_group)):
        if size > 1:
            torch.distributed.all_reduce(total, group=group())
    return total.float() / (config.num_layers * num_microbatches)
