"""End-to-end EBFT/SFT training under torchrun: a 2-process launch (PP2 and DP2) and a 4-process
launch (TP2 x PP2, a resume of the DP2 checkpoint at TP2 x PP2, and a mixture of experts at
TP2 x EP2), both under the device guard. See launch.py."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def torchrun(nproc: int, phase: str, work: Path, checkpoint: Path, moe_checkpoint: Path) -> dict:
    with socket.socket() as sock:  # torchrun's static rendezvous needs a concrete free port
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}",
           str(ROOT / "tests" / "training" / "launch.py"), "--phase", phase, "--work", str(work),
           "--checkpoint", str(checkpoint), "--moe-checkpoint", str(moe_checkpoint)]
    # under the device guard: every tensor where a GPU run would hold it (tests/runtime)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), EBFT_DEVICE_GUARD="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-6000:])
    return json.loads((work / f"{phase}.json").read_text())


@pytest.fixture(scope="module")
def runs(tiny_models, tmp_path_factory):
    from tests.training.common import make_code_folder

    work = tmp_path_factory.mktemp("distributed_training")
    make_code_folder(work / "code")
    checkpoint, moe = tiny_models["llama"][1], tiny_models["qwen3_moe"][1]
    first = torchrun(2, "first", work, checkpoint, moe)
    second = torchrun(4, "second", work, checkpoint, moe)
    print(json.dumps({"first": first, "second": second}, indent=1))
    return {**first, **second}


@pytest.mark.parametrize("run", ["ebft_pp2", "ebft_tp2pp2", "ebft_moe_tp2ep2"])
def test_ebft_training_lowers_validation_cross_entropy(runs, run):
    result = runs[run]
    assert len(result["losses"]) == 6 and all(abs(loss) < 1e3 for loss in result["losses"])
    assert result["ce_after"] < result["ce_before"] - 0.05


def test_resume_at_another_layout_continues_the_same_run(runs):
    dp2, resumed = runs["sft_dp2"], runs["sft_resumed_tp2pp2"]
    assert dp2["dp"] == 2 and resumed["dp"] == 1 and resumed["start"] == 2
    assert set(resumed["losses"]) == {"3", "4"}
    for step in ("3", "4"):
        assert abs(resumed["losses"][step] - dp2["losses"][step]) < 1e-5
    assert dp2["losses"]["4"] < dp2["losses"]["1"]


def test_a_mixture_of_experts_logs_its_load_balancing_loss_and_evaluates_before_and_after(runs):
    moe = runs["ebft_moe_tp2ep2"]
    assert len(moe["load_balancing"]) == 6 and all(1.0 <= value < 2.0 for value in moe["load_balancing"])
    assert moe["cfm_after"] >= 0 and any(name.endswith(".csv") for name in moe["report"])
