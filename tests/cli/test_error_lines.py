"""A user error under torchrun reaches the console as one line, whichever rank meets it first.

torchrun stops every rank as soon as one exits, so an error printed by rank 0 alone was lost when
another rank got there first (a cluster's ranks start seconds apart). Each launch here holds rank
0 back on purpose: for a settings error every rank meets (rank 1 first), and for an error that
rank 1 alone meets (a bad data line in its shard), under train, evaluate and generate."""

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAYOUT_ERROR = "is not divisible by stride=7"
SHARD_ERROR = "shard.jsonl:3: the record has no 'text' field"


def launch(*args) -> subprocess.CompletedProcess:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           str(ROOT / "tests" / "cli" / "error_launch.py"), *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)


def project_traceback(result) -> bool:
    """Whether a traceback shows a frame of the project or megatron (torchrun's own report of the
    failed child is not ours to change)."""
    return re.search(r'File "[^"]*(ebft_megatron|megatron/core)/', result.stderr) is not None


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")]


BAD_LAYOUT = ["rollout.chunk_len=48", "rollout.first_anchor=4", "rollout.rollout_len=4", "rollout.stride=7"]


def tools(checkpoint, code):
    return {
        "train": ["ebft_megatron.train", f"model.load={checkpoint}", f"data.path={code}", "parallel.tp=2"],
        "evaluate": ["ebft_megatron.evaluate", "--load", checkpoint, "--out", code.parent / "report", f"data.path={code}",
                     "parallel.tp=2"],
        "generate": ["ebft_megatron.generate", "--load", checkpoint, "--prompt", "def f():", "--tp", "2"],
    }


@pytest.fixture(scope="module")
def setup(tiny_models, tmp_path_factory):
    from tests.training.common import make_code_folder

    code = make_code_folder(tmp_path_factory.mktemp("errors") / "code")
    return tiny_models["llama"][1], code


@pytest.mark.parametrize("tool", ["train", "evaluate"])
def test_a_settings_error_is_one_line_when_rank0_is_slow(setup, tool):
    result = launch("--delay-rank0", 4, *tools(*setup)[tool], *BAD_LAYOUT)
    lines = error_lines(result)
    assert len(lines) == 1 and LAYOUT_ERROR in lines[0], result.stderr[-3000:]
    assert "exitcode  : 2" in result.stderr and not project_traceback(result)


def test_a_generate_error_is_one_line_when_rank0_is_slow(setup, tmp_path):
    missing = tmp_path / "no_checkpoint"
    args = tools(*setup)["generate"]
    args[args.index("--load") + 1] = missing
    result = launch("--delay-rank0", 4, *args)
    lines = error_lines(result)
    assert len(lines) == 1 and str(missing) in lines[0], result.stderr[-3000:]


@pytest.mark.parametrize("tool, after_init", [("train", False), ("evaluate", False), ("generate", False),
                                              ("train", True)])
def test_an_error_only_one_rank_meets_is_one_line(setup, tool, after_init):
    result = launch("--delay-rank0", 2, "--fail-rank1", SHARD_ERROR, *(["--after-init"] if after_init else []),
                    *tools(*setup)[tool])
    lines = error_lines(result)
    assert lines == [f"error: {SHARD_ERROR}"], result.stderr[-3000:]
    assert "exitcode  : 2" in result.stderr and not project_traceback(result)
