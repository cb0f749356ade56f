"""What the benchmarks share: the rollout-layout flags (defaults: the paper's code setting)."""

from __future__ import annotations


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
