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


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m ebft_megatron.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", required=True, help="checkpoint folder to evaluate")
    parser.add_argument("--out", required=True, help="folder for metrics.json, cfm_by_length.csv and .png")
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


def run_humaneval(args, model, arch, tokenizer) -> dict:
    """pass@k over the first --humaneval problems; generation is collective (every rank)."""
    from ebft_megatron.evaluation.humaneval import evaluate_humaneval, load_problems
    from ebft_megatron.generate import generate_ids

    def generate(prompt: str, num_samples: int) -> list[str]:
        ids = tokenizer.encode(prompt)
        return [tokenizer.decode(generate_ids(model, arch, ids, args.humaneval_max_new_tokens,
                                              temperature=args.humaneval_temperature, top_p=args.humaneval_top_p,
                                              seed=1234 + sample, eos_id=tokenizer.eos_id))
                for sample in range(num_samples)]

    ks = tuple(k for k in (1, 4, 16, 64) if k <= args.humaneval_samples)
    report = evaluate_humaneval(generate, load_problems()[: args.humaneval], args.humaneval_samples, ks)
    return report.metrics()


def run_in_context(args, model, arch, tokenizer, data) -> dict:
    """HumanEval (--in-context), unit-test pass@k and translation scores from batched in-context
    completions."""
    from ebft_megatron.evaluation import downstream
    from ebft_megatron.evaluation.unit_tests import read_tasks

    settings = downstream.DownstreamSettings(
        anchor=args.prompt_tokens, max_new_tokens=args.humaneval_max_new_tokens, samples=args.humaneval_samples,
        temperature=args.humaneval_temperature, top_p=args.humaneval_top_p, batch_size=args.batch_size)
    metrics = {}
    if args.unit_tests:
        metrics.update(downstream.unit_test_accuracy(model, tokenizer, read_tasks(args.unit_tests), settings,
                                                     arch.vocab_size, limit=args.unit_tests_limit or None))
    if args.humaneval and args.in_context:
        metrics.update(downstream.humaneval_accuracy(model, tokenizer, settings, arch.vocab_size, limit=args.humaneval))
    if args.translation:
        metrics.update(downstream.translation_quality(model, tokenizer, translation_documents(args.translation, data),
                                                      settings, arch.vocab_size, limit=args.translation_limit or None))
    return metrics


def translation_documents(path, data) -> list[tuple[str, str]]:
    """(prompt, target) pairs of a translation file, rendered with the config's template."""
    from ebft_megatron.data.sources import SkipReport, read_translation_pairs

    if not (data.source_lang.strip() and data.target_lang.strip()):
        from ebft_megatron.errors import UsageError

        raise UsageError("--translation needs data.source_lang and data.target_lang (e.g. data.source_lang=English "
                         "data.target_lang=Spanish), the languages the prompt template names")
    return [tuple(document.segments) for document in
            read_translation_pairs(path, data.translation_format(), False, SkipReport())]


def main(argv=None) -> int:
    args = parse_args(argv)
    from ebft_megatron.cli import run_cli

    def job():
        from ebft_megatron import evaluation
        from ebft_megatron.checkpoint import store
        from ebft_megatron.config import load_config
        from ebft_megatron.data.dataset import load_chunks
        from ebft_megatron.data.packing import check_tokenizer_matches
        from ebft_megatron.data.tokenizers import Tokenizer
        from ebft_megatron.features.network import load_feature_network
        from ebft_megatron.models.gpt import build_model
        from ebft_megatron.runtime import distributed

        config = load_config(args.config, [*args.overrides, f"model.load={args.load}"])
        arch = store.architecture_of(config.model.load)
        arch.check_parallel(config.parallel.tp, config.parallel.pp)
        distributed.initialize(config.parallel.tp, config.parallel.pp, seed=config.train.seed)
        try:
            info = distributed.parallel_info()
            dtype = config.model.params_dtype
            tokenizer = Tokenizer(f"{config.model.load}/tokenizer")
            check_tokenizer_matches(tokenizer, arch.vocab_size, f"{config.model.load}/tokenizer")
            chunks = load_chunks(config.data, tokenizer, config.rollout.chunk_len, "validation",
                                 verbose=distributed.is_rank0())
            m = config.model
            policy = build_model(arch, params_dtype=dtype, block_attention=m.attention,
                                 logit_chunk_rows=m.logit_chunk_rows)
            store.load_model_weights(policy, m.load)
            features = load_feature_network(m.feature_load or m.load, m.feature_layers or None, dtype,
                                            block_attention=m.attention)
            result = evaluation.evaluate_run(config, policy, features, chunks, arch.vocab_size, info.dp_rank)
            evaluation.write_report(args.out, *result)
            metrics = result.metrics()
            if args.unit_tests or args.translation or (args.humaneval and args.in_context):
                downstream = run_in_context(args, policy, arch, tokenizer, config.data)
                metrics.update(downstream)
                if distributed.is_rank0():
                    (Path(args.out) / "downstream.json").write_text(json.dumps(downstream, indent=1))
            elif args.humaneval:
                humaneval = run_humaneval(args, policy, arch, tokenizer)
                metrics.update(humaneval)
                if distributed.is_rank0():
                    (Path(args.out) / "humaneval.json").write_text(json.dumps(humaneval, indent=1))
            if distributed.is_rank0():
                print(json.dumps(metrics, indent=1))
        finally:
            distributed.destroy()

    return run_cli(job)


if __name__ == "__main__":
    sys.exit(main())
