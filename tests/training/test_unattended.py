"""A job that loses a process comes back by itself, and a job with a stopped process ends instead
of hanging: torchrun's restarts with the trainer's resume, and the stall watchdog."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ebft_megatron.runtime.timing import PhaseTimer
from ebft_megatron.runtime.watchdog import Watchdog
from tests.training.common import make_code_folder, tiny_overrides

ROOT = Path(__file__).resolve().parents[2]


# --- the watchdog on its own -------------------------------------------------------------------
def watch(timeout_s: float):
    stalls = []
    dog = Watchdog(timeout_s, rank=5, poll_s=0.02, on_stall=stalls.append).start()
    return dog, stalls


def test_beats_keep_the_watchdog_quiet_and_silence_ends_the_process():
    dog, stalls = watch(0.3)
    try:
        timer = PhaseTimer()
        for _ in range(8):  # 0.8 s of steps whose phases each take 0.1 s: progress all along
            with timer.phase("rollouts"):
                time.sleep(0.1)
        assert stalls == []
        dog.beat("forward_backward", step=7)
        time.sleep(0.6)  # then nothing
        assert len(stalls) == 1
        assert stalls[0].startswith("rank 5: no progress for 0 s (train.timeout_minutes) at step 7, phase "
                                    "forward_backward")
    finally:
        dog.close()


def test_the_phase_timer_reports_its_phases():
    dog, stalls = watch(0.2)
    try:
        with PhaseTimer().phase("features"):
            time.sleep(0.4)  # one phase that takes longer than the timeout
        assert stalls and "phase features" in stalls[0]
    finally:
        dog.close()


# --- under torchrun ----------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(args: list[str], restarts: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           f"--max-restarts={restarts}", "--monitor-interval=0.5", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 600) -> str:
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return log.read_text()


@pytest.fixture(scope="module")
def job(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("unattended")
    return tiny_models["llama"][1], make_code_folder(root / "code"), root


def test_a_killed_worker_is_restarted_and_the_run_ends_as_if_uninterrupted(job):
    """TP2, 6 steps, a checkpoint every 2: rank 1 dies (SIGKILL) as it starts step 5; torchrun
    restarts both processes, which resume from step 4 and finish. The final weights equal an
    uninterrupted run's bit for bit."""
    ckpt, code, root = job
    results = {}
    for name, fault in (("straight", []), ("killed", ["--kill-rank", "1", "--kill-before-step", "5"])):
        out = root / name
        out.mkdir()
        overrides = tiny_overrides(ckpt, code, out / "run", steps=6, **{
            "parallel.tp": 2, "eval.before_and_after": "false", "train.tensorboard": "false"})
        log = root / f"{name}.log"
        started = time.monotonic()
        text = finish(torchrun([str(ROOT / "tests/training/unattended_launch.py"), "--out", str(out), *fault, "--",
                                *overrides], restarts=1, log=log), log)
        results[name] = [torch.load(out / f"params_rank{rank}.pt") for rank in range(2)]
        print(f"{name}: {time.monotonic() - started:.1f} s")
        if fault:
            assert "rank 1: SIGKILL at the start of step 5" in text, text[-4000:]
            assert "resumed from" in text and "step_000004 at step 4" in text, text[-4000:]
    for rank in range(2):
        straight, killed = results["straight"][rank], results["killed"][rank]
        assert straight["step"] == killed["step"] == 6
        assert straight["params"].keys() == killed["params"].keys()
        for name, value in straight["params"].items():
            assert torch.equal(value, killed["params"][name]), (rank, name)


def worker_of_rank(launcher_pid: int, rank: int):
    import psutil

    for child in psutil.Process(launcher_pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "ebft_megatron.train" in " ".join(child.cmdline()):
                return child
        except psutil.Error:
            continue
    return None


def test_a_stopped_rank_ends_the_job_within_the_timeout(job):
    """Rank 1 is stopped (SIGSTOP) mid-run; rank 0 reports the stall, naming both ranks and its
    phase, and the job exits non-zero within the timeout (plus the watchdog's polling)."""
    ckpt, code, root = job
    timeout_s = 30
    save = root / "stall"
    overrides = tiny_overrides(ckpt, code, save, steps=500, **{
        "parallel.tp": 2, "eval.before_and_after": "false", "train.save_interval": 0,
        "train.timeout_minutes": timeout_s / 60, "train.tensorboard": "false"})
    log = root / "stall.log"
    proc = torchrun(["-m", "ebft_megatron.train", *overrides], restarts=0, log=log)
    stopped = None
    try:
        metrics = save / "metrics.jsonl"
        deadline = time.monotonic() + 300
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.2)
        stopped = worker_of_rank(proc.pid, 1)
        assert stopped is not None
        stopped.send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        while "no progress for" not in log.read_text():
            assert time.monotonic() - stopped_at < timeout_s + 30, log.read_text()[-4000:]
            time.sleep(0.2)
        reported_after = time.monotonic() - stopped_at
        proc.wait(timeout=60)
        exited_after = time.monotonic() - stopped_at
    finally:
        if stopped is not None and stopped.is_running():
            stopped.send_signal(signal.SIGKILL)
        text = finish(proc, log, timeout=60)
    print(f"stall reported {reported_after:.1f} s and the job ended {exited_after:.1f} s after SIGSTOP")
    assert proc.returncode != 0
    line = next(line for line in text.splitlines() if "no progress for" in line)
    assert line.startswith("error: rank 0: no progress for") and "rank 1 not responding" in line, line
    assert "phase " in line and "exiting so that the job can restart" in line
    assert timeout_s - 1 < reported_after < timeout_s + 10
