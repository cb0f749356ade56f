#!/usr/bin/env python
"""Choosing the embedded default's settings: for each candidate and seed, the quickstart's training
run (2 processes, 1 thread each) with the evaluation fixed below, its wall time, and the held-out
CFM's and CE's changes with their paired standard errors (the run's eval/change.json).

  python benchmarks/default_sweep.py --candidates lr1e-4_dp2 --seeds 1        # screen one setting
  python benchmarks/default_sweep.py --candidates lr1e-4_dp2 --seeds 1 2 3    # confirm it
  python benchmarks/default_sweep.py --table                                  # every trial so far

The evaluation protocol is fixed here, before any candidate is tried, and every candidate gets it:
the first 8 validation chunks of the quickstart's data (P=256, the training layout: anchors from 8
every 8 tokens, n=4 rollouts of G=8 tokens at T=0.6), before training and after it, from the same
sampling seed. A trial passes when the CFM falls by more than 2 standard errors of its paired
change (over the (chunk, block) groups) and the CE does not rise by more than 1 standard error of
its paired change (over the chunks). A candidate passes when all of its 3 seeds pass and each run,
plus the quickstart's setup (about 20 s warm), takes at most 10 minutes on 2 cores.

Each trial runs in its own processes, one at a time; trials whose change.json exists are skipped,
so a stopped sweep resumes. Results: OUT/<candidate>/seed<k>/ (the run, its log, trial.json) and
OUT/sweep.md (the table).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ebft_megatron.evaluation.statistics import t_interval  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "ebft_smollm2_stdlib.yaml"
EVALUATION = ["eval.ce_chunks=8", "eval.cfm_chunks=8", "eval.temperature=0.6", "eval.before_and_after=true"]
SETUP_SECONDS = 20  # tools/setup_env.sh and tools/prepare_smollm2.py with a warm cache: what a trial does not run
BUDGET_SECONDS = 600
# name -> (what it changes against the quickstart file, overrides)
DP2 = ["parallel.pp=1", "model.recompute=none"]  # 2 data-parallel replicas instead of 2 pipeline stages
CANDIDATES = {
    "lr1e-4_dp2_s8": ("lr 1e-4, 8 steps, DP=2", [*DP2, "optimizer.lr=1e-4", "train.steps=8"]),
    "lr3e-4_dp2_s8": ("lr 3e-4, 8 steps, DP=2", [*DP2, "optimizer.lr=3e-4", "train.steps=8"]),
    "lr1e-3_dp2_s8_nowhiten": ("lr 1e-3, 8 steps, DP=2, no whitening",
                               [*DP2, "optimizer.lr=1e-3", "train.steps=8", "objective.whiten=false"]),
    "lr3e-5_dp2_s10": ("lr 3e-5, 10 steps, DP=2", [*DP2, "optimizer.lr=3e-5", "train.steps=10"]),
    # alpha = beta = 1 without whitening: the reward whose REINFORCE gradient is the evaluated CFM's own
    "lr3e-5_dp2_s10_beta1_nowhiten": ("lr 3e-5, 10 steps, DP=2, diversity coefficient 1, no whitening",
                                      [*DP2, "optimizer.lr=3e-5", "train.steps=10", "objective.diversity_coef=1.0",
                                       "objective.whiten=false"]),
    "lr1e-4_dp2_s8_ce1": ("lr 1e-4, 8 steps, DP=2, CE coefficient 1 (instead of 0.03)",
                          [*DP2, "optimizer.lr=1e-4", "train.steps=8", "objective.ce_coef=1.0"]),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/sweep", help="output folder (default runs/sweep)")
    parser.add_argument("--candidates", nargs="+", default=[], choices=sorted(CANDIDATES),
                        help="settings to run (default: none, only the table)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="training seeds (default 1 2 3)")
    parser.add_argument("--load", default=str(Path.home() / ".cache/ebft_megatron/smollm2/mcore"),
                        help="the starting checkpoint (default: tools/prepare_smollm2.py's)")
    parser.add_argument("--table", action="store_true", help="print the table of every trial so far")
    args = parser.parse_args(argv)
    if args.candidates and not Path(args.load).is_dir():
        parser.error(f"--load {args.load}: no checkpoint there; run tools/prepare_smollm2.py first")
    return args


def run_trial(args, out: Path, name: str, seed: int) -> dict:
    trial_dir = out / name / f"seed{seed}"
    record = trial_dir / "trial.json"
    if record.is_file():
        return json.loads(record.read_text())
    trial_dir.mkdir(parents=True, exist_ok=True)
    overrides = [f"model.load={args.load}", *CANDIDATES[name][1], *EVALUATION, f"train.seed={seed}",
                 f"train.save={trial_dir / 'run'}", "train.wandb=disabled"]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "ebft_megatron.train",
               "--config", str(CONFIG), *overrides]
    print(f"[sweep] {name} seed {seed}: {' '.join(CANDIDATES[name][1]) or '(the file)'}", flush=True)
    began = time.monotonic()
    with open(trial_dir / "train.log", "w") as log:
        result = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)))
    wall = time.monotonic() - began
    if result.returncode:
        sys.exit(f"[sweep] {name} seed {seed} failed (exit {result.returncode}); see {trial_dir / 'train.log'}")
    change = json.loads((trial_dir / "run" / "eval" / "change.json").read_text())
    trial = {"candidate": name, "seed": seed, "overrides": CANDIDATES[name][1], "wall_s": round(wall, 1),
             "cfm": change["cfm"], "ce": change["ce"], "passes": passes(change)}
    record.write_text(json.dumps(trial, indent=1))
    print(f"[sweep]    {wall:.0f} s: {describe(trial)}", flush=True)
    return trial


def passes(change: dict) -> bool:
    cfm, ce = change["cfm"], change["ce"]
    return cfm["change"] < -2 * cfm["error"] and ce["change"] <= ce["error"]


def describe(trial: dict) -> str:
    cfm, ce = trial["cfm"], trial["ce"]
    return (f"CFM {cfm['before']:.4f} -> {cfm['after']:.4f} ({cfm['change']:+.4f} +- {cfm['error']:.4f}), "
            f"CE {ce['before']:.4f} -> {ce['after']:.4f} ({ce['change']:+.4f} +- {ce['error']:.4f}): "
            + ("passes" if trial["passes"] else "fails"))


def parts_of_the_change(run: Path) -> tuple[float, float]:
    """The changes of the CFM's two parts between the first and last evaluation of a run: the
    alignment 2a (up is closer to the ground truth) and the diversity 2d (up is samples more alike);
    with unit features CFM = 1 - 2a + 2d/2."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"eval/cfm"' in line]
    first, last = rows[0], rows[-1]
    return last["eval/alignment"] - first["eval/alignment"], last["eval/diversity"] - first["eval/diversity"]


