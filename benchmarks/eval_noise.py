"""How noisy are the held-out figures? Per validation chunk and per sampling seed, the feature-matching
loss (CFM at the full completion length) and the cross entropy of one checkpoint, and from them the
standard error of the means the evaluation reports, as a function of the number of chunks.

    python benchmarks/eval_noise.py --config examples/ebft_smollm2_stdlib.yaml --chunks 16 --seeds 3 \\
        --json noise.json [section.key=value ...]

For the mean over the first N chunks with one sampling seed (what ``eval.cfm_chunks=N`` reports):
- seed noise: the standard error of that mean from the sampling alone (the same chunks, other
  rollouts): each chunk's seed variance, pooled over the chunks, over N; a before/after comparison
  on the same chunks sees this (the SD over the few seeds is printed too, for a check);
- chunk noise: the standard deviation of the per-chunk values (averaged over seeds) over sqrt(N);
  a claim about the data distribution, not these chunks, sees this too.
CE has no sampling: only chunk noise. One process, the config's parallel layout ignored (TP1, PP1).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ebft_megatron.evaluation.statistics import standard_error  # noqa: E402


def noise_table(ce: list, cfm: list) -> list[dict]:
    """ce[c], cfm[c][s] -> per N: the means, and the standard errors of the N-chunk means."""
    seeds = len(cfm[0])
    # the seed noise of one chunk's CFM, pooled over the chunks (each chunk's rollouts are drawn
    # independently, so the N-chunk mean's seed noise is this over sqrt(N))
    pooled_seed_sd = math.sqrt(statistics.fmean(statistics.variance(row) for row in cfm)) if seeds > 1 else math.nan
    table = []
    for n in sorted({k for k in (1, 2, 4, 8, 16, 32, 64) if k <= len(ce)} | {len(ce)}):
        by_seed = [statistics.fmean(cfm[c][s] for c in range(n)) for s in range(seeds)]
        per_chunk = [statistics.fmean(cfm[c]) for c in range(n)]
        table.append({
            "chunks": n, "cfm_mean": statistics.fmean(by_seed),
            "cfm_seed_se": pooled_seed_sd / math.sqrt(n),
            "cfm_seed_sd_observed": statistics.stdev(by_seed) if seeds > 1 else math.nan,
            "cfm_chunk_se": standard_error(per_chunk),
            "ce_mean": statistics.fmean(ce[:n]),
            "ce_chunk_se": standard_error(ce[:n])})
    return table


def print_table(table: list[dict]) -> None:
    print("\nchunks | CFM mean | CFM seed SE | (observed over seeds) | CFM chunk SE | CE mean | CE chunk SE")
    for row in table:
        print(f"{row['chunks']:6d} | {row['cfm_mean']:.4f} | {row['cfm_seed_se']:.4f} | {row['cfm_seed_sd_observed']:.4f} | "
              f"{row['cfm_chunk_se']:.4f} | {row['ce_mean']:.4f} | {row['ce_chunk_se']:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config")
    parser.add_argument("--chunks", type=int, default=16, help="validation chunks, from the first (default 16)")
    parser.add_argument("--seeds", type=int, default=3, help="sampling seeds per chunk (default 3)")
    parser.add_argument("--json", help="write the per-chunk figures and the standard errors here")
    parser.add_argument("--table-from", metavar="JSON", help="print the table of an earlier run's --json and stop")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.table_from:
        saved = json.loads(Path(args.table_from).read_text())
        print_table(noise_table(saved["ce"], saved["cfm"]))
        return

    from ebft_megatron.cli import quiet_imports

    quiet_imports()
    from ebft_megatron.config import layout_of, load_config
    from ebft_megatron.evaluation import feature_matching_by_length
    from ebft_megatron.evaluation.ce import validation_ce
    from ebft_megatron.rollouts.sampler import SamplingSettings, rollout_generator
    from ebft_megatron.training import builder

    if not args.config:
        parser.error("--config is required (unless --table-from)")
    config = load_config(args.config, [*args.overrides, "parallel.tp=1", "parallel.pp=1"])
    builder.initialize(config)
    arch = builder.architecture(config)
    tokenizer = builder.tokenizer(config, arch)
    chunks = builder.chunks(config, tokenizer, "validation")
    count = min(args.chunks, len(chunks.tokens))
    policy = builder.policy(config, arch)
    policy.eval()
    features = builder.feature_network(config)
    layout = layout_of(config)
    sampling = SamplingSettings(config.eval.temperature, config.rollout.top_p)
    masking = config.data.document_masking

    started = time.perf_counter()
    ce, cfm = [], []  # ce[c]; cfm[c][s]
    for c in range(count):
        one = chunks.select([c])
        ce.append(validation_ce(policy, one, document_masking=masking)["eval/ce"])
        row = []
        for seed in range(args.seeds):
            curve = feature_matching_by_length(policy, features, layout, one, arch.vocab_size, sampling,
                                               rollout_generator(1000 + seed, 0), config.objective.pooling,
                                               document_masking=masking)
            row.append(curve.cfm[-1])
        cfm.append(row)
        elapsed = time.perf_counter() - started
        print(f"chunk {c + 1}/{count}: ce {ce[-1]:.4f}, cfm {' '.join(f'{v:.4f}' for v in row)} "
              f"({elapsed:.0f} s, ETA {elapsed / (c + 1) * (count - c - 1):.0f} s)", flush=True)

    table = noise_table(ce, cfm)
    print_table(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"ce": ce, "cfm": cfm, "table": table,
                                               "seconds": time.perf_counter() - started}, indent=1))


if __name__ == "__main__":
    main()
