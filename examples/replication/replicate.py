#!/usr/bin/env python
"""SFT vs RLVR vs EBFT from the same SmolLM2-135M start, on the same data and budget.

  .venv/bin/python examples/replication/replicate.py --out runs/replication       # ~1.3 h on 2 CPU cores
  .venv/bin/python examples/replication/replicate.py --out runs/replication --seeds 1 2 3 --steps 16

What it does, each step skipped when its output already exists (so a stopped run resumes):
  1. data: standard-library functions with doctest examples (tools/prepare_stdlib_functions.py
     --unit-tests): train / validation / test, split by function;
  2. for each seed and method (sft, rlvr, ebft): python -m ebft_megatron.train with
     examples/replication/stdlib_unit_tests.yaml, the same chunks, steps, batch and learning rate;
     RLVR's reward runs the examples of the task's docstring on the sampled body (1 = all pass);
  3. every checkpoint and the base model: python -m ebft_megatron.evaluate with the same file:
     validation CE (whole chunk and body tokens only), CFM at the training layout, pass@1 and
     pass@k on unit-test tasks of the test split and on HumanEval (in context, sampled);
  4. tables (means and differences with 95% intervals over seeds) in OUT/results.md and OUT/results.json, and plots
     OUT/metrics.png (final metrics) and OUT/training.png (training-chunk CE per step).

The machine's 2 cores are used by one job at a time (OMP_NUM_THREADS=2).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ebft_megatron.evaluation.statistics import standard_error, t_interval  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "examples" / "replication" / "stdlib_unit_tests.yaml"
METHODS = ("sft", "rlvr", "ebft")
# RLVR samples whole bodies at the response anchor; the other methods keep the file's settings.
METHOD_OVERRIDES = {
    "sft": ["objective.mode=sft"],
    "ebft": ["objective.mode=ebft"],
    "rlvr": ["objective.mode=rlvr", "objective.reward=ebft_megatron.evaluation.unit_tests:UnitTestReward",
             "objective.ce_coef=0.0", "rollout.first_anchor=256", "rollout.stride=1", "rollout.rollout_len=96"],
}
TABLE = (  # (metric key, column title, the key of its standard error over the evaluation's items)
    ("eval/ce", "val CE", "eval/ce_se"),
    ("eval/response_ce", "val CE (body)", None),
    ("eval/cfm", "CFM", "eval/cfm_se"),
    ("unit_tests/pass@1", "unit tests pass@1", "unit_tests/pass@1_se"),
    ("unit_tests/pass@{k}", "unit tests pass@{k}", "unit_tests/pass@{k}_se"),
    ("humaneval/pass@1", "HumanEval pass@1", None),
    ("humaneval/pass@{k}", "HumanEval pass@{k}", None),
)
# Where an evaluation's per-item values (evaluate's items.json: chunk CE, group CFM, task pass@k) are kept
ITEMS = "items"
# The comparisons the paper's claims are about: (a, b) -> the per-seed difference a - b.
COMPARISONS = (("ebft", "sft"), ("ebft", "rlvr"), ("ebft", "base"), ("sft", "base"), ("rlvr", "base"))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/replication", help="output folder (default runs/replication)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="training seeds (default 1 2 3)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per run (default 8)")
    parser.add_argument("--load", default=str(Path.home() / ".cache/ebft_megatron/smollm2/mcore"),
                        help="the starting checkpoint (default: tools/prepare_smollm2.py's)")
    parser.add_argument("--unit-test-tasks", type=int, default=30, help="test-split tasks evaluated (default 30: all)")
    parser.add_argument("--humaneval", type=int, default=0,
                        help="HumanEval problems evaluated (default 0: none; a 135M model solves none of the first 8)")
    parser.add_argument("--samples", type=int, default=4, help="completions per prompt: pass@1 and pass@k (default 4)")
    parser.add_argument("--max-new-tokens", type=int, default=96, help="per completion (default 96)")
    parser.add_argument("--python", default=sys.executable, help="interpreter with ebft_megatron installed")
    args = parser.parse_args(argv)
    if min(args.steps, args.unit_test_tasks, args.samples, args.max_new_tokens) < 1:
        parser.error("--steps, --unit-test-tasks, --samples and --max-new-tokens must be >= 1")
    if args.humaneval < 0:
        parser.error("--humaneval must be >= 0 (0 = no HumanEval)")
    if not Path(args.load, "config.json").is_file() and not Path(args.load).is_dir():
        parser.error(f"--load {args.load}: no checkpoint there; run tools/prepare_smollm2.py first")
    return args


class Runner:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out).resolve()
        self.started = time.monotonic()
        self.jobs_done = 0
        self.jobs_run = 0  # done here (skipped ones took no time, so they do not count in the rate)
        self.time_running = 0.0
        self.jobs_total = 1 + len(args.seeds) * len(args.methods) * 2

    def run(self, label: str, command: list[str], log: Path) -> None:
        """One job, its output to ``log``; stops everything with the log's tail when it fails."""
        elapsed = time.monotonic() - self.started
        eta = ""
        if self.jobs_run:
            eta = f", ETA {(self.time_running / self.jobs_run) * (self.jobs_total - self.jobs_done) / 60:.0f} min"
        print(f"[replicate] {self.jobs_done + 1}/{self.jobs_total} {label} ({elapsed / 60:.1f} min so far{eta})",
              flush=True)
        log.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=str(ROOT))
        began = time.monotonic()
        with open(log, "w") as handle:
            result = subprocess.run(command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, env=env)
        if result.returncode:
            tail = "".join(log.read_text().splitlines(keepends=True)[-20:])
            sys.exit(f"[replicate] {label} failed (exit {result.returncode}); last lines of {log}:\n{tail}")
        took = time.monotonic() - began
        print(f"[replicate]    done in {took / 60:.1f} min", flush=True)
        self.jobs_done += 1
        self.jobs_run += 1
        self.time_running += took

    def skip(self) -> None:
        """A job whose output exists counts as done."""
        self.jobs_done += 1


