"""The benchmarks under benchmarks/ at a tiny size: step.py, memory.py and rollouts.py with
``--random-weights`` (SmolLM2-135M's shape cut to 4 layers, P=64, C=s=G=8, n=4), each in its own
process under the device guard (``EBFT_DEVICE_GUARD=1``: the run's device is an emulated GPU, and a
tensor left on the host where a GPU run needs it fails the run) and with every model source shut:
the Hugging Face hub offline, empty caches, no package index (so SmolLM2's download would fail).
Each must exit 0 and write a real figure to its --json; step.py and rollouts.py run with --count, and
their counts of ops, kernels and host syncs by phase must be there. And every script answers --help."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
TINY = ["--random-weights", "--layers", "4", "--chunk-len", "64", "--first-anchor", "8", "--stride", "8",
        "--rollout-len", "8", "--num-samples", "4"]
SMOLLM2_VOCAB = 49152
SCRIPTS = sorted(path.name for path in BENCHMARKS.glob("*.py") if "__main__" in path.read_text())  # not common.py


def offline_guarded_env(root: Path) -> dict:
    """The environment of a guarded run that can download nothing: caches are empty folders under
    ``root``, the hub and transformers are offline and pip has no index."""
    return dict(os.environ, EBFT_DEVICE_GUARD="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PIP_NO_INDEX="1",
                HF_HOME=str(root / "hf_home"), XDG_CACHE_HOME=str(root / "xdg_cache"),
                EBFT_CACHE_DIR=str(root / "ebft_cache"), PYTHONPATH=str(ROOT))


@pytest.fixture(scope="session")
def offline_env(tmp_path_factory):
    """That environment, with the tiny random-weight model the benchmarks' flags ask for made once in
    its cache (the benchmarks find it there)."""
    env = offline_guarded_env(tmp_path_factory.mktemp("offline_benchmarks"))
    make = "import sys; sys.path.insert(0, 'benchmarks'); import common; common.smollm2_random_checkpoint(4)"
    made = subprocess.run([sys.executable, "-c", make], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr[-3000:]
    return env


def run_benchmark(script: str, flags: list, env: dict, out: Path):
    result = subprocess.run([sys.executable, str(BENCHMARKS / script), *flags, "--json", str(out)], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


def assert_counted(counts: dict, phases: set) -> None:
    """``--count``'s figures (``LaunchCounter.as_dict()``): the phases asked for, each with ops and
    kernels, and a total that holds them all, its syncs told by kind (none is a fine number: this
    checks the plumbing, not a budget)."""
    assert phases <= set(counts), sorted(counts)
    for phase in phases:
        assert counts[phase]["ops"] > 0 and counts[phase]["kernels"] > 0, (phase, counts[phase])
    total = counts["total"]
    assert total["ops"] >= sum(counts[phase]["ops"] for phase in phases)
    assert sum(total["sync_kinds"].values()) == total["syncs"]


def assert_untrained_ce(loss: float) -> None:
    """Random weights predict about uniformly: the cross entropy is near ln(vocabulary)."""
    assert abs(loss - math.log(SMOLLM2_VOCAB)) < 0.5, loss


def test_step_benchmark_runs_on_the_device_without_downloads(offline_env, tmp_path):
    figures = run_benchmark("step.py", [*TINY, "--count"], offline_env, tmp_path / "step.json")
    assert figures["device"] == "cuda:0" and figures["layers"] == 4  # the guard's GPU, the tiny model
    assert_untrained_ce(figures["losses"]["sft"]["loss"])
    assert_untrained_ce(figures["losses"]["ebft"]["loss/ce"])
    assert {"rollouts", "features", "rewards", "forward_backward", "optimizer"} <= set(figures["ebft_phases_s"])
    # the counted steps, by the trainer's phases
    assert_counted(figures["counts_per_step"]["sft"], {"forward_backward", "optimizer"})
    assert_counted(figures["counts_per_step"]["ebft"], {"rollouts", "features", "rewards", "forward_backward",
                                                        "optimizer"})
    assert figures["flop_ratio"]["ours_vs_sft"] < figures["flop_ratio"]["reference_vs_sft"]


def test_step_benchmark_runs_a_mixture_of_experts(offline_env, tmp_path):
    """--experts: the random-weight model is a Mixtral of the same shape; both steps log its
    load-balancing loss (about 1 for a router that spreads tokens evenly, E / k at worst)."""
    figures = run_benchmark("step.py", [*TINY, "--experts", "4"], offline_env, tmp_path / "step.json")
    assert_untrained_ce(figures["losses"]["sft"]["loss"])
    for mode in ("sft", "ebft"):
        assert 1.0 <= figures["losses"][mode]["loss/load_balancing"] < 2.0
    assert figures["measured_ratio"] > 0


def test_memory_benchmark_runs_on_the_device_without_downloads(offline_env, tmp_path):
    results = run_benchmark("memory.py", [*TINY, "--recompute", "selective", "--lora-rank", "4"], offline_env,
                            tmp_path / "memory.json")
    assert [(r["mode"], r["lora_rank"]) for r in results] == [("sft", 0), ("ebft", 0), ("ebft", 4)]
    for result in results:
        assert result["device"] == "cuda:0"
        # the step's peak resident set holds the process before the model (the baseline) and more
        assert result["step_peak"] > result["baseline"] > 0
        assert result["predicted"] > result["baseline"]
    assert_untrained_ce(results[0]["loss"])


def test_rollouts_benchmark_runs_on_the_device_without_downloads(offline_env, tmp_path):
    figures = run_benchmark("rollouts.py", [*TINY, "--count"], offline_env, tmp_path / "rollouts.json")
    assert figures["settings"]["device"] == "cuda:0" and figures["settings"]["layers"] == 4
    assert figures["settings"]["num_blocks"] == 7
    # the engine and the full recompute draw from the same random numbers: the same tokens (but
    # where a number falls within rounding of a step of the distribution)
    assert figures["same_token_fraction"] > 0.9
    assert figures["flops_real_pair_decode"]["ratio"] > 1
    # one counted generation of each method, by phase
    counts = figures["counts_per_generation"]
    assert_counted(counts["ours"], {"prefill", "decode", "sampling"})
    assert_counted(counts["recompute"], {"full_forward", "sampling"})
    assert figures["decode_steps_per_generation"] == 7


def test_rollouts_benchmark_runs_the_engine_in_bf16(offline_env, tmp_path):
    """The GPU's bf16 run, at a tiny size (graphs off here: on a CPU there are none to take)."""
    figures = run_benchmark("rollouts.py", [*TINY, "--dtype", "bfloat16", "--cuda-graphs", "off", "--skip-recompute"],
                            offline_env, tmp_path / "rollouts_bf16.json")
    assert figures["settings"]["dtype"] == "bfloat16" and figures["settings"]["cuda_graphs"] == "off"
    assert figures["ours_tokens_per_s"] > 0 and "recompute_seconds" not in figures


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_benchmark_answers_help(script):
    result = subprocess.run([sys.executable, str(BENCHMARKS / script), "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("usage:")
