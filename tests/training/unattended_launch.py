"""A training run under torchrun that a test can break: the trainer as ``ebft_megatron.train`` runs
it, plus two test-only actions.

    torchrun --nproc_per_node=2 --max-restarts=1 tests/training/unattended_launch.py --out DIR \\
        [--kill-rank R --kill-before-step S] -- section.key=value ...

--kill-rank / --kill-before-step: on its first attempt (torchrun's restart count 0), rank R sends
itself SIGKILL as it starts step S, as a process lost to the OOM killer or a dead node would
go. After the run each rank writes its parameters to DIR/params_rank<R>.pt.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--kill-rank", type=int, default=-1)
    parser.add_argument("--kill-before-step", type=int, default=-1)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from ebft_megatron.cli import quiet_imports

    quiet_imports()
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    from ebft_megatron.config import load_config
    from ebft_megatron.runtime import distributed, watchdog
    from ebft_megatron.training.loop import Trainer

    rank = int(os.environ["RANK"])
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    trainer = Trainer(load_config(None, args.overrides))
    if rank == args.kill_rank and first_attempt:
        step = trainer.train_step

        def dying_step():
            if trainer.step + 1 == args.kill_before_step:
                print(f"[test] rank {rank}: SIGKILL at the start of step {trainer.step + 1}", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            return step()

        trainer.train_step = dying_step
    trainer.run()
    params = {name: p.detach().clone() for name, p in trainer.policy.named_parameters()}
    torch.save({"params": params, "step": trainer.step}, Path(args.out) / f"params_rank{rank}.pt")
    watchdog.close()
    distributed.destroy()


if __name__ == "__main__":
    main()