def data_overrides(data: Path) -> list[str]:
    return [f"data.path={data / 'train.jsonl'}", f"data.eval_path={data / 'validation.jsonl'}"]


def prepare_data(args, runner: Runner) -> Path:
    data = runner.out / "data"
    if not (data / "test.jsonl").is_file():
        print("[replicate] preparing the unit-test tasks", flush=True)
        subprocess.run([args.python, str(ROOT / "tools/prepare_stdlib_functions.py"), "--output", str(data),
                        "--unit-tests", "--validation-fraction", "0.2", "--test-fraction", "0.2", "--overwrite"],
                       check=True, cwd=ROOT)
    return data


def train(args, runner: Runner, data: Path, method: str, seed: int) -> Path:
    run_dir = runner.out / f"{method}_seed{seed}"
    final = run_dir / f"step_{args.steps:06d}"
    if final.is_dir():
        runner.skip()
        return final
    runner.run(f"train {method} seed {seed}", [
        args.python, "-m", "ebft_megatron.train", "--config", str(CONFIG), f"model.load={args.load}",
        f"train.save={run_dir}", f"train.seed={seed}", f"train.steps={args.steps}", *data_overrides(data),
        *METHOD_OVERRIDES[method]], run_dir / "train.log")
    return final


def evaluate(args, runner: Runner, data: Path, checkpoint: str, name: str) -> dict:
    out = runner.out / "eval" / name
    metrics_file = out / "all_metrics.json"
    if metrics_file.is_file():
        runner.skip()
        return json.loads(metrics_file.read_text())
    runner.run(f"evaluate {name}", [
        args.python, "-m", "ebft_megatron.evaluate", "--load", checkpoint, "--out", str(out), "--config", str(CONFIG),
        "--unit-tests", str(data / "test.jsonl"), "--unit-tests-limit", str(args.unit_test_tasks),
        "--humaneval", str(args.humaneval), "--in-context", "--humaneval-samples", str(args.samples),
        "--humaneval-temperature", "0.6", "--humaneval-top-p", "1.0",
        "--humaneval-max-new-tokens", str(args.max_new_tokens), "--prompt-tokens", "384",
        f"model.feature_load={args.load}", *data_overrides(data)], out / "evaluate.log")
    metrics = json.loads((out / "metrics.json").read_text())
    metrics = metrics.get("metrics", metrics)
    metrics.update(json.loads((out / "downstream.json").read_text()))
    metrics[ITEMS] = json.loads((out / "items.json").read_text())
    metrics_file.write_text(json.dumps(metrics, indent=1))
    return metrics


