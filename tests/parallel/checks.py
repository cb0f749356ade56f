"""Multi-process checks, grouped into one torchrun launch (imports cost ~10-15 s per launch).

    torchrun --nproc_per_node=4 tests/parallel/checks.py --models DIR --out results.json

With 4 processes the same run covers TP1 (x DP4), TP2 (x DP2), PP2 (x DP2) and TP2xPP2: the
parallel groups are rebuilt between layouts. Every rank computes; rank 0 writes the figures that
tests/parallel/test_parallel.py asserts on.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]
ROLLOUT_LAYOUTS = [(24, 4, 4, 4, 3), (20, 4, 2, 4, 2)]  # (P, C, s, G, n); the second has s < G


def max_diff(a, b) -> float:
    return float((a - b).abs().max())


def check_logits(models_dir: Path, families, tokens) -> dict:
    import torch

    from ebft_megatron.checkpoint import store
    from ebft_megatron.models.gpt import build_model
    from ebft_megatron.models import gpt
    from ebft_megatron.runtime import pipeline
    from tests.fixtures import hf_logits

    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    out = {}
    for family in families:
        ckpt = models_dir / f"{family}-mcore"
        arch = store.architecture_of(ckpt)
        model = build_model(arch)
        store.load_model_weights(model, ckpt)
        ours = gpt.forward(model, tokens, positions,
                                reduce=lambda o: pipeline.gather_vocab_parallel(o)[..., : arch.vocab_size])
        out[family] = max_diff(ours, hf_logits(models_dir / f"{family}-hf", tokens))
    return out


def check_packed_and_rollouts(models_dir: Path, family: str = "qwen2") -> dict:
    """The packed forward equals separate causal forwards, and the KV-cached rollout engine's logits
    and tokens equal independent generation of each block with the same random numbers."""
    import torch

    from ebft_megatron.checkpoint import store
    from ebft_megatron.models.attention import BlockAttentionParams
    from ebft_megatron.models.gpt import build_model
    from ebft_megatron.block_layout import BlockLayout
    from ebft_megatron.rollouts.sampler import SamplingSettings, sample_rollouts
    from ebft_megatron.models import gpt
    from ebft_megatron.runtime import pipeline

    ckpt = models_dir / f"{family}-mcore"
    arch = store.architecture_of(ckpt)
    model = build_model(arch)
    store.load_model_weights(model, ckpt)
    V = arch.vocab_size
    logits_of = lambda o: pipeline.gather_vocab_parallel(o)[..., :V]  # noqa: E731

    def separate(seq):
        L = seq.shape[1]
        return gpt.forward(model, seq, torch.arange(L).expand(seq.shape[0], L), reduce=logits_of)

    result = {"packed_vs_separate": 0.0, "packed_chunk_vs_causal": 0.0, "rollout_logits": 0.0,
              "rollout_tokens_equal": True}
    for P, C, s, G, n in ROLLOUT_LAYOUTS:
        layout = BlockLayout(P, C, s, G, n)
        gen = torch.Generator().manual_seed(P * 31 + s)
        chunk = torch.randint(0, V, (2, P), generator=gen)
        rollouts = torch.randint(0, V, (2, layout.num_blocks, n, G), generator=gen)
        packed = gpt.forward(
            model, layout.pack(chunk, rollouts), layout.position_ids.expand(2, -1),
            block_params=BlockAttentionParams(layout=layout, mode="packed"), reduce=logits_of)
        result["packed_chunk_vs_causal"] = max(result["packed_chunk_vs_causal"],
                                               max_diff(packed[:, :P], separate(chunk)))
        uniforms = torch.rand(2, layout.num_blocks, n, G, generator=gen)
        engine = sample_rollouts(model, layout, chunk, V, SamplingSettings(1.0, 1.0), uniforms=uniforms,
                                 return_logits=True)
        for b, anchor in enumerate(layout.anchor_positions.tolist()):
            for i in range(n):
                # packed forward == an ordinary causal forward of x[:a_b] + this rollout
                start = layout.rollout_index(b, i, 0)
                ref = separate(torch.cat([chunk[:, :anchor], rollouts[:, b, i]], dim=1))
                result["packed_vs_separate"] = max(result["packed_vs_separate"],
                                                   max_diff(packed[:, start:start + G], ref[:, anchor:]))
                # engine logits == independent generation of this block, same random numbers
                ref = separate(torch.cat([chunk[:, :anchor], engine.tokens[:, b, i]], dim=1))
                result["rollout_logits"] = max(result["rollout_logits"],
                                               max_diff(engine.logits[:, b, i], ref[:, anchor - 1:anchor - 1 + G]))
                expect = torch.stack([
                    torch.searchsorted(torch.softmax(ref[:, anchor - 1 + t], -1).cumsum(-1),
                                       uniforms[:, b, i, t, None] * 1.0, right=True)[:, 0]
                    for t in range(G)], dim=-1)
                result["rollout_tokens_equal"] &= bool(torch.equal(expect, engine.tokens[:, b, i]))
    return result


def check_dp_sampling(models_dir: Path, seed: int) -> dict:
    """Each DP rank samples its own chunks, reproducibly from the seed."""
    import torch
    import torch.distributed as dist

    from ebft_megatron.checkpoint import store
    from ebft_megatron.models.gpt import build_model
    from ebft_megatron.block_layout import BlockLayout
    from ebft_megatron.rollouts.sampler import SamplingSettings, rollout_generator, sample_rollouts
    from ebft_megatron.runtime import distributed

    info = distributed.parallel_info()
    ckpt = models_dir / "qwen2-mcore"
    arch = store.architecture_of(ckpt)
    model = build_model(arch)
    store.load_model_weights(model, ckpt)
    layout = BlockLayout(24, 4, 4, 4, 2)
    chunk = torch.randint(0, arch.vocab_size, (1, 24), generator=torch.Generator().manual_seed(7))
    runs = [sample_rollouts(model, layout, chunk, arch.vocab_size, SamplingSettings(1.0, 1.0),
                            rollout_generator(seed, info.dp_rank)).tokens for _ in range(2)]
    gathered = [torch.zeros_like(runs[0]) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, runs[0])
    dp_ranks = [torch.zeros(1, dtype=torch.long) for _ in range(dist.get_world_size())]
    dist.all_gather(dp_ranks, torch.tensor([info.dp_rank]))
    by_dp = {}
    for tokens, dp_rank in zip(gathered, dp_ranks):
        by_dp.setdefault(int(dp_rank), []).append(tokens)
    same_within_dp = all(all(torch.equal(t, ts[0]) for t in ts) for ts in by_dp.values())
    firsts = [ts[0] for ts in by_dp.values()]
    differ_across_dp = len(firsts) < 2 or not all(torch.equal(firsts[0], t) for t in firsts[1:])
    return {"reproducible": bool(torch.equal(runs[0], runs[1])), "same_within_model_parallel_group": same_within_dp,
            "differ_across_dp": differ_across_dp, "dp_size": info.dp_size}


def full_grads(model, tied: bool) -> dict:
    """Every parameter's gradient as a full (unsharded) tensor, keyed by its TP1/PP1/EP1 name, on
    every rank: TP shards all-gathered (SwiGLU fc1 shards are [gate_r; up_r]; an expert's over its
    expert-TP group), a mixture of experts' local experts gathered over EP and named by their
    global index, PP stages merged."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    rename = {f"decoder.layers.{i}.": f"decoder.layers.{layer.layer_number - 1}."
              for i, layer in enumerate(model.decoder.layers)}
    out, experts = {}, {}
    for name, param in model.named_parameters():
        if not param.requires_grad:  # frozen (LoRA's base weights)
            continue
        grad = (param.main_grad if getattr(param, "main_grad", None) is not None else param.grad).detach().float()
        expert = ".local_experts." in name
        group = ps.get_expert_tensor_parallel_group() if expert else ps.get_tensor_model_parallel_group()
        tp = dist.get_world_size(group)
        if getattr(param, "tensor_model_parallel", False) and tp > 1:
            parts = [torch.empty_like(grad) for _ in range(tp)]
            dist.all_gather(parts, grad.contiguous(), group=group)
            if "linear_fc1." in name:  # not LoRA's fc1 B, kept [2, ffn/tp, r] and cut along ffn
                halves = [part.chunk(2, dim=0) for part in parts]
                grad = torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
            else:
                grad = torch.cat(parts, dim=param.partition_dim)
        for local, global_name in rename.items():
            if name.startswith(local):
                name = global_name + name[len(local):]
                break
        if tied and name == "output_layer.weight":
            name = "embedding.word_embeddings.weight"
        (experts if expert else out)[name] = grad.clone()
    if experts:
        ep, ep_rank = ps.get_expert_model_parallel_world_size(), ps.get_expert_model_parallel_rank()
        local_count = model.config.num_moe_experts // ep
        ranks = [None] * ep
        dist.all_gather_object(ranks, (ep_rank, experts), group=ps.get_expert_model_parallel_group())
        for rank, named in ranks:
            for name, grad in named.items():
                head, _, tail = name.partition(".local_experts.")
                index, _, rest = tail.partition(".")
                out[f"{head}.local_experts.{rank * local_count + int(index)}.{rest}"] = grad
    if ps.get_pipeline_model_parallel_world_size() > 1:
        stages = [None] * ps.get_pipeline_model_parallel_world_size()
        dist.all_gather_object(stages, out, group=ps.get_pipeline_model_parallel_group())
        out = {}
        for stage in stages:
            for name, grad in stage.items():
                out.setdefault(name, grad)
    return out


