#!/usr/bin/env python
"""Write docstring -> body pairs from the Python standard library as JSONL splits.

  python tools/prepare_stdlib_functions.py --output data/stdlib_functions
  # -> data/stdlib_functions/{train,validation,test}.jsonl with keys "question" (the def line(s) and the
  #    docstring) and "answer" (the rest of the body): train with data.kind=jsonl data.path=.../train.jsonl

Splits are by source file (a hash of its relative path), so no file's functions straddle splits.
Files are written to temporary names and renamed together at the end.

  python tools/prepare_stdlib_functions.py --output data/stdlib_unit_tests --unit-tests
  # -> the same three files, holding only the functions whose docstring has >>> examples that the
  #    original body passes in the sandbox (the replication's RLVR tasks, see
  #    ebft_megatron/evaluation/unit_tests.py). "question" starts with a "# module:qualname" header;
  #    "module" and "qualname" are fields too. These few hundred are split by function, not by file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="folder for train.jsonl, validation.jsonl, test.jsonl")
    parser.add_argument("--source", default=None, help="a folder of Python files (default: this Python's stdlib)")
    parser.add_argument("--validation-fraction", type=float, default=0.05, help="share of files (default 0.05)")
    parser.add_argument("--test-fraction", type=float, default=0.05, help="share of files (default 0.05)")
    parser.add_argument("--min-body-lines", type=int, default=2, help="shortest body kept (default 2 lines)")
    parser.add_argument("--unit-tests", action="store_true",
                        help="keep only functions with doctest examples that their own body passes (run in the sandbox)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing split files")
    args = parser.parse_args(argv)
    if not (0 <= args.validation_fraction and 0 <= args.test_fraction and args.validation_fraction + args.test_fraction < 1):
        parser.error("--validation-fraction and --test-fraction must be >= 0 and sum to less than 1")
    return args


def unit_test_records(pairs) -> list[tuple[dict, str]]:
    """(record, split key) for each function whose original body passes its doctest examples."""
    import time

    from ebft_megatron.evaluation.unit_tests import candidate_tasks, verified_tasks

    candidates = candidate_tasks(pairs)
    started = time.monotonic()
    print(f"running the examples of {len(candidates)} functions against their own bodies in the sandbox "
          f"(about {0.2 * len(candidates):.0f} s)...", file=sys.stderr, flush=True)
    kept = verified_tasks(candidates)
    failed = len(candidates) - len(kept)
    print(f"{len(kept)} kept; {failed} left out (their own body fails: they need the network, a subprocess, files "
          f"or other state; or a docstring-only body passes too) "
          f"[{time.monotonic() - started:.0f} s]", file=sys.stderr, flush=True)
    return [({"question": task.prompt, "answer": task.response, "module": task.module, "qualname": task.qualname},
             f"{task.module}:{task.qualname}") for task in kept]


def main(argv=None) -> int:
    args = parse_args(argv)
    from ebft_megatron.cli import UsageError, run_cli

    def job():
        from ebft_megatron.data.sources import python_stdlib_dir
        from ebft_megatron.data.sources import split_hash
        from tools.preparation.stdlib_functions import extract

        source = Path(args.source) if args.source else python_stdlib_dir()
        if not source.is_dir():
            raise UsageError(f"--source {source} is not a folder")
        out = Path(args.output)
        names = ("train", "validation", "test")
        finals = {name: out / f"{name}.jsonl" for name in names}
        existing = [str(p) for p in finals.values() if p.exists()]
        if existing and not args.overwrite:
            raise UsageError(f"{', '.join(existing)} already exist; pass --overwrite or choose another --output")
        pairs, report = extract(source, args.min_body_lines)
        if not pairs:
            raise UsageError(f"{source}: no functions with a docstring and a body of {args.min_body_lines}+ lines")
        records = [({"question": pair.prompt, "answer": pair.response, "path": pair.path, "name": pair.name},
                    pair.path) for pair in pairs]
        if args.unit_tests:
            records = unit_test_records(pairs)
        out.mkdir(parents=True, exist_ok=True)
        temps = {name: path.with_name(path.name + ".tmp") for name, path in finals.items()}
        counts = dict.fromkeys(names, 0)
        try:
            handles = {name: open(temp, "w") for name, temp in temps.items()}
            for record, split_key in records:
                position = split_hash(split_key) / 2.0**64
                split = ("validation" if position < args.validation_fraction else
                         "test" if position < args.validation_fraction + args.test_fraction else "train")
                handles[split].write(json.dumps(record) + "\n")
                counts[split] += 1
            for handle in handles.values():
                handle.close()
            for name in names:
                os.replace(temps[name], finals[name])
        finally:
            for temp in temps.values():
                temp.unlink(missing_ok=True)
        print(f"{report.files} files, {len(pairs)} functions, {len(records)} written -> " + ", ".join(f"{k} {v}" for k, v in counts.items())
              + f" (skipped: {report.skipped})")

    return run_cli(job, also=(OSError,))


if __name__ == "__main__":
    sys.exit(main())
