#!/usr/bin/env python
"""Rollout engine (KV cache, real-pair attention) vs the reference's full recompute, same run.

  python benchmarks/rollouts.py                       # P=1024, C=s=G=8, n=4, SmolLM2-135M, fp32
  python benchmarks/rollouts.py --random-weights      # same shapes, no download
  python benchmarks/rollouts.py --layers 4 --chunk-len 256   # a quick look

The reference's method (spec §1.5): for each of the n sample copies, G full forwards of the chunk
plus all blocks' tokens so far, dense block mask, logits only at the rows that are sampled.
Ours: one prefill of the chunk (LM head on NB rows), then G-1 decode steps of n*NB tokens against
the cached prefix. Both draw from the same random numbers, so they must produce the same tokens
(checked and printed). Prints tokens/s, the ratio, peak RSS and the FLOP-model ratio.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def flop_model(arch, layout, dense_decode: bool = False) -> dict:
    """Forward FLOPs (multiply-add = 2) of both methods: linear layers, attention pairs, LM head."""
    h, L = arch.hidden_size, arch.num_layers
    kv = arch.num_query_groups * arch.head_dim
    per_token_linear = 2 * L * (h * (h + 2 * kv) + h * h + 3 * h * arch.ffn_hidden_size)
    per_pair = 4 * L * arch.num_attention_heads * arch.head_dim
    lm_head = 2 * h * arch.vocab_size
    P, NB, n, G = layout.chunk_len, layout.num_blocks, layout.num_samples, layout.rollout_len
    anchors = layout.anchor_positions.tolist()

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunk-len", type=int, default=1024)
    parser.add_argument("--first-anchor", type=int, default=8)
    parser.add_argument("--stride", type=int, default=8)
    parser.add_argument("--rollout-len", type=int, default=8)
    parser.add_argument("--num-samples", type=int, default=4)
    parser.add_argument("--chunks", type=int, default=1, help="chunks timed (batch 1 each)")
    parser.add_argument("--layers", type=int, default=None, help="truncate the model to this many layers")
    parser.add_argument("--random-weights", action="store_true", help="SmolLM2 shapes, random weights")
    parser.add_argument("--skip-recompute", action="store_true", help="time only our engine")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()

    from ebft_megatron.cli import quiet_imports

    quiet_imports()
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    from ebft_megatron import assets
    from ebft_megatron.checkpoint import store
    from ebft_megatron.models.architecture import from_hf_config
    from ebft_megatron.models.gpt import build_model
    from ebft_megatron.rollouts.layout import BlockLayout
    from ebft_megatron.rollouts.sampler import SamplingSettings, sample_rollouts, sample_rollouts_recompute
    from ebft_megatron.runtime import distributed

    distributed.initialize(1, 1, seed=0)
    if args.random_weights:
        hf_config = json.loads((Path(__file__).parent / "smollm2_config.json").read_text())
        arch = from_hf_config(hf_config)
        ckpt = None
    else:
        ckpt = assets.smollm2_checkpoint()
        arch = store.architecture_of(ckpt)
    if args.layers:
        from dataclasses import replace

        arch = replace(arch, num_layers=args.layers)
    model = build_model(arch)
    if ckpt is not None and not args.layers:
        store.load_model_weights(model, ckpt)
    layout = BlockLayout(args.chunk_len, args.first_anchor, args.stride, args.rollout_len, args.num_samples)
    settings = SamplingSettings(temperature=0.6, top_p=1.0)
    gen = torch.Generator().manual_seed(0)
    chunks = torch.randint(0, arch.vocab_size, (args.chunks, 1, layout.chunk_len), generator=gen)
    if ckpt is not None:  # real text for the real model: the standard library's own source
        from ebft_megatron.data.tokenizers import Tokenizer

        text = (assets.python_stdlib_dir() / "json" / "decoder.py").read_text()
        ids = Tokenizer(ckpt / "tokenizer").encode(text * 4)
        need = args.chunks * layout.chunk_len
        chunks = torch.tensor(ids[:need]).view(args.chunks, 1, layout.chunk_len)
    uniforms = torch.rand(args.chunks, 1, layout.num_blocks, layout.num_samples, layout.rollout_len, generator=gen)
    generated = args.chunks * layout.num_rollout_tokens

    def run(sampler):
        start = time.perf_counter()
        outs = [sampler(model, layout, chunks[c], arch.vocab_size, settings, uniforms=uniforms[c]).tokens
                for c in range(args.chunks)]
        return time.perf_counter() - start, outs

    sample_rollouts(model, BlockLayout(2 * layout.first_anchor + layout.rollout_len, layout.first_anchor,
                                       layout.stride, layout.rollout_len, 1),
                    chunks[0][:, : 2 * layout.first_anchor + layout.rollout_len], arch.vocab_size, settings)  # warm-up
    ours_s, ours_tokens = run(sample_rollouts)
    rss_after_ours = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {
        "settings": vars(args) | {"num_blocks": layout.num_blocks, "threads": torch.get_num_threads(),
                                  "layers": arch.num_layers},
        "ours_seconds": ours_s, "ours_tokens_per_s": generated / ours_s, "peak_rss_mb_after_ours": rss_after_ours,
        "flops_real_pair_decode": flop_model(arch, layout), "flops_dense_decode": flop_model(arch, layout, True),
    }
    if not args.skip_recompute:
        ref_s, ref_tokens = run(sample_rollouts_recompute)
        result.update({
            "recompute_seconds": ref_s, "recompute_tokens_per_s": generated / ref_s,
            "speedup": ref_s / ours_s,
            # the same random numbers drive both; a token can differ only where a uniform falls
            # within fp32 rounding of a CDF step (likelier with near-flat random weights)
            "same_token_fraction": float(torch.cat([(a == b).flatten() for a, b in zip(ours_tokens, ref_tokens)]).float().mean()),
            "peak_rss_mb_total": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        })
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
