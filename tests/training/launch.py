"""End-to-end training under torchrun (one launch per process count; imports dominate the cost).

    torchrun --nproc_per_node=2 tests/training/launch.py --phase first  --work DIR --checkpoint CKPT --moe-checkpoint MOE
    torchrun --nproc_per_node=4 tests/training/launch.py --phase second --work DIR --checkpoint CKPT --moe-checkpoint MOE

first (2 processes): an EBFT run at PP2 and an SFT run at DP2 that saves at step 2.
second (4 processes, TP2 x PP2): an EBFT run, and the SFT run resumed from the DP2 checkpoint at
step 2 (a different TP/PP/DP layout), whose next losses must equal the DP2 run's; then an EBFT run
of a tiny Qwen3-MoE at TP2 x EP2 (x DP2), with its load-balancing loss.
Rank 0 writes DIR/<phase>.json for tests/training/test_distributed_training.py.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def ebft_run(checkpoint: Path, code: Path, save: Path, tp: int, pp: int, ep: int = 1) -> dict:
    from ebft_megatron.config import load_config
    from ebft_megatron.training.loop import Trainer
    from tests.training.common import tiny_overrides

    overrides = tiny_overrides(checkpoint, code, save, steps=6, mode="ebft", **{
        "parallel.tp": tp, "parallel.pp": pp, "parallel.ep": ep, "optimizer.lr": 3e-3, "objective.ce_coef": 0.5,
        "train.save_interval": 0, "eval.ce_chunks": 8, "eval.cfm_chunks": 1})
    history = Trainer(load_config(None, overrides)).run()
    logged = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()] if ep > 1 else []
    return {"losses": history["losses"], "ce_before": history["eval_before"]["eval/ce"],
            "ce_after": history["eval_after"]["eval/ce"], "cfm_after": history["eval_after"]["eval/cfm"],
            "report": sorted(p.name for p in (save / "eval").glob("*/*")),
            "load_balancing": [m["loss/load_balancing"] for m in logged if "loss/load_balancing" in m]}


def sft_steps(checkpoint: Path, code: Path, save: Path, tp: int, pp: int, steps: int, save_at: int = 0) -> dict:
    from ebft_megatron.config import load_config
    from ebft_megatron.training.loop import Trainer
    from tests.training.common import tiny_overrides

    overrides = tiny_overrides(checkpoint, code, save, steps=steps, mode="sft",
                               **{"parallel.tp": tp, "parallel.pp": pp, "train.save_interval": 0})
    trainer = Trainer(load_config(None, overrides))
    start = trainer.step
    losses = {}
    while trainer.step < steps:
        loss = trainer.train_step()["loss"]  # (the step counter moves inside)
        losses[trainer.step] = loss
        if trainer.step == save_at:
            trainer.save()
    return {"start": start, "losses": losses, "dp": trainer.info.dp_size}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--phase", choices=["first", "second"], required=True)
    parser.add_argument("--work", required=True)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--moe-checkpoint", required=True)
    args = parser.parse_args()

    from ebft_megatron.cli import quiet_imports

    quiet_imports()
    import warnings

    warnings.filterwarnings("ignore")
    import torch.distributed as dist

    from ebft_megatron.runtime import distributed
    work, checkpoint = Path(args.work), Path(args.checkpoint)
    code = work / "code"  # written by the test before the launch
    results = {}
    if args.phase == "first":
        distributed.initialize(1, 1)
        results["ebft_pp2"] = ebft_run(checkpoint, code, work / "ebft_pp2", tp=1, pp=2)
        results["sft_dp2"] = sft_steps(checkpoint, code, work / "sft_dp2", tp=1, pp=1, steps=4, save_at=2)
    else:
        distributed.initialize(1, 1)
        results["ebft_tp2pp2"] = ebft_run(checkpoint, code, work / "ebft_tp2pp2", tp=2, pp=2)
        resumed = work / "sft_tp2pp2"
        if dist.get_rank() == 0:
            shutil.rmtree(resumed, ignore_errors=True)
            resumed.mkdir()
            shutil.copytree(work / "sft_dp2" / "step_000002", resumed / "step_000002")
        dist.barrier()
        results["sft_resumed_tp2pp2"] = sft_steps(checkpoint, code, resumed, tp=2, pp=2, steps=4)
        results["ebft_moe_tp2ep2"] = ebft_run(Path(args.moe_checkpoint), code, work / "ebft_moe_tp2ep2", tp=2, pp=1,
                                              ep=2)
    if dist.get_rank() == 0:
        (work / f"{args.phase}.json").write_text(json.dumps(results, indent=1))
    distributed.destroy()


if __name__ == "__main__":
    main()