_OBJECTIVE_REFERENCE: dict = {}


def check_objective(models_dir: Path, name: str) -> dict:
    """Features -> rewards -> packed EBFT loss -> gradients (2 micro-batches through megatron's
    schedule and DDP), compared with the first layout run (TP1). Tied embeddings (llama) so that
    PP has to all-reduce the embedding gradient between the first and last stage."""
    import torch

    from ebft_megatron.checkpoint import store
    from ebft_megatron.features.network import embed, load_feature_network, select_rows
    from ebft_megatron.models.gpt import build_model
    from ebft_megatron.objective.loss import LossSettings
    from ebft_megatron.objective.rewards import RewardSettings, block_rewards, reward_metrics
    from ebft_megatron.block_layout import BlockLayout
    from ebft_megatron.objective.objectives import EBFT, Batch, Experience
    from ebft_megatron.rollouts.sampler import SamplingSettings
    from ebft_megatron.training.optimizer import wrap_ddp
    from ebft_megatron.training.step import forward_backward

    ckpt = models_dir / "llama-mcore"
    arch = store.architecture_of(ckpt)
    policy = build_model(arch)
    store.load_model_weights(policy, ckpt)
    ddp = wrap_ddp(policy, use_distributed_optimizer=False)
    features = load_feature_network(ckpt, (1, 3))
    layout = BlockLayout(24, 4, 4, 4, 3)
    gen = torch.Generator().manual_seed(77)
    chunk = torch.randint(0, arch.vocab_size, (2, 24), generator=gen)
    rollouts = torch.randint(0, arch.vocab_size, (2, layout.num_blocks, 3, 4), generator=gen)
    lengths = torch.tensor([24, 21])
    moments = embed(features, layout, layout.pack(chunk, rollouts), "last_token")
    settings = RewardSettings(1.0, 0.5, whiten=True)
    rewards = block_rewards(moments.coordinates, settings, layout.valid_blocks(lengths))
    metrics = reward_metrics(rewards, moments.gram, settings)
    micro = [Experience(Batch(chunk[i:i + 1], lengths[i:i + 1]), rollouts[i:i + 1], rewards.advantage[i:i + 1])
             for i in range(2)]
    objective = EBFT(layout, arch.vocab_size, SamplingSettings(0.7, 1.0),
                     LossSettings(rl_coef=1.0, ce_coef=0.1, temperature=0.7), None, features, settings, "last_token")
    ddp.zero_grad_buffer()
    terms = forward_backward(ddp, micro, objective)
    grads = full_grads(policy, arch.tie_word_embeddings)
    current = {"gram": moments.gram, "advantage": rewards.advantage, "loss": torch.tensor(terms["loss"]),
               "cfm": metrics["cfm"].clone(), **{f"grad/{k}": v for k, v in grads.items()}}
    if not _OBJECTIVE_REFERENCE:
        _OBJECTIVE_REFERENCE.update(current)
    ref = _OBJECTIVE_REFERENCE
    grad_rel = max(float((current[k] - ref[k]).abs().max() / ref[k].abs().max().clamp_min(1e-6))
                   for k in ref if k.startswith("grad/"))
    # sequence-parallel row selection: each TP rank holds a slice of the rows
    from megatron.core import parallel_state as ps

    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    full = torch.arange(8 * 2 * 3, dtype=torch.float32).view(8, 2, 3)
    rows = torch.tensor([6, 0, 5, 3])
    local = full.chunk(tp, dim=0)[rank] if tp > 1 else full
    return {
        "gram_max_diff": max_diff(current["gram"], ref["gram"]),
        "advantage_max_diff": max_diff(current["advantage"], ref["advantage"]),
        "loss": terms["loss"], "loss_diff": abs(terms["loss"] - float(ref["loss"])),
        "cfm_diff": abs(float(metrics["cfm"]) - float(ref["cfm"])),
        "grad_names": sorted(k for k in current if k.startswith("grad/")) == sorted(k for k in ref if k.startswith("grad/")),
        "grad_max_rel_diff": grad_rel,
        "grad_count": sum(k.startswith("grad/") for k in current),
        "sequence_parallel_rows_equal": bool(torch.equal(select_rows(local, rows, 8), full[rows])),
    }


