"""Mixture-of-experts checks across expert, tensor and pipeline parallelism, in one torchrun launch.

    torchrun --nproc_per_node=4 tests/parallel/moe_checks.py --models DIR --out results.json

With 4 processes the same run covers EP1 (x DP4), EP2 (x DP4; 2 experts per rank), TP2 x EP2 and
PP2 x EP2. At each layout the packed forward equals separate forwards and the rollout engine
equals independent generation through the MoE layers; then one SFT, one RLVR and one EBFT step (2 micro-batches each, megatron's
schedule and DDP, the router's load-balancing loss weighted in) of a tiny Qwen3-MoE: every rank
holds the same data and draws the same rollouts, so the steps must give the first layout's rollout
tokens, losses and gradients. Rank 0 writes the figures tests/parallel/test_moe_parallel.py
asserts on.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.parallel.checks import check_packed_and_rollouts, full_grads, max_diff  # noqa: E402

LAYOUTS = [(1, 1, 1), (1, 1, 2), (2, 1, 2), (1, 2, 2)]  # (tp, pp, ep)
AUX_LOSS_WEIGHT = 0.05  # large enough that a router gradient from the balancing loss shows in the comparison
_REFERENCE: dict = {}


def varied_reward(chunk, rollout_tokens, layout):
    """A verifiable reward that differs between rollouts (the tiny model rarely matches the ground
    truth), so that RLVR's policy-gradient term is in the comparison."""
    return (rollout_tokens % 7).float().mean(-1) / 6


def step_figures(ckpt: Path, mode: str) -> dict:
    """One step of ``mode`` on this layout: its rollout tokens, loss terms and full gradients."""
    import torch

    from ebft_megatron.block_layout import BlockLayout
    from ebft_megatron.checkpoint import store
    from ebft_megatron.features.network import load_feature_network
    from ebft_megatron.models.gpt import build_model
    from ebft_megatron.objective.loss import LossSettings
    from ebft_megatron.objective.objectives import EBFT, RLVR, SFT, Batch
    from ebft_megatron.objective.rewards import RewardSettings
    from ebft_megatron.objective.rlvr import resolve_reward
    from ebft_megatron.rollouts.sampling import SamplingSettings
    from ebft_megatron.training.optimizer import wrap_ddp
    from ebft_megatron.training.step import forward_backward

    arch = store.architecture_of(ckpt)
    policy = build_model(arch, moe_aux_loss_coeff=AUX_LOSS_WEIGHT)
    store.load_model_weights(policy, ckpt)
    ddp = wrap_ddp(policy, use_distributed_optimizer=False)
    # sft_odd: 23 tokens a micro-batch, which TP2 splits 12 + 11 between its ranks
    layout = BlockLayout(23, 3, 4, 4, 3) if mode == "sft_odd" else BlockLayout(24, 4, 4, 4, 3)
    data = torch.Generator().manual_seed(5)
    P = layout.chunk_len
    chunk = torch.randint(0, arch.vocab_size, (2, P), generator=data)
    lengths = torch.tensor([P, P - 3])
    batches = [Batch(chunk[i:i + 1], lengths[i:i + 1]) for i in range(2)]
    sampling = SamplingSettings(0.8, 1.0)
    losses = LossSettings(rl_coef=1.0, ce_coef=0.1, temperature=0.8)
    generator = torch.Generator().manual_seed(11)  # the same draws on every rank
    if mode in ("sft", "sft_odd"):
        objective = SFT(layout)
    elif mode == "rlvr":
        objective = RLVR(layout, arch.vocab_size, sampling, losses, generator, resolve_reward("tests.parallel.moe_checks:varied_reward"))
    else:
        features = load_feature_network(ckpt, (1, 3))
        objective = EBFT(layout, arch.vocab_size, sampling, losses, generator, features,
                         RewardSettings(1.0, 0.5, whiten=True), "last_token")
    experiences = objective.experiences(batches, ddp)
    ddp.zero_grad_buffer()
    terms = forward_backward(ddp, experiences, objective)
    tokens = [e.rollout_tokens for e in experiences if e.rollout_tokens is not None]
    return {"terms": terms, "tokens": torch.cat(tokens) if tokens else None,
            "grads": full_grads(policy, arch.tie_word_embeddings)}


def short_sequence_logits(models_dir: Path) -> float:
    """Max difference from transformers' logits of a forward of one token and of three (fewer
    tokens than, and not a multiple of, the TP ranks that share them out)."""
    import torch

    from ebft_megatron.checkpoint import store
    from ebft_megatron.models import gpt
    from ebft_megatron.models.gpt import build_model
    from ebft_megatron.runtime import pipeline
    from tests.fixtures import hf_logits

    ckpt = models_dir / "qwen3_moe-mcore"
    arch = store.architecture_of(ckpt)
    model = build_model(arch)
    store.load_model_weights(model, ckpt)
    worst = 0.0
    for length in (1, 3):
        tokens = torch.arange(length)[None] + 5
        ours = gpt.forward(model, tokens, torch.arange(length)[None],
                           reduce=lambda o: pipeline.gather_vocab_parallel(o)[..., : arch.vocab_size])
        worst = max(worst, max_diff(ours, hf_logits(models_dir / "qwen3_moe-hf", tokens)))
    return worst


def compare(mode: str, current: dict) -> dict:
    reference = _REFERENCE.setdefault(mode, current)
    grads, ref_grads = current["grads"], reference["grads"]
    same_names = sorted(grads) == sorted(ref_grads)
    rel = max(float((grads[k] - ref_grads[k]).abs().max() / ref_grads[k].abs().max().clamp_min(1e-6))
              for k in ref_grads if k in grads)
    tokens_equal = (current["tokens"] is None and reference["tokens"] is None) or bool(
        current["tokens"] is not None and reference["tokens"] is not None
        and current["tokens"].shape == reference["tokens"].shape and (current["tokens"] == reference["tokens"]).all())
    router = [k for k in grads if k.endswith("mlp.router.weight")]
    expert = [k for k in grads if ".local_experts." in k]
    return {
        "terms": current["terms"],
        "term_diff": max(abs(current["terms"][k] - reference["terms"][k]) for k in reference["terms"]),
        "same_terms": sorted(current["terms"]) == sorted(reference["terms"]),
        "grad_names_equal": same_names, "grad_max_rel_diff": rel, "tokens_equal": tokens_equal,
        "router_grads": len(router), "expert_grads": len(expert),
        "router_grad_max": max(float(grads[k].abs().max()) for k in router),
        "expert_grads_nonzero": sum(bool(grads[k].abs().max() > 0) for k in expert),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    from ebft_megatron.cli import quiet_imports

    quiet_imports()
    import warnings

    warnings.filterwarnings("ignore")
    import torch.distributed as dist

    from ebft_megatron.runtime import distributed

    ckpt = Path(args.models) / "qwen3_moe-mcore"
    results = {}
    for tp, pp, ep in LAYOUTS:
        distributed.initialize(tp, pp, seed=1234, ep=ep)
        name = f"tp{tp}pp{pp}ep{ep}"
        results[name] = {mode: compare(mode, step_figures(ckpt, mode)) for mode in ("sft", "sft_odd", "rlvr", "ebft")}
        results[name]["packed"] = check_packed_and_rollouts(Path(args.models), "qwen3_moe")
        results[name]["packed"]["short_sequence_logits_vs_hf"] = short_sequence_logits(Path(args.models))
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(results, indent=2))
    distributed.destroy()


if __name__ == "__main__":
    main()
