"""A FLOP model of SFT and EBFT steps (multiply-add = 2 FLOPs), for benchmarks and MFU.

Counted: the linear layers per token, attention per query-key pair (QK^T and PV), and the LM head
per row whose logits are computed. Backward = 2x forward. Norms, rotary, softmax and sampling
are left out (small next to these). Per chunk of P tokens; EBFT with the block layout's n, NB, G.

Three ways to run an EBFT step are modelled:
- ``reference``: the authors' code. n copies of the chunk; generation by G full forwards of the
  growing sequence (dense attention, logits for the NB sampled rows); the feature network runs the
  whole model over each copy's chunk + NB*G tokens with dense attention; the policy forward and
  backward run over each copy, with gradient checkpointing (one more forward).
- ``ours_dense``: KV-cached rollouts (one prefill, G-1 decode steps of n*NB tokens), then the chunk
  once + all n*NB*G rollout tokens packed into one sequence for the (truncated) feature network and
  the policy; attention computes every pair of the packed sequence (a dense mask).
- ``ours``: the same with real-pair attention: causal on the chunk, and each rollout token against
  its prefix x[:a_b] and its own earlier tokens only.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CostModel:
    per_token_linear: float  # forward FLOPs of the linear layers per token, all layers
    per_pair: float  # forward FLOPs per attention query-key pair, all layers
    lm_head: float  # forward FLOPs per LM-head row
    num_layers: int

    @classmethod
    def of(cls, arch) -> "CostModel":
        h, L = arch.hidden_size, arch.num_layers
        kv = arch.num_query_groups * arch.head_dim
        q = arch.num_attention_heads * arch.head_dim
        mlp = 3 * h * arch.ffn_hidden_size
        if arch.is_moe:  # a token's chosen experts, and the router's logits
            mlp = arch.experts_per_token * mlp + arch.num_experts * h
        per_layer = h * (q + 2 * kv) + q * h + mlp
        return cls(2 * L * per_layer, 4 * L * arch.num_attention_heads * arch.head_dim, 2 * h * arch.vocab_size, L)

    def forward(self, tokens, pairs, lm_rows, layers=None) -> float:
        share = (layers or self.num_layers) / self.num_layers
        return share * (tokens * self.per_token_linear + pairs * self.per_pair) + lm_rows * self.lm_head


def causal_pairs(length: int) -> int:
    return length * (length + 1) // 2


def real_pairs(layout) -> int:
    """Query-key pairs of the packed sequence that the block structure allows."""
    G, n = layout.rollout_len, layout.num_samples
    rollout = sum(n * (G * a + causal_pairs(G)) for a in layout.anchors)
    return causal_pairs(layout.chunk_len) + rollout


def sft_step(cost: CostModel, chunk_len: int, recompute_forward: bool = False) -> float:
    forward = cost.forward(chunk_len, causal_pairs(chunk_len), chunk_len)
    return forward * (4 if recompute_forward else 3)


def rollout_flops(cost: CostModel, layout, method: str) -> float:
    P, NB, n, G = layout.chunk_len, layout.num_blocks, layout.num_samples, layout.rollout_len
    anchors = layout.anchors
    if method == "reference":
        return n * sum(cost.forward(P + t * NB, (P + t * NB) ** 2, NB) for t in range(G))
    total = cost.forward(P, causal_pairs(P), NB)
    for t in range(1, G):
        pairs = n * NB * (P + t) if method == "ours_dense" else n * sum(a + t for a in anchors)
        total += cost.forward(n * NB, pairs, n * NB)
    return total


def ebft_step(cost: CostModel, layout, method: str, feature_layers: int) -> dict:
    """FLOPs of one EBFT step per chunk, by phase."""
    P, NB, n, G = layout.chunk_len, layout.num_blocks, layout.num_samples, layout.rollout_len
    if method == "reference":
        length = P + NB * G
        features = n * cost.forward(length, length ** 2, 0)  # the whole model, every copy
        policy = n * 4 * cost.forward(length, length ** 2, length)  # fwd + bwd + checkpoint recompute
    else:
        length = layout.packed_len
        pairs = length ** 2 if method == "ours_dense" else real_pairs(layout)
        features = cost.forward(length, pairs, 0, layers=feature_layers)
        policy = 3 * cost.forward(length, pairs, length)
    phases = {"rollouts": rollout_flops(cost, layout, method), "features": features, "policy": policy}
    phases["total"] = sum(phases.values())
    return phases
