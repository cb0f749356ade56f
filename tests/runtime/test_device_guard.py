"""The device guard (``EBFT_DEVICE_GUARD=1``): CUDA's device rules on a CPU, and every path of the
project run under it.

- the guard's own rules, in a fresh process (the guard is process-wide);
- every training mode (SFT saved and resumed, EBFT, RLVR, LoRA EBFT, evaluation before and after)
  at TP1 with 4 data-parallel replicas and at TP2 x PP2, in one 4-process launch
  (guarded_launch.py), one test per run;
- ``generate`` and ``evaluate`` from the command line.
The benchmarks run under the guard in tests/test_benchmarks.py and tests/test_gpu_validation.py.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GUARDED = dict(os.environ, EBFT_DEVICE_GUARD="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def _python(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=GUARDED, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


RULES = """
    import torch
    from ebft_megatron.runtime import cpu_fallbacks, device, device_guard, distributed
    from ebft_megatron.runtime.device_guard import DeviceRuleViolation

    distributed.initialize(1, 1)
    gpu, host = device.current(), torch.device("cpu")
    assert device_guard.active() and gpu.type == "cuda"

    def refused(action, words):
        try:
            action()
        except DeviceRuleViolation as err:
            assert words in str(err) and "test" not in str(err).split(" at ")[0], str(err)
            return str(err)
        raise AssertionError(f"not refused: {words}")

    x = torch.ones(4, device=gpu)
    h = torch.ones(4)
    assert x.device == gpu and x.is_cuda and h.device == host and not h.is_cuda
    assert x.type() == "torch.cuda.FloatTensor" and h.type() == "torch.FloatTensor"
    # what ops compute from GPU tensors is on the GPU, views too; 0-dim host tensors are scalars
    assert (x * 2).device == gpu and x[1:].device == gpu and (x + torch.tensor(3.0)).device == gpu
    assert torch.zeros(2, device=x.device).device == gpu and x.new_zeros(3).device == gpu
    where = refused(lambda: x + h, "mixes GPU tensors with host tensors of shape (4,)")
    assert "<string>" in where, where  # the line that did it
    refused(lambda: torch.cat([x, h]), "aten.cat")
    # moves make copies where CUDA does, and copies between the two are allowed
    moved = h.to(gpu)
    assert moved.device == gpu and h.device == host and x.cpu().device == host and x.device == gpu
    assert h.cuda().device == gpu and h.to(x).device == gpu and x.to("cpu").device == host
    x.copy_(h)
    h.copy_(x)
    # host indices into a GPU tensor are fine; GPU indices into a host tensor are not
    assert x[torch.tensor([0, 1])].device == gpu
    refused(lambda: h[torch.tensor([0, 1], device=gpu)], "indexes a host tensor with GPU indices")
    refused(lambda: x.numpy(), "numpy() of a GPU tensor")
    # a module is where its parameters are
    layer = torch.nn.Linear(4, 2)
    refused(lambda: layer(x), "mixes GPU tensors")
    assert layer.to(gpu)(x).device == gpu and layer.weight.device == gpu
    # custom autograd backwards see devices too (torch runs them without function modes)
    class Twice(torch.autograd.Function):
        @staticmethod
        def forward(ctx, value):
            return value * 2

        @staticmethod
        def backward(ctx, grad):
            return grad * torch.full((grad.shape[0],), 2.0, device=grad.device)

    leaf = torch.ones(4, device=gpu, requires_grad=True)
    Twice.apply(leaf).sum().backward()
    assert leaf.grad.device == gpu and leaf.grad.tolist() == [2.0] * 4
    # a host generator draws host numbers only
    generator = torch.Generator().manual_seed(0)
    assert torch.rand(3, generator=generator).device == host
    refused(lambda: torch.rand(3, generator=generator, device=gpu), "host torch.Generator")
    # collectives take GPU tensors (NCCL), except object collectives and gloo groups
    import torch.distributed as dist
    dist.all_reduce(x)
    refused(lambda: dist.all_reduce(h), "collective allreduce_")
    dist.broadcast_object_list([1, "two"], src=0)
    dist.all_reduce(h, group=dist.new_group([0], backend="gloo"))
    # the project's own collectives
    assert distributed.any_rank(True) and not distributed.any_rank(False)
    print("RULES OK")