def packed_ebft_step(ddp, vocab_size: int, seed: int) -> dict:
    """One EBFT forward/backward (2 micro-batches, megatron's schedule) of random chunks, rollouts and
    advantages drawn from ``seed`` (the same on every rank), on the first rollout layout."""
    import torch

    from ebft_megatron.objective.loss import LossSettings
    from ebft_megatron.objective.objectives import EBFT, Batch, Experience
    from ebft_megatron.objective.rewards import RewardSettings
    from ebft_megatron.block_layout import BlockLayout
    from ebft_megatron.rollouts.sampler import SamplingSettings
    from ebft_megatron.training.step import forward_backward

    layout = BlockLayout(*ROLLOUT_LAYOUTS[0])
    P, NB, n, G = layout.chunk_len, layout.num_blocks, layout.num_samples, layout.rollout_len
    gen = torch.Generator().manual_seed(seed)
    chunk = torch.randint(0, vocab_size, (2, P), generator=gen)
    rollouts = torch.randint(0, vocab_size, (2, NB, n, G), generator=gen)
    advantages = torch.randn(2, NB, n, generator=gen, dtype=torch.float64)
    lengths = torch.tensor([P, P - 3])
    micro = [Experience(Batch(chunk[i:i + 1], lengths[i:i + 1]), rollouts[i:i + 1], advantages[i:i + 1])
             for i in range(2)]
    objective = EBFT(layout, vocab_size, SamplingSettings(0.7, 1.0), LossSettings(1.0, 0.1, 0.7), None, None,
                     RewardSettings(1.0, 0.5, True), "last_token")
    ddp.zero_grad_buffer()
    return forward_backward(ddp, micro, objective)


