"""benchmarks/gpu_validation.py, the one command that prints the GPU figures, runs its stages end
to end on CPU with a tiny model under the device guard (TE stages report themselves skipped); a
stage that fails is recorded with its error while the others still report, the command then exits
non-zero, and ``--stages`` reruns one stage keeping the others' figures."""

import json
import subprocess
import sys
from pathlib import Path

from tests.test_benchmarks import offline_guarded_env

ROOT = Path(__file__).resolve().parents[1]


def validate(out: Path, *flags: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_validation.py"), "--out", str(out), "--tiny",
                           *flags], capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**offline_guarded_env(out), **env})


def figures_of(out: Path) -> dict:
    return json.loads((out / "gpu_validation.json").read_text())


def test_every_stage_reports_a_figure(tmp_path):
    result = validate(tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = figures_of(tmp_path)
    assert figures["environment"]["te_usable"] is False
    assert figures["model"]["shape"]["layers"] == 4
    assert figures["te_vs_local_logits_bf16"].startswith("skipped")
    attention = figures["block_attention"]
    assert attention["device"] == "cuda:0"  # the guard's emulated GPU: the run's device
    for name in ("out", "dq", "dk", "dv"):  # the fused kernels against the dense reference
        for batch in ("", "_micro_batch_2"):
            assert attention[f"float32{batch}"][f"{name}_max_rel_diff"] < 1e-5
            assert attention[f"bfloat16{batch}"][f"{name}_max_rel_diff"] < 5e-2
    assert attention["bfloat16_micro_batch_2"]["finite"] is True
    for mode in ("sft", "ebft"):
        run = figures[f"{mode}_float32"]
        assert run["step_time_s"] > 0 and run["tokens_per_s"] > 0
        assert len(json.loads((tmp_path / f"losses_{mode}_none_float32.json").read_text())) == 2
    ratio = figures["ebft_over_sft_step_time_float32"]
    assert ratio == round(figures["ebft_float32"]["step_time_s"] / figures["sft_float32"]["step_time_s"], 3)


def test_a_failed_stage_is_recorded_and_rerun_alone(tmp_path):
    failed = validate(tmp_path, GPU_VALIDATION_FAIL="sft")  # the test-only injected failure
    assert failed.returncode == 1, failed.stderr[-3000:]
    figures = figures_of(tmp_path)
    error = figures["sft_float32"]
    assert error["error"].startswith("RuntimeError: failure injected into stage sft")
    assert error["traceback"][-1] == error["error"]
    # the stages after the failed one still ran and reported; no ratio without the SFT run
    assert figures["ebft_float32"]["step_time_s"] > 0
    assert "ebft_over_sft_step_time_float32" not in figures
    assert figures["block_attention"]["float32"]["out_max_rel_diff"] < 1e-5

    rerun = validate(tmp_path, "--stages", "sft")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    again = figures_of(tmp_path)
    assert again["sft_float32"]["step_time_s"] > 0
    for kept in ("environment", "model", "block_attention", "te_vs_local_logits_bf16", "ebft_float32"):
        assert again[kept] == figures[kept]  # not run again: the first run's figures, as they were
    assert "[gpu-validation] ebft_float32" not in rerun.stdout
    assert again["ebft_over_sft_step_time_float32"] == round(
        again["ebft_float32"]["step_time_s"] / again["sft_float32"]["step_time_s"], 3)
