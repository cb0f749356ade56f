"""Evaluate a checkpoint: validation CE (whole chunk, and response-only for prompt/response data)
and the conditional feature-matching loss as a function of completion length (CSV + PNG).

  python -m ebft_megatron.evaluate --load runs/ebft_smollm2_stdlib/step_000004 --out eval_out
  python -m ebft_megatron.evaluate --load CKPT --out eval_out --humaneval 164 --humaneval-samples 4 \
      --humaneval-temperature 0.6            # + HumanEval pass@1 and pass@4 (unbiased), sandboxed
  python -m ebft_megatron.evaluate --load CKPT --out eval_out --config X.yaml --unit-tests data/test.jsonl \
      --humaneval 16 --in-context --humaneval-samples 4 --humaneval-temperature 0.6   # batched, few-shot
  python -m ebft_megatron.evaluate --load CKPT --out eval_out --config examples/ebft_translation_llama3.2_1b.yaml \
      --translation ~/data/bible/test.jsonl --translation-limit 200   # BLEU and chrF, greedy, in context
  torchrun --nproc_per_node=2 -m ebft_megatron.evaluate --load CKPT --config examples/X.yaml parallel.pp=2

The data, rollout and eval settings come from --config and overrides (the trainer's sections;
see `python -m ebft_megatron.train --help`); --load replaces model.load. The feature network is
model.feature_load, or else the evaluated checkpoint itself: pass the base model's checkpoint as
model.feature_load to measure a trained policy against the original features, as in training.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ebft_megatron.cli import run_cli
from ebft_megatron.config import load_config


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m ebft_megatron.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", required=True, help="checkpoint folder to evaluate")
    parser.add_argument("--out", required=True,
                        help="folder for metrics.json, items.json (the value of every chunk, block and task), "
                             "cfm_by_length.csv and .png")
    parser.add_argument("--config", help="YAML with the trainer's sections (data, rollout, eval, parallel)")
    parser.add_argument("--humaneval", type=int, default=0, metavar="N",
                        help="also run the first N HumanEval problems (164 = all; 0 = off, the default); "
                             "generated code runs in the sandbox (ebft_megatron.evaluation.sandbox)")
    parser.add_argument("--humaneval-samples", type=int, default=1, help="completions per problem (default 1)")
    parser.add_argument("--humaneval-max-new-tokens", type=int, default=256, help="default 256")
    parser.add_argument("--humaneval-temperature", type=float, default=0.0,
                        help="0 = greedy (default); the reference samples at 0.6 with top-p 0.95")
    parser.add_argument("--humaneval-top-p", type=float, default=0.95, help="default 0.95")
    parser.add_argument("--in-context", action="store_true",
                        help="HumanEval prompts follow the problems before them with their canonical solutions, so "
                             "that --batch-size prompts decode together (faster: benchmarks/completions.py; a "
                             "few-shot protocol, so compare checkpoints with each other, not with zero-shot scores)")
    parser.add_argument("--unit-tests", metavar="FILE",
                        help="also run unit-test tasks (JSONL from tools/prepare_stdlib_functions.py --unit-tests); "
                             "in context like --in-context, with --humaneval-samples/-temperature/-top-p/"
                             "-max-new-tokens")
    parser.add_argument("--unit-tests-limit", type=int, default=0, metavar="N", help="first N tasks (0 = all)")
    parser.add_argument("--translation", metavar="FILE",
                        help="also score translations (BLEU, chrF) of held-out pairs (JSONL or TSV, e.g. test.jsonl "
                             "from tools/prepare_bible_translation.py), prompted with the config's data.template, "
                             "data.source_lang and data.target_lang; in context, one completion each")
    parser.add_argument("--translation-limit", type=int, default=0, metavar="N", help="first N pairs (0 = all)")
    parser.add_argument("--prompt-tokens", type=int, default=384,
                        help="in context: prompts longer than this are left out (default 384)")
    parser.add_argument("--batch-size", type=int, default=16, help="in context: prompts decoded together (default 16)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="settings that replace the file's")
    args = parser.parse_args(argv)
    if not 0 <= args.humaneval <= 164:
        parser.error("--humaneval must be between 0 and 164")
    if min(args.humaneval_samples, args.humaneval_max_new_tokens, args.prompt_tokens, args.batch_size) < 1:
        parser.error("--humaneval-samples, --humaneval-max-new-tokens, --prompt-tokens and --batch-size must be >= 1")
    if args.humaneval_temperature < 0:
        parser.error("--humaneval-temperature must be >= 0 (0 = greedy)")
    if args.translation and not Path(args.translation).is_file():
        parser.error(f"--translation {args.translation}: no such file")
    if args.unit_tests and not Path(args.unit_tests).is_file():
        parser.error(f"--unit-tests {args.unit_tests}: no such file; write it with "
                     "tools/prepare_stdlib_functions.py --unit-tests")
    return args


def downstream_metrics(args, model, arch, tokenizer, data, items: dict) -> dict:
    """What the flags ask for besides CE and CFM: unit-test pass@k, HumanEval (in context or zero-shot)
    and translation scores; ``items`` gets the per-task values. Collective: every rank calls it."""
    # torch and megatron load once the arguments are read (see main)
    from ebft_megatron.evaluation import downstream
    from ebft_megatron.evaluation.unit_tests import read_tasks

    settings = downstream.DownstreamSettings(
        anchor=args.prompt_tokens, max_new_tokens=args.humaneval_max_new_tokens, samples=args.humaneval_samples,
        temperature=args.humaneval_temperature, top_p=args.humaneval_top_p, batch_size=args.batch_size)
    metrics = {}
    if args.unit_tests:
        metrics.update(downstream.unit_test_accuracy(model, tokenizer, read_tasks(args.unit_tests), settings,
                                                     arch.vocab_size, limit=args.unit_tests_limit or None,
                                                     items=items))
    if args.humaneval:
        run = downstream.humaneval_accuracy if args.in_context else downstream.humaneval_zero_shot
        metrics.update(run(model, tokenizer, settings, arch.vocab_size, limit=args.humaneval))
    if args.translation:
        documents = downstream.translation_documents(args.translation, data)
        metrics.update(downstream.translation_quality(model, tokenizer, documents, settings, arch.vocab_size,
                                                      limit=args.translation_limit or None))
    return metrics


def main(argv=None) -> int:
    args = parse_args(argv)

    def job():
        # torch and megatron load here, once the arguments are read (--help and a bad flag answer at once)
        # and after run_cli has quieted megatron's import-time notices
        from ebft_megatron import evaluation
        from ebft_megatron.runtime import distributed
        from ebft_megatron.training import builder

        config = load_config(args.config, [*args.overrides, f"model.load={args.load}"])
        arch = builder.architecture(config)
        info = builder.initialize(config)
        try:
            tokenizer = builder.tokenizer(config, arch)
            chunks = builder.chunks(config, tokenizer, "validation", verbose=distributed.is_rank0())
            policy = builder.policy(config, arch)
            features = builder.feature_network(config)
            result = evaluation.evaluate_run(config, policy, features, chunks, arch.vocab_size, info.dp_rank)
            evaluation.write_report(args.out, result.ce, result.curve)
            metrics, items = result.metrics(), result.items()
            if args.unit_tests or args.translation or args.humaneval:
                downstream = downstream_metrics(args, policy, arch, tokenizer, config.data, items)
                metrics.update(downstream)
                if distributed.is_rank0():
                    name = "humaneval.json" if args.humaneval and not (args.in_context or args.unit_tests
                                                                       or args.translation) else "downstream.json"
                    (Path(args.out) / name).write_text(json.dumps(downstream, indent=1))
            evaluation.write_items(args.out, items)
            if distributed.is_rank0():
                print(json.dumps(metrics, indent=1))
        finally:
            distributed.destroy()

    return run_cli(job)


if __name__ == "__main__":
    sys.exit(main())