_QK_NORM_REFERENCE: dict = {}


def check_qk_norm_gradients(models_dir: Path) -> dict:
    """Qwen3 (q/k norms, head_dim != hidden/heads): packed EBFT loss and every parameter's gradient
    (2 micro-batches, DDP) against the first layout run (TP1). A TP rank normalises only its own
    heads, so the replicated q/k norm weights get partial gradients that must be summed over TP."""
    import torch

    from ebft_megatron.checkpoint import store
    from ebft_megatron.models.gpt import build_model
    from ebft_megatron.training.optimizer import wrap_ddp

    ckpt = models_dir / "qwen3-mcore"
    arch = store.architecture_of(ckpt)
    policy = build_model(arch)
    store.load_model_weights(policy, ckpt)
    ddp = wrap_ddp(policy, use_distributed_optimizer=False)
    terms = packed_ebft_step(ddp, arch.vocab_size, seed=31)
    grads = full_grads(policy, arch.tie_word_embeddings)
    current = {"loss": torch.tensor(terms["loss"]), **grads}
    if not _QK_NORM_REFERENCE:
        _QK_NORM_REFERENCE.update(current)
    ref = _QK_NORM_REFERENCE

    def rel(names):
        return max(float((current[k] - ref[k]).abs().max() / ref[k].abs().max().clamp_min(1e-6)) for k in names)

    norms = [k for k in ref if "q_layernorm" in k or "k_layernorm" in k]
    return {"loss_diff": abs(terms["loss"] - float(ref["loss"])),
            "grad_names": sorted(current) == sorted(ref), "qk_norm_grads": len(norms),
            "qk_norm_grad_max_rel_diff": rel(norms), "grad_max_rel_diff": rel([k for k in ref if k != "loss"])}


