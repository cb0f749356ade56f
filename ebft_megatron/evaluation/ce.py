"""Validation cross-entropy (reference §5.1): teacher-forced next-token CE at T = 1 on the validation
chunks, pooled per token across chunks (the reference's ``full_ce_loss``, and ``full_perplexity``
= its exp), plus the CE on response targets only (``answer_ce_loss``) when the chunks carry a
response mask.

Targets: in a chunk with L real tokens, token k = 1..L-1 is predicted from x[:k]. Every real
target counts (prompt, response, EOS, predictions across document boundaries), as in the
reference; the padding of a short last chunk does not. A response target is a target k whose
token is a response token (the reference's answer mask shifted by one).

With document masking (as training runs with ``data.document_masking``) the forward masks and
positions the chunk as training does (``block_layout``, reference §1.4): each token sees only
its own document, with positions restarting at every document start; the targets stay the same.

Each micro-batch is one forward through megatron's pipeline schedule; the last stage reduces its
vocab-parallel logits to four numbers (NLL sums and target counts) with megatron's vocab-parallel
cross entropy, so no rank ever holds the full logits and the result is the same at any TP/PP.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ebft_megatron.data.packing import PackedChunks
from ebft_megatron.evaluation.sharding import mean_and_error, replica_batches
from ebft_megatron.models import gpt
from ebft_megatron.models.attention import BlockAttentionParams
from ebft_megatron.models.output import model_output
from ebft_megatron.objective.loss import next_token_nll, real_targets
from ebft_megatron.block_layout import document_causal_visibility, document_position_ids
from ebft_megatron.runtime import device, watchdog
from ebft_megatron.runtime.distributed import sum_over_data_parallel


def target_masks(lengths: torch.Tensor, chunk_len: int, response_mask: Optional[torch.Tensor] = None):
    """[B, P-1] bool masks of the targets x[:, 1:] that count: real ones, and real response ones."""
    real = real_targets(lengths, chunk_len)
    response = None if response_mask is None else real & response_mask[:, 1:].to(real.device)
    return real, response


def nll_sums(output, chunk: torch.Tensor, lengths: torch.Tensor,
             response_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The model's output of the chunks (``models.output``) -> float64 [B, 4]: per chunk, NLL sum
    and count over the real targets, then over the response targets (zeros without a response mask)."""
    P = chunk.shape[1]
    # fp32 log-softmax, as the reference's eval forward
    nll = next_token_nll(output, chunk).double()
    real, response = target_masks(lengths.to(nll.device), P,
                                  None if response_mask is None else response_mask.to(nll.device))
    sums = torch.zeros(chunk.shape[0], 4, dtype=torch.float64, device=nll.device)
    sums[:, 0], sums[:, 1] = (nll * real).sum(-1), real.sum(-1)
    if response is not None:
        sums[:, 2], sums[:, 3] = (nll * response).sum(-1), response.sum(-1)
    return sums


def _exp(value: float) -> float:
    try:
        return math.exp(value)
    except OverflowError:
        return float("inf")


def validation_ce(model, chunks: PackedChunks, micro_batch_size: int = 1,
                  response_mask: Optional[torch.Tensor] = None, document_masking: bool = False,
                  chunk_ce: Optional[dict] = None) -> dict[str, float]:
    """Pooled next-token CE over ``chunks`` (every rank calls this; every rank gets the result).

    ``response_mask`` [N, P] defaults to ``chunks.response_mask``; ``document_masking`` keeps
    attention inside the documents of ``chunks.doc_ids``. Returns ``eval/ce``,
    ``eval/ce_se`` (the standard error over chunks: of the mean of the chunks' own CE),
    ``eval/perplexity`` and ``eval/tokens`` (targets counted), and with a response mask
    ``eval/response_tokens`` and, when there are any, ``eval/response_ce`` and
    ``eval/response_perplexity``. A ``chunk_ce`` dict gets this replica's per-chunk CE, keyed by
    the chunk's index (for comparisons paired by chunk)."""
    if response_mask is None:
        response_mask = chunks.response_mask
    if response_mask is not None and tuple(response_mask.shape) != tuple(chunks.tokens.shape):
        raise ValueError(f"response_mask has shape {tuple(response_mask.shape)}, the chunks {tuple(chunks.tokens.shape)}")
    totals = torch.zeros(4, dtype=torch.float64, device=device.current())
    per_chunk: dict[str, float] = {}
    for batch, counted in replica_batches(len(chunks), micro_batch_size):
        watchdog.progress()  # a long evaluation is not a stall
        index = torch.tensor(batch)
        chunk, lengths, response, doc_ids = device.to_device((  # the evaluation batch's boundary
            chunks.tokens[index], chunks.lengths[index], None if response_mask is None else response_mask[index],
            chunks.doc_ids[index] if document_masking else None))
        B, P = chunk.shape
        positions, mask = torch.arange(P, device=chunk.device).expand(B, P), None
        if document_masking:
            positions = document_position_ids(doc_ids)
            mask = ~document_causal_visibility(doc_ids)[:, None]  # megatron: True = masked out
        rows = gpt.forward(
            model, chunk, positions, block_params=BlockAttentionParams(mode="dense", return_hidden=True),
            reduce=lambda output: nll_sums(model_output(output, model), chunk, lengths, response),
            attention_mask=mask,
        ).to(totals.device)
        if not counted:  # a replica's forward in lockstep with the others (sharding.replica_batches)
            continue
        totals += rows.sum(0)
        per_chunk.update(zip(map(str, batch), (rows[:, 0] / rows[:, 1].clamp(min=1)).tolist()))
    if chunk_ce is not None:
        chunk_ce.update(per_chunk)
    chunk_error = mean_and_error(list(per_chunk.values()))[1]
    nll, count, response_nll, response_count = sum_over_data_parallel(totals).tolist()
    if count == 0:
        raise ValueError("the validation chunks have no next-token targets (every chunk is shorter than 2 tokens)")
    metrics = {"eval/ce": nll / count, "eval/ce_se": chunk_error, "eval/perplexity": _exp(nll / count),
               "eval/tokens": int(count)}
    if response_mask is not None:
        metrics["eval/response_tokens"] = int(response_count)
        if response_count > 0:
            metrics["eval/response_ce"] = response_nll / response_count
            metrics["eval/response_perplexity"] = _exp(response_nll / response_count)
    return metrics