def columns(args, base: dict) -> list[tuple[str, str, str]]:
    """(key, title, standard-error key) of the table's columns: the metrics the base model has."""
    k = args.samples
    found = [(key.format(k=k), title.format(k=k), error and error.format(k=k)) for key, title, error in TABLE]
    return [column for column in found if _number(base.get(column[0]))]


def summarize(args, base: dict, results: dict) -> str:
    """results[method][seed] -> metrics. Two markdown tables: each method's mean with a 95% interval
    over seeds (the base model: its value with the standard error over the evaluation's items), and
    the per-seed differences between methods with their 95% intervals."""
    used = columns(args, base)
    lines = ["| method | " + " | ".join(title for _, title, _ in used) + " |", "|---|" + "---|" * len(used)]
    lines.append("| base (SmolLM2-135M) | " + " | ".join(
        f"{base[key]:.4f}" + (f" (SE {base[error]:.4f})" if _number(base.get(error)) else "")
        for key, _, error in used) + " |")
    for method in args.methods:
        runs = results.get(method, {})
        cells = [_interval([metrics.get(key) for metrics in runs.values()]) + _error([_standard_error(runs, error)])
                 for key, _, error in used]
        lines.append(f"| {method} ({len(runs)} seeds) | " + " | ".join(cells) + " |")
    lines += ["", "| difference (per seed) | " + " | ".join(title for _, title, _ in used) + " |",
              "|---|" + "---|" * len(used)]
    for first, second in COMPARISONS:
        if first not in results or (second != "base" and second not in results):
            continue
        seeds = sorted(set(results[first]) & (set(results[second]) if second != "base" else set(results[first])))
        cells = []
        for key, _, error in used:
            other = (lambda seed: base) if second == "base" else (lambda seed: results[second][seed])
            pairs = [(results[first][seed], other(seed)) for seed in seeds]
            differences = [a.get(key) - b.get(key) for a, b in pairs if _number(a.get(key)) and _number(b.get(key))]
            errors = [_standard_error(results[first], error),
                      base.get(error) if second == "base" else _standard_error(results[second], error)]
            paired = [_paired_error(a, b, key) for a, b in pairs]
            cells.append(_interval(differences, signed=True) + _difference_error(paired, errors))
        lines.append(f"| {first} - {second} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _paired_error(first: dict, second: dict, key: str) -> float:
    """The standard error of one seed's difference from its items: of the mean of the per-item
    differences (chunk, block or task) of two evaluations of the same items; NaN without them."""
    a, b = first.get(ITEMS, {}).get(key), second.get(ITEMS, {}).get(key)
    if not a or not b or a.keys() != b.keys():
        return float("nan")
    return standard_error(a[item] - b[item] for item in a)


def _difference_error(paired: list, unpaired: list) -> str:
    """' (SE p paired, u unpaired)': the evaluation's standard error of a difference, from the
    items' own differences (the mean over seeds) and, as if the two evaluations were independent,
    sqrt(SE_a^2 + SE_b^2); ' (SE u)' where the items were not kept."""
    if paired and all(_number(e) for e in paired) and all(_number(e) for e in unpaired):
        return f" (SE {statistics.fmean(paired):.4f} paired, {_independent(unpaired):.4f} unpaired)"
    return _error(unpaired)


def _standard_error(runs: dict, key) -> float:
    """The evaluation's own standard error for a method: the mean over its seeds (NaN if none)."""
    values = [metrics.get(key) for metrics in runs.values()] if key else []
    values = [v for v in values if _number(v)]
    return statistics.fmean(values) if values else float("nan")


def _error(errors: list) -> str:
    """' (SE x)': the evaluation's standard error of a cell; of a difference, sqrt(SE_a^2 + SE_b^2)
    (as if the two evaluations were independent: an upper bound for the same chunks and tasks)."""
    if not errors or not all(_number(e) for e in errors):
        return ""
    return f" (SE {_independent(errors):.4f})"


def _independent(errors: list) -> float:
    """sqrt(SE_a^2 + SE_b^2 + ...): the standard error of a sum or difference of independent figures."""
    return sum(e * e for e in errors) ** 0.5


def _number(value) -> bool:
    return isinstance(value, (int, float)) and value == value


def _interval(values, signed: bool = False) -> str:
    """The mean and its 95% interval over seeds (Student's t), or the one value there is."""
    values = [v for v in values if _number(v)]
    if not values:
        return "n/a"
    mean, half = t_interval(values)
    text = f"{mean:+.4f}" if signed else f"{mean:.4f}"
    if len(values) == 1:
        return text
    return f"{text} [{mean - half:.4f}, {mean + half:.4f}]"


def plot(args, base: dict, results: dict, out: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keys = [(key, title) for key, title, _ in columns(args, base)]
    figure = Figure(figsize=(4 * len(keys), 3.6), dpi=90)
    FigureCanvasAgg(figure)
    for axes, (key, title) in zip(figure.subplots(1, len(keys)), keys):
        for x, method in enumerate(args.methods):
            values = [m.get(key) for m in results.get(method, {}).values() if isinstance(m.get(key), (int, float))]
            if values:
                axes.bar(x, statistics.fmean(values), color=f"C{x}", alpha=0.6)
                axes.plot([x] * len(values), values, "ko", markersize=4)
        if isinstance(base.get(key), (int, float)):
            axes.axhline(base[key], linestyle="--", color="gray", label="base")
            axes.legend(fontsize="small")
        axes.set_xticks(range(len(args.methods)), args.methods)
        axes.set_title(title)
    figure.tight_layout()
    figure.savefig(out / "metrics.png")

    figure = Figure(figsize=(12, 3.6), dpi=90)
    FigureCanvasAgg(figure)
    for axes, method in zip(figure.subplots(1, len(args.methods)), args.methods):
        for seed in args.seeds:
            log = out / f"{method}_seed{seed}" / "metrics.jsonl"
            if not log.is_file():
                continue
            rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
            rows = [row for row in rows if "loss/ce" in row]  # every method logs the CE of its step's chunks
            axes.plot([row["step"] for row in rows], [row["loss/ce"] for row in rows], marker="o", label=f"seed {seed}")
        axes.set_title(f"{method}: CE of the step's training chunks")
        axes.set_xlabel("step")
        axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(out / "training.png")


def main(argv=None) -> int:
    args = parse_args(argv)
    runner = Runner(args)
    runner.out.mkdir(parents=True, exist_ok=True)
    data = prepare_data(args, runner)
    base = evaluate(args, runner, data, args.load, "base")
    results: dict = {}
    for seed in args.seeds:
        for method in args.methods:
            checkpoint = train(args, runner, data, method, seed)
            results.setdefault(method, {})[seed] = evaluate(args, runner, data, str(checkpoint), f"{method}_seed{seed}")
    table = summarize(args, base, results)
    (runner.out / "results.json").write_text(json.dumps({"base": base, "runs": results, "settings": vars(args)},
                                                        indent=1))
    minutes = (time.monotonic() - runner.started) / 60
    skipped = runner.jobs_done - runner.jobs_run
    took = f"{minutes:.0f} min" + (f" ({skipped} jobs done earlier were skipped)" if skipped else "")
    (runner.out / "results.md").write_text(
        f"{table}\n\nmean [95% interval over seeds {args.seeds}, Student's t]; base: its value (standard error over "
        f"the evaluation's chunks, blocks or tasks); a difference's SE: paired over the same chunks, blocks or tasks "
        f"(mean over seeds), and unpaired, sqrt(SE_a^2 + SE_b^2); {args.steps} steps per run; {took}\n")
    plot(args, base, results, runner.out)
    print(table)
    print(f"[replicate] done in {minutes:.0f} min: {runner.out}/results.md, metrics.png, training.png", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