_LORA_REFERENCE: dict = {}


def check_lora(models_dir: Path, family: str) -> dict:
    """LoRA on every target with nonzero B (the full A and B drawn from one seed on every rank,
    then sharded): packed EBFT loss, the adapters' gradients (gathered to full size) and the
    clipped-gradient norm (2 micro-batches, DDP) against the first layout run (TP1); DDP buffers
    only the adapters. Qwen3: GQA qkv rows and q/k norms between the qkv adapter and attention;
    Llama: a frozen tied embedding, which PP must leave out of its embedding all-reduce."""
    import torch

    from ebft_megatron.checkpoint import store
    from ebft_megatron.config import OptimizerSettings
    from ebft_megatron.models.gpt import build_model
    from ebft_megatron.models.lora import adapters, attach_adapters
    from ebft_megatron.training.optimizer import build_optimizer, wrap_ddp

    ckpt = models_dir / f"{family}-mcore"
    arch = store.architecture_of(ckpt)
    policy = build_model(arch)
    store.load_model_weights(policy, ckpt)
    attach_adapters(policy, rank=4, alpha=8.0)
    for module_name, adapter in adapters(policy):
        layer = int(module_name.split(".")[2])  # this stage's index; the global layer number is the seed
        number = policy.decoder.layers[layer].layer_number
        gen = torch.Generator().manual_seed(1000 * number + ord(adapter.target[-1]))
        shapes = adapter.full_shapes()
        adapter.set_full(torch.randn(shapes["lora_a"], generator=gen) * 0.2,
                         torch.randn(shapes["lora_b"], generator=gen) * 0.2)
    ddp = wrap_ddp(policy, use_distributed_optimizer=False)
    optimizer = build_optimizer(ddp, OptimizerSettings(distributed=False, clip_grad=1.0))
    terms = packed_ebft_step(ddp, arch.vocab_size, seed=41)
    buffered = sorted(name for name, p in policy.named_parameters() if getattr(p, "main_grad", None) is not None)
    grads = full_grads(policy, arch.tie_word_embeddings)
    optimizer.prepare_grads()
    current = {"loss": torch.tensor(terms["loss"]), "grad_norm": torch.tensor(float(optimizer.get_grad_norm())),
               **grads}
    ref = _LORA_REFERENCE.setdefault(family, current)
    names = [k for k in ref if k not in ("loss", "grad_norm")]
    return {"loss": terms["loss"], "loss_diff": abs(terms["loss"] - float(ref["loss"])),
            "grad_names": sorted(current) == sorted(ref), "grad_count": len(names),
            "grad_max_rel_diff": max(float((current[k] - ref[k]).abs().max() / ref[k].abs().max().clamp_min(1e-6))
                                     for k in names),
            "grad_norm": float(current["grad_norm"]),
            "grad_norm_rel_diff": abs(float(current["grad_norm"] / ref["grad_norm"]) - 1),
            "only_adapters_buffered": bool(buffered) and all("_lora." in name for name in buffered)}


