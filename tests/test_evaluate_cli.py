"""The evaluate entry point on a tiny checkpoint: report files and metrics, and a clear error."""

import json
import subprocess
import sys
from pathlib import Path

from tests.training.common import make_code_folder

ROOT = Path(__file__).resolve().parents[1]


def test_evaluate_writes_the_report(tiny_models, tmp_path):
    code = make_code_folder(tmp_path / "code")
    out = tmp_path / "report"
    overrides = [f"data.path={code}", "data.validation_fraction=0.3", "rollout.chunk_len=32", "rollout.first_anchor=4",
                 "rollout.stride=4", "rollout.rollout_len=4", "rollout.num_samples=3", "eval.cfm_chunks=3"]
    # two data-parallel replicas, each evaluating its share of the chunks
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "ebft_megatron.evaluate", "--load", str(tiny_models["qwen2"][1]),
                          "--out", str(out), "--humaneval", "2", "--humaneval-max-new-tokens", "4", *overrides],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    printed = json.loads(run.stdout[run.stdout.index("{"):])
    humaneval = json.loads((out / "humaneval.json").read_text())
    assert humaneval["humaneval/pass@1"] == 0.0  # 4 random tokens of a tiny random model solve nothing
    assert printed["eval/ce"] > 0 and printed == {**metrics["metrics"], **humaneval}
    assert metrics["cfm_by_length"]["lengths"] == [1, 2, 3, 4]
    lines = (out / "cfm_by_length.csv").read_text().splitlines()
    assert lines[0].startswith("length,cfm") and len(lines) == 1 + 4
    assert (out / "cfm_by_length.png").stat().st_size > 1000
    # every chunk's CE and every (chunk, block) group's CFM, from both replicas, behind the pooled means
    items = json.loads((out / "items.json").read_text())
    assert sorted(items) == ["eval/ce", "eval/cfm"]
    chunks = {int(name.split("/")[0]) for name in items["eval/cfm"]}
    assert chunks == {0, 1, 2} and metrics["cfm_by_length"]["groups"] == len(items["eval/cfm"])
    assert abs(sum(items["eval/cfm"].values()) / len(items["eval/cfm"]) - printed["eval/cfm"]) < 1e-9
    assert sorted(map(int, items["eval/ce"])) == list(range(len(items["eval/ce"]))) and len(items["eval/ce"]) >= 3
    bad = subprocess.run([sys.executable, "-m", "ebft_megatron.evaluate", "--load", str(tmp_path / "missing"),
                          "--out", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error:") and "Traceback" not in bad.stderr
