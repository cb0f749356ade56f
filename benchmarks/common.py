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
    setting in megatron's DDP with distributed Adam, and the frozen feature network; one real chunk of
    Python source (the standard library's argparse module). ``sft_step`` and ``ebft_step`` each run
    one optimizer step and return their wall time by phase."""

    def __init__(self, layout, recompute: str = "selective", random_weights: bool = False,
                 attention: str = "fused", logit_chunk_rows: int = 1024):
        import torch

        from ebft_megatron import assets
        from ebft_megatron.checkpoint import store
        from ebft_megatron.config import OptimizerSettings
        from ebft_megatron.data.tokenizers import Tokenizer
        from ebft_megatron.features.network import build_feature_network, load_feature_network, truncate
        from ebft_megatron.models.gpt import build_model
        from ebft_megatron.objective.loss import LossSettings
        from ebft_megatron.objective.rewards import RewardSettings
        from ebft_megatron.rollouts.sampler import SamplingSettings, rollout_generator
        from ebft_megatron.runtime import distributed
        from ebft_megatron.training.loop import _policy_config_overrides
        from ebft_megatron.training.optimizer import build_optimizer, wrap_ddp
        from ebft_megatron.training.step import MicroBatch

        distributed.initialize(1, 1, seed=43)
        self.layout = layout
        ckpt = assets.smollm2_checkpoint()
        self.arch = arch = store.architecture_of(ckpt)
        self.policy = build_model(arch, block_attention=attention, logit_chunk_rows=logit_chunk_rows,
                                  **_policy_config_overrides(recompute))
        if random_weights:
            self.features = build_feature_network(arch, arch.default_feature_layers(), block_attention=attention)
            truncate(self.features)
        else:
            store.load_model_weights(self.policy, ckpt)
            self.features = load_feature_network(ckpt, block_attention=attention)
        self.ddp = wrap_ddp(self.policy)
        self.optimizer = build_optimizer(self.ddp, OptimizerSettings(lr=1e-6))
        tokens = Tokenizer(ckpt / "tokenizer").encode((assets.python_stdlib_dir() / "argparse.py").read_text())
        chunk = torch.tensor(tokens[: layout.chunk_len])[None]
        self.batch = MicroBatch(chunk, torch.tensor([layout.chunk_len]))
        self.sampling, self.rewards = SamplingSettings(0.6, 1.0), RewardSettings(1.0, 0.5, True)
        self.loss_settings = LossSettings(1.0, 0.03, 0.6)
        self.generator = rollout_generator(43, 0)

    def _zero_grad(self):
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()

    def sft_step(self) -> dict[str, float]:
        from ebft_megatron.training.step import forward_backward

        self._zero_grad()
        started = time.perf_counter()
        forward_backward(self.ddp, [self.batch], self.layout, self.loss_settings, mode="sft")
        t0 = time.perf_counter()
        self.optimizer.step()
        done = time.perf_counter()
        return {"policy_forward_backward": t0 - started, "optimizer": done - t0, "total": done - started}

    def ebft_step(self) -> dict[str, float]:
        import ebft_megatron.training.step as step_module

        phases = {}
        self._zero_grad()
        started = time.perf_counter()
        original_embed, original_sample = step_module.embed, step_module.sample_rollouts

        def timed(name, function):
            def run(*a, **k):
                t0 = time.perf_counter()
                result = function(*a, **k)
                phases[name] = phases.get(name, 0.0) + time.perf_counter() - t0
                return result
            return run

        step_module.embed, step_module.sample_rollouts = timed("features", original_embed), timed("rollouts", original_sample)
        try:
            experience = step_module.make_experience(self.ddp, self.features, self.layout, self.batch,
                                                     self.arch.vocab_size, self.sampling, self.rewards, "last_token",
                                                     self.generator)
        finally:
            step_module.embed, step_module.sample_rollouts = original_embed, original_sample
        t0 = time.perf_counter()
        step_module.forward_backward(self.ddp, [experience], self.layout, self.loss_settings, mode="ebft")
        phases["policy_forward_backward"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.optimizer.step()
        phases["optimizer"] = time.perf_counter() - t0
        phases["total"] = time.perf_counter() - started
        phases["rewards_and_other"] = phases["total"] - sum(v for k, v in phases.items() if k != "total")
        return phases