def check_fused_paths(models_dir: Path) -> dict:
    """Fused block attention + output layer in row chunks against the generic attention + full
    logits, on the same model and batch in this layout: EBFT (s = G and s < G, with and without
    document masking) and SFT (with and without document masking). Loss and every parameter's
    gradient (2 micro-batches through megatron's schedule and DDP); figures are the maxima over
    all ranks."""
    import torch
    import torch.distributed as dist

    from ebft_megatron.checkpoint import store
    from ebft_megatron.models.gpt import build_model, set_block_attention
    from ebft_megatron.objective.loss import LossSettings
    from ebft_megatron.objective.objectives import EBFT, SFT, Batch, Experience
    from ebft_megatron.objective.rewards import RewardSettings
    from ebft_megatron.block_layout import BlockLayout
    from ebft_megatron.rollouts.sampler import SamplingSettings
    from ebft_megatron.training.optimizer import wrap_ddp
    from ebft_megatron.training.step import forward_backward

    result = {"loss_diff": 0.0, "grad_max_rel_diff": 0.0, "cases": 0, "grads_compared": 0}
    for family in ("llama", "qwen2"):  # tied and untied output layer
        ckpt = models_dir / f"{family}-mcore"
        arch = store.architecture_of(ckpt)
        policy = build_model(arch)
        store.load_model_weights(policy, ckpt)
        ddp = wrap_ddp(policy, use_distributed_optimizer=False)
        for shape in ROLLOUT_LAYOUTS:
            layout = BlockLayout(*shape)
            P, NB, n, G = layout.chunk_len, layout.num_blocks, layout.num_samples, layout.rollout_len
            gen = torch.Generator().manual_seed(P + NB)
            chunk = torch.randint(0, arch.vocab_size, (2, P), generator=gen)
            rollouts = torch.randint(0, arch.vocab_size, (2, NB, n, G), generator=gen)
            advantages = torch.randn(2, NB, n, generator=gen, dtype=torch.float64)
            lengths = torch.tensor([P, P - 3])
            doc_ids = torch.tensor([[0] * 5 + [1] * (P - 5), [0] * (P - 9) + [1] * 4 + [2] * 5])
            ebft = EBFT(layout, arch.vocab_size, SamplingSettings(0.7, 1.0), LossSettings(1.0, 0.1, 0.7), None, None,
                        RewardSettings(1.0, 0.5, True), "last_token")
            for objective in (ebft, SFT(layout)):
                for docs in (None, doc_ids):
                    micro = [Experience(Batch(chunk[i:i + 1], lengths[i:i + 1], None if docs is None else docs[i:i + 1]),
                                        rollouts[i:i + 1], advantages[i:i + 1]) for i in range(2)]
                    runs = []
                    for attention, chunk_rows in (("generic", 0), ("fused", 5)):
                        set_block_attention(policy, attention)
                        policy.logit_chunk_rows = chunk_rows
                        ddp.zero_grad_buffer()
                        terms = forward_backward(ddp, micro, objective)
                        grads = [p.main_grad.detach().clone() for p in policy.parameters() if p.requires_grad]
                        runs.append((terms["loss"], grads))
                    (reference_loss, reference), (loss, grads) = runs
                    rel = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-6)) for a, b in zip(grads, reference))
                    result["loss_diff"] = max(result["loss_diff"], abs(loss - reference_loss))
                    result["grad_max_rel_diff"] = max(result["grad_max_rel_diff"], rel)
                    result["grads_compared"] += len(grads)
                    result["cases"] += 1
        set_block_attention(policy, "fused")
    figures = torch.tensor([result["loss_diff"], result["grad_max_rel_diff"]], dtype=torch.float64)
    dist.all_reduce(figures, op=dist.ReduceOp.MAX)
    result["loss_diff"], result["grad_max_rel_diff"] = figures.tolist()
    return result


