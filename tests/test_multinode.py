"""The launch scripts in examples/.

- Two "nodes" on one machine: examples/train_multi_node.sh started twice (NODE_RANK 0 and 1), each
  a torchrun agent with one process, joined by c10d rendezvous on loopback. The run is PP=2, so the
  two nodes are the two pipeline stages of one model: activations, gradients, the checkpoint and
  the logged metrics all have to cross between them.
- The scripts' plumbing without training: a stand-in interpreter records the torchrun command each
  script builds (single node, multi node, and the Slurm script under stand-in srun/scontrol).
"""

import json
import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def free_port() -> int:
    # c10d rendezvous needs a concrete port (0 would give each agent its own store)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def node_env(node: int, port: int, **extra) -> dict:
    return dict(
        os.environ, NNODES="2", NODE_RANK=str(node), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GPUS="1",
        RUN_ID=f"test-{port}", PYTHON=sys.executable, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1",
        # gloo picks its network interface from the host name, which need not resolve to loopback
        # everywhere; both "nodes" are on this machine, so pin it.
        GLOO_SOCKET_IFNAME="lo", **extra)


def test_two_nodes_train_as_two_pipeline_stages(tiny_models, tmp_path):
    from tests.training.common import make_code_folder, tiny_overrides

    code = make_code_folder(tmp_path / "code")
    save = tmp_path / "run"
    config = tmp_path / "two_nodes.yaml"
    config.write_text("parallel:\n  pp: 2   # one pipeline stage per node\n")
    overrides = tiny_overrides(tiny_models["llama"][1], code, save, steps=2,
                               **{"train.save_interval": 0, "train.tensorboard": "false"})
    port = free_port()
    procs, logs = [], []
    try:
        for node in range(2):  # started together: each agent waits in the rendezvous for the other
            log = open(tmp_path / f"node{node}.log", "w+")
            logs.append(log)
            procs.append(subprocess.Popen(
                ["bash", str(EXAMPLES / "train_multi_node.sh"), str(config), *overrides], env=node_env(node, port),
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        codes = [proc.wait(timeout=600) for proc in procs]
    finally:
        for proc in procs:  # on a timeout, stop each agent's whole process group (its worker too)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    assert codes == [0, 0], "\n\n".join(f"--- node {i} ---\n{out[-5000:]}" for i, out in enumerate(outputs))

    checkpoint = save / "step_000002"
    meta = json.loads((checkpoint / "ebft_checkpoint.json").read_text())
    assert meta["step"] == 2 and meta["complete"]
    # each stage writes its own shard files (__<rank>_<n>.distcp): both nodes saved their half
    writers = {p.name.split("_")[2] for p in (checkpoint / "model").glob("__*_*.distcp")}
    assert writers == {"0", "1"}

    rows = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    training = [row for row in rows if "loss" in row]  # (evaluation rows have eval/* keys only)
    assert [row["step"] for row in training] == [1, 2]
    for row in training:
        assert all(math.isfinite(row[key]) for key in ("loss", "loss/ce", "loss/rl", "grad_norm")), row


# --- plumbing: what each script hands to torchrun ----------------------------------------------
@pytest.fixture
def recorder(tmp_path):
    """A stand-in interpreter that appends its arguments to RECORD_DIR/<NODE_RANK>.args (one call
    after the other, each ended by a line '--') and exits 0; ``read`` gives the calls in order."""
    record = tmp_path / "record"
    record.mkdir()
    fake = tmp_path / "fake_python"
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" -- >> "$RECORD_DIR/${NODE_RANK:-single}.args"\n')
    fake.chmod(0o755)

    def read(name: str) -> list[list[str]]:
        calls = (record / f"{name}.args").read_text().split("--\n")
        return [call.splitlines() for call in calls if call]

    env = dict(os.environ, PYTHON=str(fake), RECORD_DIR=str(record))
    for name in ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "RUN_ID", "GPUS"):
        env.pop(name, None)
    return env, read


CONFIG = str(EXAMPLES / "ebft_qwen2.5_7b.yaml")
OVERRIDES = ["train.steps=3", "data.template=Translate {source}:"]  # one with a space stays one argument


def run(cmd, env, cwd=ROOT):
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=60)


def test_single_node_script(recorder):
    env, read = recorder
    proc = run(["bash", str(EXAMPLES / "train_single_node.sh"), CONFIG, *OVERRIDES], dict(env, GPUS="4"))
    assert proc.returncode == 0, proc.stderr
    assert read("single") == [  # the check first, then torchrun with restarts
        ["-m", "ebft_megatron.train", "--check", "--gpus", "4", "--config", CONFIG, *OVERRIDES],
        ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4", "--max-restarts=3",
         "-m", "ebft_megatron.train", "--config", CONFIG, *OVERRIDES]]
    proc = run(["bash", str(EXAMPLES / "train_single_node.sh"), CONFIG], dict(env, GPUS="2", MAX_RESTARTS="0",
                                                                                SKIP_CHECK="1"))
    assert proc.returncode == 0, proc.stderr
    assert read("single")[2] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                 "--max-restarts=0", "-m", "ebft_megatron.train", "--config", CONFIG]


