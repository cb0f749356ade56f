"""Token log-probs from the model's output, with or without full logits.

A packed EBFT sequence has about five times the chunk's rows, and full-vocabulary logits for all of
them are the largest tensor of a step (one packed P=1024 chunk of a 152k-vocabulary model: 3.1 GB
in fp32, per copy). So the model can hand back its final hidden states instead
(``BlockAttentionParams.return_hidden``), and :class:`OutputHead` applies the output layer to a
chunk of rows at a time: each chunk's logits give its rows' log-sum-exps and target logits, and
are dropped; backward recomputes them chunk by chunk. No [rows x vocab] tensor larger than one
chunk exists at once, forward or backward.

Semantics are megatron-core's vocab-parallel cross entropy: the vocabulary is split over the
tensor-parallel ranks, each rank holds its shard's logits, the row maximum and sum of exponentials
are all-reduced, the padded vocabulary rows (beyond the tokenizer's) are -inf. The hidden states
enter through megatron's copy-to-TP region, so their gradient is summed over the vocabulary
shards in backward, as megatron's own output layer does.

:class:`Logits` (megatron's path: full logits, then ``vocab_parallel_cross_entropy``) and
:class:`HiddenStates` (the chunked path) answer the same question, ``token_logprobs(rows, targets,
temperature)``, so every loss is written once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


def unwrap(model):
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


@dataclass(frozen=True)
class OutputHead:
    """The last stage's output layer, as the chunked log-prob path uses it."""

    weight: torch.nn.Parameter  # [V/TP, h]: this rank's vocabulary shard (tied: the embedding)
    vocab_start: int  # the shard's first vocabulary row
    vocab_size: int  # the tokenizer's vocabulary; rows beyond it are padding
    chunk_rows: int

    @classmethod
    def of(cls, model) -> Optional["OutputHead"]:
        """The head of a last-stage model built with ``logit_chunk_rows`` > 0, else None."""
        from megatron.core import parallel_state as ps

        model = unwrap(model)
        chunk_rows = getattr(model, "logit_chunk_rows", 0)
        if not chunk_rows or not model.post_process:
            return None
        if model.share_embeddings_and_output_weights:
            weight = model.shared_embedding_or_output_weight()
        else:
            weight = model.output_layer.weight
        start = weight.shape[0] * ps.get_tensor_model_parallel_rank()
        return cls(weight, start, model.architecture.vocab_size, chunk_rows)

    def logprobs(self, hidden: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """hidden [N, h], targets [N] -> fp32 log softmax(hidden . W^T / T)[target], [N]."""
        return _ChunkedLogprobs.apply(hidden, self.weight, targets, self, float(temperature))

    # --- pieces shared by forward and backward ---------------------------------------------
    def chunk_logits(self, hidden: torch.Tensor, weight: torch.Tensor, temperature: float) -> torch.Tensor:
        """fp32 [rows, V/TP] logits / T of this shard, padded vocabulary at -inf."""
        logits = torch.matmul(hidden, weight.t()).float()
        if temperature != 1.0:
            logits.div_(temperature)
        padded_from = self.vocab_size - self.vocab_start
        if padded_from < logits.shape[-1]:
            logits[:, max(padded_from, 0):] = float("-inf")
        return logits

    def local_targets(self, targets: torch.Tensor, local_vocab: int):
        """(index into this shard [N], whether this shard owns the target [N])."""
        local = targets - self.vocab_start
        owned = (local >= 0) & (local < local_vocab)
        return local.clamp(0, local_vocab - 1), owned


def _tp_all_reduce(tensor: torch.Tensor, op) -> torch.Tensor:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if ps.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(tensor, op=op, group=ps.get_tensor_model_parallel_group())
    return tensor


class _ChunkedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, head: OutputHead, temperature: float):
        import torch.distributed as dist

        N = hidden.shape[0]
        local_vocab = weight.shape[0]
        index, owned = head.local_targets(targets, local_vocab)
        logprobs = torch.empty(N, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(N, dtype=torch.float32, device=hidden.device)
        for start in range(0, N, head.chunk_rows):
            rows = slice(start, min(start + head.chunk_rows, N))
            logits = head.chunk_logits(hidden[rows], weight, temperature)
            row_max = _tp_all_reduce(logits.max(dim=-1).values, dist.ReduceOp.MAX)
            logits.sub_(row_max[:, None])
            target = logits.gather(1, index[rows, None])[:, 0].masked_fill_(~owned[rows], 0.0)
            stats = torch.stack([logits.exp_().sum(dim=-1), target])
            sum_exp, target = _tp_all_reduce(stats, dist.ReduceOp.SUM)
            log_sum_exp = sum_exp.log()
            logprobs[rows] = target - log_sum_exp
            lse[rows] = log_sum_exp + row_max
        ctx.save_for_backward(hidden, weight, index, owned, lse)
        ctx.head, ctx.temperature = head, temperature
        return logprobs

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, index, owned, lse = ctx.saved_tensors
        head, temperature = ctx.head, ctx.temperature
        N = hidden.shape[0]
        d_hidden = torch.empty_like(hidden)
        d_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        grad = grad.float()
        for start in range(0, N, head.chunk_rows):
            rows = slice(start, min(start + head.chunk_rows, N))
            # d logprob / d logits = onehot(target) - softmax, times d logits / d (h.W) = 1 / T
            d_logits = head.chunk_logits(hidden[rows], weight, temperature)
            d_logits.sub_(lse[rows, None]).exp_().mul_(-grad[rows, None])
            # + grad at the target, on the shard that owns it (elsewhere + 0 at a clamped index):
            # no data-dependent shapes, nothing read back to the host
            d_logits.scatter_add_(1, index[rows, None], (grad[rows] * owned[rows])[:, None])
            if temperature != 1.0:
                d_logits.div_(temperature)
            d_logits = d_logits.to(weight.dtype)
            d_hidden[rows] = torch.matmul(d_logits, weight)
            if d_weight.dtype == d_logits.dtype:
                d_weight.addmm_(d_logits.t(), hidden[rows])
            else:  # low-precision weights: accumulate the chunks' products in fp32
                d_weight.add_(torch.matmul(d_logits.t(), hidden[rows]))
        return d_hidden, d_weight.to(weight.dtype), None, None, None


class Logits:
    """Full vocab-parallel logits [B, S, V/TP] (megatron's output layer ran on every row)."""

    def __init__(self, logits: torch.Tensor):
        self.logits = logits

    def token_logprobs(self, rows: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """rows [N] sequence rows, targets [B, N] -> fp32 [B, N] log-probs at temperature T."""
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        selected = self.logits.index_select(1, rows.to(self.logits.device))  # a tensor of our own
        if temperature != 1.0:
            selected = selected.div_(temperature)
        # megatron computes the softmax in its input buffer: ``selected`` is consumed
        return -vocab_parallel_cross_entropy(selected, targets.to(selected.device))


class HiddenStates:
    """Final hidden states [B, S, h] and the head that turns rows of them into log-probs."""

    def __init__(self, hidden: torch.Tensor, head: OutputHead):
        self.hidden, self.head = hidden, head

    def token_logprobs(self, rows: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        B, N = targets.shape
        selected = self.hidden.index_select(1, rows.to(self.hidden.device)).reshape(B * N, -1)
        return self.head.logprobs(selected, targets.reshape(-1).to(selected.device), temperature).view(B, N)


def model_output(output: torch.Tensor, model):
    """The last stage's output tensor as :class:`HiddenStates` when the model hands back hidden
    states (``logit_chunk_rows`` > 0), else as :class:`Logits`."""
    head = OutputHead.of(model)
    return Logits(output) if head is None else HiddenStates(output, head)