def table(out: Path) -> str:
    paths = sorted(out.glob("*/seed*/trial.json"))
    trials = [json.loads(path.read_text()) for path in paths]
    lines = ["| candidate | settings | seed | run s | CFM before -> after | CFM change +- SE | 2a change | 2d change | "
             "CE change +- SE | passes |", "|---|---|---|---|---|---|---|---|---|---|"]
    for path, trial in zip(paths, trials):
        cfm, ce = trial["cfm"], trial["ce"]
        alignment, diversity = parts_of_the_change(path.parent / "run")
        lines.append(f"| {trial['candidate']} | {CANDIDATES.get(trial['candidate'], ('?',))[0]} | {trial['seed']} | "
                     f"{trial['wall_s']:.0f} | {cfm['before']:.4f} -> {cfm['after']:.4f} | "
                     f"{cfm['change']:+.4f} +- {cfm['error']:.4f} | {alignment:+.4f} | {diversity:+.4f} | "
                     f"{ce['change']:+.4f} +- {ce['error']:.4f} | {'yes' if trial['passes'] else 'no'} |")
    by_candidate: dict[str, list] = {}
    for trial in trials:
        by_candidate.setdefault(trial["candidate"], []).append(trial)
    lines.append("")
    for name, runs in by_candidate.items():
        walls = [run["wall_s"] + SETUP_SECONDS for run in runs]
        verdict = ("passes" if len(runs) >= 3 and all(run["passes"] for run in runs) and max(walls) <= BUDGET_SECONDS
                   else "does not pass")
        lines.append(f"- {name}: {sum(run['passes'] for run in runs)} of {len(runs)} seeds pass; CFM change "
                     f"{over_seeds([run['cfm']['change'] for run in runs])}, CE change "
                     f"{over_seeds([run['ce']['change'] for run in runs])}; longest run with setup "
                     f"{max(walls):.0f} s: {verdict}")
    return "\n".join(lines)


def over_seeds(values: list[float]) -> str:
    """The mean over seeds, with its 95% interval (Student's t) when there are several."""
    mean, half = t_interval(values)
    if len(values) < 2:
        return f"{mean:+.4f} (1 seed)"
    return f"{mean:+.4f} [{mean - half:+.4f}, {mean + half:+.4f}] over {len(values)} seeds"


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    for name in args.candidates:
        for seed in args.seeds:
            run_trial(args, out, name, seed)
    text = table(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
