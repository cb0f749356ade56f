"""benchmarks/gpu_validation.py, the one command that prints the GPU figures, runs its stages end
to end on CPU with a tiny model (TE stages report themselves skipped)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_stage_reports_a_figure(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_validation.py"), "--out", str(tmp_path),
                             "--tiny"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads((tmp_path / "gpu_validation.json").read_text())
    assert figures["environment"]["te_usable"] is False
    assert figures["te_vs_local_logits_bf16"].startswith("skipped")
    attention = figures["block_attention"]
    assert attention["device"] == "cpu"
    for name in ("out", "dq", "dk", "dv"):  # the fused kernels against the dense reference
        assert attention["float32"][f"{name}_max_rel_diff"] < 1e-5
        assert attention["bfloat16"][f"{name}_max_rel_diff"] < 5e-2
    for mode in ("sft", "ebft"):
        run = figures[f"{mode}_float32"]
        assert run["step_time_s"] > 0 and run["tokens_per_s"] > 0
        assert len(json.loads((tmp_path / f"losses_{mode}_none_float32.json").read_text())) == 2
    ratio = figures["ebft_over_sft_step_time_float32"]
    assert ratio == round(figures["ebft_float32"]["step_time_s"] / figures["sft_float32"]["step_time_s"], 3)
