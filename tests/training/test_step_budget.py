"""What a training step asks of a GPU's host, held as counts (benchmarks/step_counts.py: the real
trainer at the GPU validation's layout, P=1024, 8 chunks a step in micro-batches of 2, selective
recompute, bf16, 28 layers, at a tiny width, under the device guard, so the GPU path is counted).

Before these budgets an SFT step launched 18,971 kernels and waited on the host 233 times: a
norm kernel and a read-back per parameter in the optimizer, eight-kernel norms recomputed in
backward, a float() per loss term, a finiteness check per gradient buffer, a wait at every timed
phase. A step now reads its figures from the device once (training.step.read_figures), and the
number of waits does not grow with the micro-batches."""

import json
import subprocess
import sys

from tests.test_benchmarks import BENCHMARKS, ROOT, offline_guarded_env

SFT_KERNELS = 9_000
SFT_SYNCS = 4  # the one read, the step's end, megatron's gradient-reduction set-up
EBFT_SYNCS_OUTSIDE_ROLLOUTS = 8  # the same, and the rewards' SVD (once a step)


def step_counts(tmp_path, *flags) -> dict:
    out = tmp_path / "counts.json"
    env = offline_guarded_env(tmp_path)
    result = subprocess.run([sys.executable, str(BENCHMARKS / "step_counts.py"), *flags, "--json", str(out)], env=env,
                            cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


def test_an_sft_step_launches_under_9000_kernels_and_waits_a_fixed_number_of_times(tmp_path):
    pairs = step_counts(tmp_path, "--modes", "sft")["sft"]
    singles = step_counts(tmp_path, "--modes", "sft", "--micro-batch", "1")["sft"]  # 8 micro-batches, not 4
    total = pairs["total"]
    assert total["kernels"] <= SFT_KERNELS, total["kernels"]
    assert total["syncs"] <= SFT_SYNCS, total["sync_sites"]
    assert singles["total"]["syncs"] == total["syncs"], (singles["total"]["sync_sites"], total["sync_sites"])
    assert singles["total"]["kernels"] > total["kernels"]  # the per-micro-batch work does grow


def test_an_ebft_step_waits_at_most_8_times_outside_its_rollouts(tmp_path):
    counts = step_counts(tmp_path, "--modes", "ebft", "--warmup-steps", "0")["ebft"]
    assert {"rollouts", "features", "rewards", "forward_backward", "optimizer"} <= set(counts)
    outside_rollouts = counts["total"]["syncs"] - counts["rollouts"]["syncs"]
    assert outside_rollouts <= EBFT_SYNCS_OUTSIDE_ROLLOUTS, counts["total"]["sync_sites"]
    assert counts["rewards"]["syncs"] <= 1, counts["rewards"]["sync_sites"]  # one SVD for the step's micro-batches