def check_replica_rewards() -> dict:
    """An RLVR reward that gives every rank different scores (as a program timing out on one rank
    and not another would) still gives every rank of a model replica the same advantages: it is
    scored once, on the replica's first rank. A reward that fails there stops every rank of the
    replica with an error instead of leaving them waiting."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from ebft_megatron.objective.loss import LossSettings
    from ebft_megatron.objective.objectives import RLVR, Batch
    from ebft_megatron.block_layout import BlockLayout
    from ebft_megatron.rollouts.sampling import SamplingSettings

    rank = dist.get_rank()
    layout = BlockLayout(16, 4, 4, 4, 3)
    gen = torch.Generator().manual_seed(5)
    chunk = torch.randint(0, 300, (2, 16), generator=gen)
    tokens = torch.randint(0, 300, (2, layout.num_blocks, 3, 4), generator=gen)
    calls = torch.zeros(1)

    def rank_dependent(chunk, rollout_tokens, layout):
        calls.add_(1)
        return torch.rand(rollout_tokens.shape[:-1], generator=torch.Generator().manual_seed(100 + rank))

    def failing(chunk, rollout_tokens, layout):
        raise ValueError("the sandbox is gone")

    def experience_with(reward):
        objective = RLVR(layout, 300, SamplingSettings(0.7, 1.0), LossSettings(1.0, 0.0, 0.7), None, reward)
        objective.rollouts = lambda batch, policy: tokens  # the scoring is what is checked here
        return objective.experience(Batch(chunk, torch.tensor([16, 16])), policy=None)

    advantages = experience_with(rank_dependent).advantages.contiguous()
    group = ps.get_model_parallel_group()
    size = dist.get_world_size(group)
    gathered = [torch.empty_like(advantages) for _ in range(size)]
    dist.all_gather(gathered, advantages, group=group)
    dist.all_reduce(calls, group=group)
    try:
        experience_with(failing)
        failure = "none"
    except Exception as err:
        failure = type(err).__name__
    failures = [None] * size
    dist.all_gather_object(failures, failure, group=group)
    return {"replica_size": size, "reward_calls": int(calls.item()),
            "advantage_spread": max(float((g - gathered[0]).abs().max()) for g in gathered),
            "advantage_abs": float(advantages.abs().max()), "failures": failures}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--only", default="", help="run only these checks (comma-separated), e.g. lora")
    args = parser.parse_args()

    from ebft_megatron.cli import quiet_imports

    quiet_imports()
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    import torch.distributed as dist

    from ebft_megatron.runtime import distributed

    models_dir = Path(args.models)
    families = json.loads((models_dir / "families.json").read_text())
    tokens = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    results = {}
    for tp, pp in LAYOUTS:
        distributed.initialize(tp, pp, seed=1234)
        name = f"tp{tp}pp{pp}"
        checks = {
            "logits_vs_hf": lambda: check_logits(models_dir, families, tokens),
            "packed": lambda: check_packed_and_rollouts(models_dir),
            "dp_sampling": lambda: check_dp_sampling(models_dir, seed=99),
            "objective": lambda: check_objective(models_dir, name),
            "qk_norm": lambda: check_qk_norm_gradients(models_dir),
            "fused_paths": lambda: check_fused_paths(models_dir),
            "replica_rewards": check_replica_rewards,
            "lora": lambda: check_lora(models_dir, "qwen3"),
            "lora_tied": lambda: check_lora(models_dir, "llama"),
        }
        only = [c for c in args.only.split(",") if c]
        results[name] = {}
        for check, run in checks.items():
            if only and check not in only:
                continue
            if check == "packed":  # its figures sit at the layout's top level
                results[name].update(run())
            else:
                results[name][check] = run()
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(results, indent=2))
    distributed.destroy()


if __name__ == "__main__":
    main()
