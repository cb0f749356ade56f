"""What the benchmarks share: the rollout-layout flags (defaults: the paper's code setting) and one
set-up of an SFT and an EBFT step as the trainer runs them."""

from __future__ import annotations

import time


def add_layout_arguments(parser, random_weights: bool = True) -> None:
    parser.add_argument("--chunk-len", type=int, default=1024, help="P (default 1024)")
    parser.add_argument("--first-anchor", type=int, default=8, help="C (default 8)")
    parser.add_argument("--stride", type=int, default=8, help="s (default 8)")
    parser.add_argument("--rollout-len", type=int, default=8, help="G (default 8)")
    parser.add_argument("--num-samples", type=int, default=4, help="n (default 4)")
    if random_weights:
        parser.add_argument("--random-weights", action="store_true", help="SmolLM2 shapes, random weights")


def layout_from(args):
    from ebft_megatron.rollouts.layout import BlockLayout

    return BlockLayout(args.chunk_len, args.first_anchor, args.stride, args.rollout_len, args.num_samples)


class StepBench:
    """SmolLM2-135M (fp32, one process) as the trainer builds it: the policy with the given recompute
    setting in megatron's DDP with distributed Adam, and the frozen feature network (with
    ``lora_rank`` > 0: LoRA adapters on a frozen policy that is its own feature network); one real chunk of
    Python source (the standard library's argparse module); the training config's defaults for
    everything else. ``sft_step`` and ``ebft_step`` each run one optimizer step and return its wall
    time by phase, as the trainer times them."""

    def __init__(self, layout, recompute: str = "selective", random_weights: bool = False,
                 attention: str = "fused", logit_chunk_rows: int = 1024, lora_rank: int = 0):
        import torch

        from ebft_megatron import assets
        from ebft_megatron.config import load_config
        from ebft_megatron.data.sources import python_stdlib_dir
        from ebft_megatron.features.network import build_feature_network, truncate
        from ebft_megatron.models.gpt import set_block_attention
        from ebft_megatron.objective.objectives import EBFT, SFT, Batch, ObjectiveContext
        from ebft_megatron.rollouts.sampler import rollout_generator
        from ebft_megatron.runtime.timing import PhaseTimer
        from ebft_megatron.training import builder

        self.layout = layout
        ckpt = assets.smollm2_checkpoint()
        r = layout
        config = load_config(None, [  # the training defaults for everything not set here
            f"model.load={ckpt}", f"model.recompute={recompute}", f"model.attention={attention}",
            f"model.logit_chunk_rows={logit_chunk_rows}", f"rollout.chunk_len={r.chunk_len}",
            f"rollout.first_anchor={r.first_anchor}", f"rollout.stride={r.stride}",
            f"rollout.rollout_len={r.rollout_len}", f"rollout.num_samples={r.num_samples}", "train.seed=43",
            f"lora.rank={lora_rank}"])
        builder.initialize(config)
        self.arch = arch = builder.architecture(config)
        self.policy = builder.policy(config, arch, load=not random_weights)
        if lora_rank:  # the policy with its adapters off, as the trainer does
            self.features = builder.feature_network(config, self.policy)
        elif random_weights:
            self.features = build_feature_network(arch, arch.default_feature_layers())
            truncate(self.features)
            set_block_attention(self.features, attention)
        else:
            self.features = builder.feature_network(config)
        self.ddp, self.optimizer = builder.optimizer(config, self.policy)
        tokens = builder.tokenizer(config, arch).encode((python_stdlib_dir() / "argparse.py").read_text())
        self.batch = Batch(torch.tensor(tokens[: layout.chunk_len])[None], torch.tensor([layout.chunk_len]))
        self.timer = PhaseTimer()
        context = ObjectiveContext(layout, arch.vocab_size, rollout_generator(43, 0), self.features, timer=self.timer)
        self.objectives = {"sft": SFT.from_config(config, context), "ebft": EBFT.from_config(config, context)}

    def step(self, mode: str) -> dict[str, float]:
        """One optimizer step of ``mode`` (sft or ebft) on the chunk: seconds by phase and total."""
        from ebft_megatron.training.step import forward_backward

        objective = self.objectives[mode]
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        self.timer.take()
        started = time.perf_counter()
        experience = objective.experience(self.batch, self.ddp)
        with self.timer.phase("forward_backward"):
            forward_backward(self.ddp, [experience], objective)
        with self.timer.phase("optimizer"):
            self.optimizer.step()
        return {**self.timer.take(), "total": time.perf_counter() - started}

    def sft_step(self) -> dict[str, float]:
        return self.step("sft")

    def ebft_step(self) -> dict[str, float]:
        return self.step("ebft")
