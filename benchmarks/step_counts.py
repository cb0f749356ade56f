#!/usr/bin/env python
"""What one training step asks of a GPU's host: ops dispatched, kernels launched and host syncs, by
phase, for the real trainer at the GPU validation's layout (benchmarks/gpu_validation.py: P=1024,
8 chunks a step in micro-batches of 2, selective recompute, bf16, 28 layers) at a tiny width.

  python benchmarks/step_counts.py                       # SFT and EBFT, the validation's layout
  python benchmarks/step_counts.py --modes sft --micro-batch 1
  python benchmarks/step_counts.py --chunk-len 64 --layers 4 --chunks-per-step 2   # the plumbing only

Without CUDA the run is under the device guard (EBFT_DEVICE_GUARD=1), so the GPU code path is the
one counted; the counts do not depend on the model's width (runtime.launch_count). Each mode runs
in its own process: ``--warmup-steps`` steps (Adam makes its state in the first), then one counted
step. Prints a table per mode and, with --json, writes {mode: {phase: counts}}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import print_counts, random_weight_checkpoint  # noqa: E402

WIDTH = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, vocab_size=512)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", default=["sft", "ebft"], choices=["sft", "ebft"])
    parser.add_argument("--layers", type=int, default=28, help="default 28 (the validation's 0.56B depth)")
    parser.add_argument("--chunk-len", type=int, default=1024, help="P (default 1024)")
    parser.add_argument("--chunks-per-step", type=int, default=8, help="default 8")
    parser.add_argument("--micro-batch", type=int, default=2, help="chunks per micro-batch (default 2)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--warmup-steps", type=int, default=1, help="steps before the counted one (default 1)")
    parser.add_argument("--json", help="also write the counts here")
    parser.add_argument("--one-mode", help=argparse.SUPPRESS)  # the child process of one mode
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def count_one_mode(args) -> dict:
    """One mode's counted step, in this process (under the guard when there is no CUDA)."""
    from ebft_megatron.cli import quiet_imports

    quiet_imports()
    import warnings

    warnings.filterwarnings("ignore")
    from ebft_megatron.config import load_config
    from ebft_megatron.runtime.launch_count import LaunchCounter
    from ebft_megatron.training.loop import Trainer

    P = args.chunk_len
    config = load_config(None, [
        f"model.load={args.checkpoint}", f"model.dtype={args.dtype}", "model.recompute=selective",
        f"rollout.chunk_len={P}", "rollout.first_anchor=8", "rollout.stride=8", "rollout.rollout_len=8",
        "rollout.num_samples=4", f"objective.mode={args.one_mode}", "optimizer.lr=1e-4",
        "optimizer.warmup_fraction=0", f"train.steps={args.warmup_steps + 1}",
        f"train.chunks_per_step={args.chunks_per_step}", f"train.micro_batch={args.micro_batch}", "train.save=",
        "eval.before_and_after=false", "train.wandb=disabled", "data.kind=code", "data.max_documents=60",
        "data.validation_fraction=0.1"])
    trainer = Trainer(config, log=lambda *_: None)
    for _ in range(args.warmup_steps):
        trainer.train_step()
    with LaunchCounter() as counter:
        trainer.train_step()
    return counter.as_dict()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.one_mode:
        print("COUNTS " + json.dumps(count_one_mode(args)), flush=True)
        return 0
    from ebft_megatron.runtime import device_guard

    checkpoint = random_weight_checkpoint(
        Path(os.environ.get("EBFT_CACHE_DIR", Path(tempfile.gettempdir()) / "ebft_step_counts")) / "random_weights"
        / f"step_counts_{args.layers}layers",
        dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], num_hidden_layers=args.layers,
             max_position_embeddings=4096, tie_word_embeddings=True, rope_theta=1e6, **WIDTH))
    env = dict(os.environ, **{device_guard.ENV: "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    results = {}
    for mode in args.modes:
        command = [sys.executable, __file__, "--one-mode", mode, "--checkpoint", str(checkpoint)]
        for flag in ("layers", "chunk_len", "chunks_per_step", "micro_batch", "dtype", "warmup_steps"):
            command += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            sys.stderr.write(done.stdout[-2000:] + done.stderr[-4000:])
            raise SystemExit(f"step_counts: the {mode} step failed (exit {done.returncode})")
        results[mode] = json.loads(next(line[7:] for line in done.stdout.splitlines() if line.startswith("COUNTS ")))
        print_counts(f"{mode} step: P={args.chunk_len}, {args.chunks_per_step} chunks in micro-batches of "
                     f"{args.micro_batch}, {args.layers} layers, {args.dtype}", results[mode])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
