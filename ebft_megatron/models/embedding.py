"""megatron-core's vocabulary-parallel embedding without a host sync.

At TP > 1 ``VocabParallelEmbedding.forward`` zeroes the tokens and the rows of other shards with
boolean-mask assignments (``x[mask] = 0``): an index_put with a bool mask, whose indices a GPU
finds with ``nonzero``, so the host waits, once per forward and twice per embedding, decode steps
included. :func:`forward` does the same with ``masked_fill``, which keeps shapes static and waits
for nothing; the values are the same. Everything else is megatron's forward, unchanged.
"""

from __future__ import annotations

import torch.nn.functional as F

_megatron_forward = None


def forward(self, input_):
    """``VocabParallelEmbedding.forward`` with the masking done by ``masked_fill``."""
    if self.tp_group.size() == 1 or self.deterministic_mode or self.reduce_scatter_embeddings:
        return _megatron_forward(self, input_)
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    outside = (input_ < self.vocab_start_index) | (input_ >= self.vocab_end_index)
    masked_input = (input_ - self.vocab_start_index).masked_fill(outside, 0)
    output_parallel = F.embedding(masked_input, self.weight).masked_fill(outside[..., None], 0.0)
    return reduce_from_tensor_model_parallel_region(output_parallel, group=self.tp_group)


def install() -> None:
    """Put :func:`forward` in place of megatron's. Safe to call many times."""
    global _megatron_forward
    from megatron.core.tensor_parallel.layers import VocabParallelEmbedding

    if _megatron_forward is None:
        _megatron_forward = VocabParallelEmbedding.forward
        VocabParallelEmbedding.forward = forward
