"""One 4-process torchrun launch of a checks script (tests/parallel/*checks.py) and its figures."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_checks(script: str, models_dir: Path, out: Path) -> dict:
    """Run ``tests/parallel/<script> --models DIR --out FILE`` on 4 processes; what rank 0 wrote."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    with socket.socket() as sock:  # torchrun's static rendezvous needs a concrete free port
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=4", f"--master_port={port}",
           str(ROOT / "tests" / "parallel" / script), "--models", str(models_dir), "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    data = json.loads(out.read_text())
    print(json.dumps(data, indent=1))
    return data