"""


def test_the_guard_enforces_cudas_device_rules():
    result = _python(RULES)
    assert result.returncode == 0 and "RULES OK" in result.stdout, result.stderr[-4000:]


def test_the_guard_is_off_unless_asked():
    env = {key: value for key, value in GUARDED.items() if key != "EBFT_DEVICE_GUARD"}
    code = ("import torch; from ebft_megatron.runtime import device, device_guard, distributed; "
            "distributed.initialize(1, 1); x = torch.ones(2, device=device.current()); "
            "print(device_guard.active(), device.current(), (x + torch.ones(2)).device)")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["False", "cpu", "cpu"]


# --- every training path under the guard ------------------------------------------------------
LAUNCH_RUNS = [f"{layout}/{name}" for layout in ("tp1", "tp2pp2")
               for name in ("sft", "sft_resumed", "ebft", "rlvr", "lora_ebft")]


@pytest.fixture(scope="module")
def guarded_runs(tiny_models, tmp_path_factory):
    from tests.training.common import make_code_folder

    work = tmp_path_factory.mktemp("guarded")
    make_code_folder(work / "code")
    with socket.socket() as sock:  # torchrun's static rendezvous needs a concrete free port
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=4", f"--master_port={port}",
           str(ROOT / "tests" / "runtime" / "guarded_launch.py"), "--work", str(work),
           "--checkpoint", str(tiny_models["llama"][1])]
    proc = subprocess.run(cmd, env=GUARDED, capture_output=True, text=True, timeout=900)
    report = work / "guarded.json"
    runs = json.loads(report.read_text()) if report.exists() else {}
    errors = [line for line in proc.stderr.splitlines() if "DeviceRuleViolation" in line or "Error:" in line]
    return runs, proc.returncode, "\n".join(errors[-6:]) or proc.stderr[-3000:]


@pytest.mark.parametrize("run", LAUNCH_RUNS)
def test_training_runs_under_the_guard(guarded_runs, run):
    runs, returncode, errors = guarded_runs
    assert run in runs, f"{run} did not finish under the device guard:\n{errors}"
    result = runs[run]
    assert result["guarded"] and result["device"] == "cuda:0"
    assert result["dp"] == (4 if run.startswith("tp1/") else 1)
    assert all(abs(loss) < 1e3 for loss in result["losses"]) and result["ce_after"] > 0
    if run.endswith("sft_resumed"):
        assert result["start"] == 1 and len(result["losses"]) == 1  # resumed from the step-1 checkpoint


ROLLOUT_RUNS = ["rollouts/tp1", "rollouts/tp2", "rollouts/pp2", "rollouts/tp2pp2"]


@pytest.mark.parametrize("run", ROLLOUT_RUNS[1:])
def test_rollouts_at_every_parallel_layout_sample_tp1s_tokens_without_a_sync_in_a_decode_step(guarded_runs, run):
    runs, returncode, errors = guarded_runs
    assert run in runs and "rollouts/tp1" in runs, f"{run} did not finish under the device guard:\n{errors}"
    result = runs[run]
    assert result["decode_steps"] == 3
    assert result["decode_syncs"] == [0, 0, 0], result["decode_sync_sites"]
    assert result["tokens"] == runs["rollouts/tp1"]["tokens"]


def test_the_launch_ends_cleanly(guarded_runs):
    runs, returncode, errors = guarded_runs
    assert returncode == 0 and sorted(runs) == sorted(LAUNCH_RUNS + ROLLOUT_RUNS), errors


# --- the command-line tools under the guard --------------------------------------------------
def test_generate_runs_under_the_guard(tiny_models):
    result = subprocess.run([sys.executable, "-m", "ebft_megatron.generate", "--load", str(tiny_models["llama"][1]),
                             "--prompt", "def add(a, b):", "--max-new-tokens", "6", "--temperature", "0.7",
                             "--print-ids"],
                            env=GUARDED, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ids: [" in result.stderr


def test_evaluate_runs_under_the_guard(tiny_models, tmp_path):
    from tests.training.common import make_code_folder

    code = make_code_folder(tmp_path / "code")
    out = tmp_path / "report"
    result = subprocess.run([sys.executable, "-m", "ebft_megatron.evaluate", "--load", str(tiny_models["qwen3"][1]),
                             "--out", str(out), "--humaneval", "1", "--humaneval-max-new-tokens", "4",
                             f"data.path={code}", "data.validation_fraction=0.3", "rollout.chunk_len=32",
                             "rollout.first_anchor=4", "rollout.stride=4", "rollout.rollout_len=4",
                             "rollout.num_samples=3", "eval.cfm_chunks=1", "data.document_masking=true"],
                            env=GUARDED, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert metrics["eval/ce"] > 0 and metrics["eval/cfm"] == metrics["eval/cfm"]