def test_a_failed_check_stops_the_launch(tmp_path):
    """A stand-in interpreter whose check fails: its exit code is the script's, torchrun never runs."""
    record = tmp_path / "calls"
    fake = tmp_path / "fake_python"
    fake.write_text(f'#!/usr/bin/env bash\necho "$3" >> {record}\n'
                    '[[ $3 == --check ]] && { echo "error: model.load is required" >&2; exit 2; }\nexit 0\n')
    fake.chmod(0o755)
    env = dict(os.environ, PYTHON=str(fake), NNODES="1", NODE_RANK="0", MASTER_ADDR="n0", MASTER_PORT="1",
               RUN_ID="r")
    for script in ("train_single_node.sh", "train_multi_node.sh"):
        proc = run(["bash", str(EXAMPLES / script), CONFIG], env)
        assert proc.returncode == 2 and proc.stderr.strip() == "error: model.load is required", proc.stderr
    assert record.read_text().split() == ["--check", "--check"]


def test_multi_node_script_builds_the_rendezvous(recorder):
    env, read = recorder
    proc = run(["bash", str(EXAMPLES / "train_multi_node.sh"), CONFIG, *OVERRIDES], dict(
        env, NNODES="4", NODE_RANK="3", MASTER_ADDR="node0", MASTER_PORT="29500", RUN_ID="job7"))
    assert proc.returncode == 0, proc.stderr
    assert read("3") == [
        ["-m", "ebft_megatron.train", "--check", "--gpus", "32", "--config", CONFIG, *OVERRIDES],
        ["-m", "torch.distributed.run", "--nnodes=4", "--node_rank=3", "--nproc_per_node=8", "--max-restarts=3",
         "--rdzv-backend=c10d", "--rdzv-endpoint=node0:29500", "--rdzv-id=job7",
         "-m", "ebft_megatron.train", "--config", CONFIG, *OVERRIDES]]


@pytest.mark.parametrize("env_update, message", [
    ({}, "set NNODES NODE_RANK MASTER_ADDR MASTER_PORT RUN_ID"),
    ({"NNODES": "2", "MASTER_ADDR": "n0", "MASTER_PORT": "1234"}, "set NODE_RANK RUN_ID"),
    ({"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "n0", "MASTER_PORT": "1234", "RUN_ID": "r"},
     "NODE_RANK=2 must be below NNODES=2"),
    ({"NNODES": "two", "NODE_RANK": "0", "MASTER_ADDR": "n0", "MASTER_PORT": "1234", "RUN_ID": "r"},
     "NNODES must be a whole number"),
])
def test_multi_node_script_refuses_a_missing_or_bad_setting(recorder, tmp_path, env_update, message):
    env, _ = recorder
    proc = run(["bash", str(EXAMPLES / "train_multi_node.sh"), CONFIG], dict(env, **env_update))
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not list((tmp_path / "record").iterdir())  # torchrun never started


def test_scripts_refuse_a_missing_config(recorder):
    env, _ = recorder
    for script in ("train_single_node.sh", "train_multi_node.sh"):
        proc = run(["bash", str(EXAMPLES / script), "no/such.yaml"], dict(
            env, NNODES="1", NODE_RANK="0", MASTER_ADDR="n0", MASTER_PORT="1", RUN_ID="r"))
        assert proc.returncode == 2 and "config file no/such.yaml does not exist" in proc.stderr, proc.stderr


def test_slurm_script_starts_one_multi_node_launch_per_node(recorder, tmp_path):
    """Under stand-in srun (one task per node, SLURM_NODEID set) and scontrol (two host names)."""
    env, read = recorder
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/usr/bin/env bash\n[[ "$*" == "show hostnames node[1-2]" ]] && '
                                      'printf "node1\\nnode2\\n"\n')
    (bin_dir / "srun").write_text(
        '#!/usr/bin/env bash\n'
        'while [[ $1 == --* ]]; do shift; done\n'  # the options; the test checks the resulting commands
        'status=0; pids=()\n'
        'for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_NODEID=$i "$@" & pids+=($!); done\n'
        'for pid in "${pids[@]}"; do wait "$pid" || status=1; done\n'
        'exit $status\n')
    for tool in ("scontrol", "srun"):
        (bin_dir / tool).chmod(0o755)
    slurm = dict(env, PATH=f"{bin_dir}:{env['PATH']}", SLURM_JOB_ID="41234", SLURM_NNODES="2",
                 SLURM_JOB_NODELIST="node[1-2]", SLURM_GPUS_ON_NODE="8", SLURM_SUBMIT_DIR=str(ROOT))
    proc = run(["bash", str(EXAMPLES / "train_slurm.sbatch"), CONFIG, *OVERRIDES], slurm, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "2 nodes x 8 GPUs, rendezvous at node1:21234" in proc.stdout
    # the check once, for the whole job, before srun; then each node's torchrun without it
    assert read("single") == [["-m", "ebft_megatron.train", "--check", "--gpus", "16", "--config", CONFIG,
                               *OVERRIDES]]
    for node in ("0", "1"):
        assert read(node) == [["-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}",
                               "--nproc_per_node=8", "--max-restarts=3", "--rdzv-backend=c10d",
                               "--rdzv-endpoint=node1:21234", "--rdzv-id=41234", "-m", "ebft_megatron.train",
                               "--config", CONFIG, *OVERRIDES]]
