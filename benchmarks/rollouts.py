#!/usr/bin/env python
"""Rollout engine (KV cache, real-pair attention) vs the reference's full recompute, same run.

  python benchmarks/rollouts.py                       # P=1024, C=s=G=8, n=4, SmolLM2-135M, fp32
  python benchmarks/rollouts.py --random-weights      # same shapes, random weights: nothing downloaded
  python benchmarks/rollouts.py --random-weights --layers 4 --chunk-len 256   # a quick look
  python benchmarks/rollouts.py --random-weights --count   # also ops, kernels and host syncs by phase
  python benchmarks/rollouts.py --dtype bfloat16 --cuda-graphs off   # on a GPU: bf16, decode steps not replayed

The reference's method (reference §1.5): for each of the n sample copies, G full forwards of the chunk
plus all blocks' tokens so far, dense block mask, logits only at the rows that are sampled.
Ours: one prefill of the chunk (LM head on NB rows), then G-1 decode steps of n*NB tokens against
the cached prefix. Both draw from the same random numbers, so they must produce the same tokens
(checked and printed). The chunks are the standard library's source, tokenized with the model's
tokenizer, on the run's device (on CUDA the clock waits for the device). Prints tokens/s, the
ratio, peak RSS (and on CUDA torch's max allocated memory) and the FLOP-model ratio, and where our
engine's time went (prefill / decode forwards, their core attention and LM head, sampling), from a
run of its own before the timed ones (it warms them up): the phase clocks wait for the device at
every boundary, which would slow a timed run on CUDA. With --count, one generation (the first
chunk) of each method runs once more under a launch counter (ebft_megatron.runtime.launch_count;
without CUDA the whole run is under the device guard, so that the GPU path is counted): the ops
dispatched, device kernels and host syncs by phase (prefill, decode, the reference's full forwards,
sampling).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    add_count_argument, add_layout_arguments, add_model_arguments, count_on_the_gpu_path, device_clock, layout_from,
    model_checkpoint, peak_gpu_bytes, print_counts, text_tokens)


def flop_model(arch, layout, dense_decode: bool = False) -> dict:
    """Forward FLOPs (multiply-add = 2) of both methods: linear layers, attention pairs, LM head."""
    h, L = arch.hidden_size, arch.num_layers
    kv = arch.num_query_groups * arch.head_dim
    per_token_linear = 2 * L * (h * (h + 2 * kv) + h * h + 3 * h * arch.ffn_hidden_size)
    per_pair = 4 * L * arch.num_attention_heads * arch.head_dim
    lm_head = 2 * h * arch.vocab_size
    P, NB, n, G = layout.chunk_len, layout.num_blocks, layout.num_samples, layout.rollout_len
    anchors = list(layout.anchors)

    recompute = 0
    for t in range(G):
        S = P + t * NB
        recompute += S * per_token_linear + S * S * per_pair + NB * lm_head
    recompute *= n

    ours = P * per_token_linear + (P * (P + 1) // 2) * per_pair + NB * lm_head
    for t in range(1, G):
        ours += n * NB * per_token_linear + n * NB * lm_head
        if dense_decode:
            ours += n * NB * (P + t) * per_pair
        else:
            ours += n * sum(a + t for a in anchors) * per_pair
    return {"recompute": recompute, "ours": ours, "ratio": recompute / ours}


class EnginePhases:
    """Wall time of our engine by phase, in a run of its own.

    Wraps ``gpt.forward`` and ``sample_tokens`` as the sampler module sees them, and times the
    core attention and the LM head with forward hooks. Sampling runs inside a forward's reduce, so
    it is subtracted from that forward. Every clock read waits for the device (on CUDA: a
    synchronization, so that a phase's time is its kernels' and not their queueing; that also
    serializes host and device, hence a run of its own). On a CPU the wrappers and hooks cost
    microseconds per call (a few hundred calls per chunk), negligible against the seconds measured.
    """

    def __init__(self, model):
        self.model = model
        self.seconds = {"prefill": 0.0, "decode": 0.0, "sampling": 0.0,
                        "prefill_attention": 0.0, "decode_attention": 0.0, "lm_head": 0.0}

    def _timed_module(self, module, name_of):
        started = []

        def before(mod, args, kwargs):
            started.append(device_clock())

        def after(mod, args, kwargs, output):
            name = name_of(kwargs)
            if name is not None:
                self.seconds[name] += device_clock() - started.pop()
            else:
                started.pop()

        return [module.register_forward_pre_hook(before, with_kwargs=True),
                module.register_forward_hook(after, with_kwargs=True)]

    def __enter__(self):
        from ebft_megatron.models.attention import BlockAttentionParams
        from ebft_megatron.rollouts import sampler as sampler_module

        self._module = sampler_module
        self._forward, self._draw = sampler_module.gpt.forward, sampler_module.sample_tokens
        seconds = self.seconds

        def timed_forward(*args, block_params=None, **kwargs):
            start, sampled = device_clock(), seconds["sampling"]
            try:
                return self._forward(*args, block_params=block_params, **kwargs)
            finally:
                spent = device_clock() - start - (seconds["sampling"] - sampled)
                seconds[block_params.mode] = seconds.get(block_params.mode, 0.0) + spent

        def timed_draw(*args, **kwargs):
            start = device_clock()
            try:
                return self._draw(*args, **kwargs)
            finally:
                seconds["sampling"] += device_clock() - start

        def attention_phase(kwargs):
            params = kwargs.get("packed_seq_params")
            if isinstance(params, BlockAttentionParams) and params.mode in ("prefill", "decode"):
                return params.mode + "_attention"
            return None

        sampler_module.gpt.forward = timed_forward
        sampler_module.sample_tokens = timed_draw
        self._hooks = self._timed_module(self.model.output_layer, lambda kwargs: "lm_head")
        for layer in self.model.decoder.layers:
            self._hooks += self._timed_module(layer.self_attention.core_attention, attention_phase)
        return self

    def __exit__(self, *exc):
        self._module.gpt.forward, self._module.sample_tokens = self._forward, self._draw
        for hook in self._hooks:
            hook.remove()

    def summary(self, total: float) -> dict:
        s = self.seconds
        return {
            "total": total, "prefill_forward": s["prefill"], "decode_forwards": s["decode"], "sampling": s["sampling"],
            "other": total - s["prefill"] - s["decode"] - s["sampling"],
            "of_which_prefill_core_attention": s["prefill_attention"],
            "of_which_decode_core_attention": s["decode_attention"],
            "of_which_lm_head": s["lm_head"],
        }


class CountedPhases:
    """A launch counter's phases for rollout generations: each ``gpt.forward`` under its attention
    mode (prefill and decode; the reference's full recompute: full_forward), and sampling (inside a
    forward's reduce: the innermost phase, so not the forward's). Wraps ``gpt.forward`` and
    ``sample_tokens`` as the engine and the reference sampler see them."""

    PHASE_OF_MODE = {"prefill": "prefill", "decode": "decode", "dense": "full_forward"}

    def __init__(self, counter):
        self.counter = counter

    def __enter__(self):
        import reference_sampler

        from ebft_megatron.rollouts import sampler as sampler_module

        counter, forward, draw = self.counter, sampler_module.gpt.forward, sampler_module.sample_tokens
        self._saved = [(sampler_module.gpt, "forward", forward), (sampler_module, "sample_tokens", draw),
                       (reference_sampler, "sample_tokens", reference_sampler.sample_tokens)]

        def counted_forward(*args, block_params=None, **kwargs):
            with counter.phase(self.PHASE_OF_MODE[block_params.mode]):
                return forward(*args, block_params=block_params, **kwargs)

        def counted_draw(*args, **kwargs):
            with counter.phase("sampling"):
                return draw(*args, **kwargs)

        sampler_module.gpt.forward = counted_forward
        sampler_module.sample_tokens = reference_sampler.sample_tokens = counted_draw
        return self

    def __exit__(self, *exc):
        for module, name, original in self._saved:
            setattr(module, name, original)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_layout_arguments(parser)
    parser.add_argument("--chunks", type=int, default=1, help="chunks timed (batch 1 each)")
    add_model_arguments(parser)
    parser.add_argument("--skip-recompute", action="store_true", help="time only our engine")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="the model's dtype (default float32: the tokens of both methods agree; in bfloat16 "
                             "their reductions round differently)")
    parser.add_argument("--cuda-graphs", default="on", choices=["on", "off"],
                        help="on CUDA (TP = PP = 1), replay the engine's decode steps as a CUDA graph (default on, "
                             "as rollout.cuda_graphs); no effect elsewhere")
    add_count_argument(parser)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    count_on_the_gpu_path(args)

    from ebft_megatron.cli import quiet_imports

    quiet_imports()
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    from reference_sampler import sample_rollouts_recompute

    from ebft_megatron.block_layout import BlockLayout
    from ebft_megatron.config import load_config
    from ebft_megatron.rollouts.sampler import SamplingSettings, sample_rollouts
    from ebft_megatron.runtime import device
    from ebft_megatron.runtime.launch_count import LaunchCounter
    from ebft_megatron.training import builder

    # the policy as a run builds it (the training settings' defaults), in --dtype
    config = load_config(None, [f"model.load={model_checkpoint(args)}", f"model.dtype={args.dtype}", "train.seed=0"])
    builder.initialize(config)
    arch = builder.architecture(config)
    model = builder.policy(config, arch)
    layout = layout_from(args)
    settings = SamplingSettings(temperature=0.6, top_p=1.0, cuda_graphs=args.cuda_graphs == "on")
    # real text: the standard library's own source, in the model's tokenizer
    ids = text_tokens(builder.tokenizer(config, arch), args.chunks * layout.chunk_len, "json/decoder.py")
    chunks = device.to_device(torch.tensor(ids).view(args.chunks, 1, layout.chunk_len))
    gen = torch.Generator().manual_seed(0)  # drawn on the host: the same numbers on every device
    uniforms = device.to_device(
        torch.rand(args.chunks, 1, layout.num_blocks, layout.num_samples, layout.rollout_len, generator=gen))
    generated = args.chunks * layout.num_rollout_tokens

    # Other jobs on a shared machine stretch wall time unevenly between the two timed runs (and so
    # the ratio); the process CPU time and the 1-minute load average around each run show how much.
    machine = {}

    def run(sampler, name):
        load_before = os.getloadavg()[0]
        cpu_start, start = time.process_time(), device_clock()
        outs = [sampler(model, layout, chunks[c], arch.vocab_size, settings, uniforms=uniforms[c]).tokens
                for c in range(args.chunks)]
        seconds = device_clock() - start
        machine[name] = {"cpu_seconds": time.process_time() - cpu_start,
                         "load_avg_1min_before_after": [load_before, os.getloadavg()[0]]}
        return seconds, outs

    # warm-up (allocations, first calls of each kernel): both methods on a short chunk, then the
    # run by phase, which is ours on the real chunk
    short = 2 * layout.first_anchor + layout.rollout_len
    for sampler in (sample_rollouts, sample_rollouts_recompute):
        sampler(model, BlockLayout(short, layout.first_anchor, layout.stride, layout.rollout_len, 1),
                chunks[0][:, :short], arch.vocab_size, settings)
    with EnginePhases(model) as phases:
        phased_s, _ = run(sample_rollouts, "ours_by_phase")
    ours_s, ours_tokens = run(sample_rollouts, "ours")
    rss_after_ours = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {
        "settings": vars(args) | {"num_blocks": layout.num_blocks, "threads": torch.get_num_threads(),
                                  "layers": arch.num_layers, "device": str(device.current())},
        "ours_seconds": ours_s, "ours_tokens_per_s": generated / ours_s, "peak_rss_mb_after_ours": rss_after_ours,
        "ours_seconds_by_phase": phases.summary(phased_s),
        "flops_real_pair_decode": flop_model(arch, layout), "flops_dense_decode": flop_model(arch, layout, True),
    }
    if not args.skip_recompute:
        ref_s, ref_tokens = run(sample_rollouts_recompute, "recompute")
        result.update({
            "recompute_seconds": ref_s, "recompute_tokens_per_s": generated / ref_s,
            "speedup": ref_s / ours_s,
            "cpu_time_ratio": machine["recompute"]["cpu_seconds"] / machine["ours"]["cpu_seconds"],
            # the same random numbers drive both; a token can differ only where a uniform falls
            # within fp32 rounding of a CDF step (likelier with near-flat random weights)
            "same_token_fraction": float(torch.cat([(a == b).flatten() for a, b in zip(ours_tokens, ref_tokens)]).float().mean()),
            "peak_rss_mb_total": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        })
    result["machine"] = machine
    peak_gpu = peak_gpu_bytes()
    if peak_gpu is not None:
        result["peak_gpu_mb"] = peak_gpu / 2 ** 20
    if args.count:
        samplers = {"ours": sample_rollouts}
        if not args.skip_recompute:
            samplers["recompute"] = sample_rollouts_recompute
        result["counts_per_generation"] = {}
        for name, sampler in samplers.items():
            with LaunchCounter() as counter, CountedPhases(counter):
                sampler(model, layout, chunks[0], arch.vocab_size, settings, uniforms=uniforms[0])
            result["counts_per_generation"][name] = counter.as_dict()
        result["decode_steps_per_generation"] = layout.rollout_len - 1
    print(json.dumps(result, indent=2))
    for name, counts in result.get("counts_per_generation", {}).items():
        print_counts(f"one generation, {name}, counted on {device.current()}", counts)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
