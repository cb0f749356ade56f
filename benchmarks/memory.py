#!/usr/bin/env python
"""Peak memory of one SFT step and one EBFT step, each in its own process, at the same settings, for
each activation-recompute setting; next to what the memory model (ebft_megatron.training.memory)
predicts for the same step.

  python benchmarks/memory.py                      # SmolLM2-135M, fp32, P=1024, C=s=G=8, n=4
  python benchmarks/memory.py --chunk-len 256 --recompute selective   # a quicker look
  python benchmarks/memory.py --random-weights     # SmolLM2-135M's shape, random weights: nothing downloaded

With ``--lora-rank`` (default 16; 0 = skip) an EBFT step with LoRA adapters on every linear layer
is measured too, on the same chunk: base weights frozen (no gradients, no Adam state for them) and
the policy with its adapters off as the feature network (no second copy of the model).

The model is prepared once, before the workers start (``--random-weights``: made here). Each
process builds what the trainer builds (the policy in megatron's DDP with distributed Adam,
and the frozen feature network, which the trainer holds in every mode for evaluation), runs one
SFT step so that the optimizer state exists, then measures one step of its mode. The figure is the
peak over that step alone: on a CPU the peak resident set (the kernel's high-water mark, reset
just before the step), on a GPU torch's max allocated (also reset just before the step). The whole
process's peak RSS (model loading included) is printed too. On a CPU the model's prediction adds
the resident set the process had before it built anything (Python, torch, megatron).

On a CPU the workers run with glibc's mmap threshold fixed (MALLOC_MMAP_THRESHOLD_), so that a freed
large tensor leaves the resident set, as a freed CUDA block leaves torch's max-allocated count;
with glibc's default the allocator keeps freed activations and the peaks come out higher
(``--allocator-default`` measures that way).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    StepBench, add_layout_arguments, add_model_arguments, layout_from, model_checkpoint, peak_gpu_bytes, synchronize)

GIB = 1024 ** 3


def resident_bytes(field: str = "VmRSS") -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def reset_peak() -> None:
    import torch

    synchronize()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak resident set


def step_peak() -> int:
    gpu = peak_gpu_bytes()
    return resident_bytes("VmHWM") if gpu is None else gpu


def worker(args) -> None:
    from ebft_megatron.cli import quiet_imports

    quiet_imports()
    import warnings

    warnings.filterwarnings("ignore")
    import megatron.core  # noqa: F401  (the runtime is part of the baseline)
    import torch

    from ebft_megatron.runtime import device
    from ebft_megatron.training import memory

    baseline = 0 if torch.cuda.is_available() else resident_bytes()
    layout = layout_from(args)
    bench = StepBench(layout, Path(args.load), args.recompute, lora_rank=args.lora)
    bench.step("sft")  # Adam's state is created at the first step
    reset_peak()
    phases, terms = bench.step(args.mode)
    peak = step_peak()
    objective = bench.objectives[args.mode]
    shape = memory.StepShape(
        layout.chunk_len, objective.tokens_per_chunk, layout.num_rollout_tokens if objective.samples_rollouts else 0,
        objective.embeds_features, recompute=args.recompute,
        feature_layers=0 if args.lora else max(bench.arch.default_feature_layers()), lora_rank=args.lora,
    )
    estimate = memory.estimate(bench.arch, shape)
    print(json.dumps({
        "mode": args.mode, "lora_rank": args.lora, "recompute": args.recompute, "device": str(device.current()),
        "step_peak": peak,
        "process_peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "baseline": baseline, "predicted": baseline + estimate.peak, "model": estimate.describe(),
        "step_s": phases["total"], "loss": terms["loss"],
    }), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_layout_arguments(parser)
    add_model_arguments(parser)
    parser.add_argument("--recompute", nargs="+", default=["none", "selective", "full"],
                        choices=["none", "selective", "full"])
    parser.add_argument("--allocator-default", action="store_true",
                        help="CPU: keep glibc's default allocator settings (freed memory may stay resident)")
    parser.add_argument("--lora-rank", type=int, default=16,
                        help="also measure a LoRA EBFT step at this rank (default 16; 0 = skip)")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--lora", type=int, default=0, help=argparse.SUPPRESS)  # a worker's LoRA rank
    parser.add_argument("--mode", choices=["sft", "ebft"], help=argparse.SUPPRESS)  # one worker process
    parser.add_argument("--load", help=argparse.SUPPRESS)  # a worker's checkpoint
    args = parser.parse_args()
    if args.mode:
        args.recompute = args.recompute[0]
        return worker(args)

    from ebft_megatron.cli import quiet_imports

    quiet_imports()
    layout = layout_from(args)
    checkpoint = model_checkpoint(args)
    env = dict(os.environ)
    if not args.allocator_default:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    print(f"layout: P={layout.chunk_len} C={layout.first_anchor} s={layout.stride} G={layout.rollout_len} "
          f"n={layout.num_samples}; packed length {layout.packed_len}; allocator "
          f"{'default' if args.allocator_default else 'mmap threshold 64 KiB'}", flush=True)
    results = []
    runs = [("sft", 0), ("ebft", 0)] + ([("ebft", args.lora_rank)] if args.lora_rank else [])
    for recompute in args.recompute:
        for mode, lora_rank in runs:
            flags = [f"--{name.replace('_', '-')}={getattr(args, name)}"
                     for name in ("chunk_len", "first_anchor", "stride", "rollout_len", "num_samples")]
            cmd = [sys.executable, __file__, f"--mode={mode}", f"--lora={lora_rank}", "--recompute", recompute,
                   f"--load={checkpoint}", *flags]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
            if proc.returncode or not lines:
                sys.exit(f"the {mode} worker (recompute {recompute}) failed:\n{proc.stderr[-3000:]}")
            result = json.loads(lines[-1])
            results.append(result)
            name = f"{mode} LoRA r{lora_rank}" if lora_rank else mode
            print(f"  {recompute:9s} {name:13s}: step peak {result['step_peak'] / GIB:6.2f} GiB, predicted "
                  f"{result['predicted'] / GIB:6.2f} GiB ({result['predicted'] / result['step_peak'] - 1:+.0%}), "
                  f"whole process {result['process_peak'] / GIB:6.2f} GiB, step {result['step_s']:.1f} s; model: "
                  f"{result['model']}", flush=True)
    print("\nrecompute | SFT step peak | EBFT step peak | EBFT / SFT | model error SFT, EBFT")
    for recompute in args.recompute:
        sft, ebft = (next(r for r in results if r["recompute"] == recompute and r["mode"] == m and not r["lora_rank"])
                     for m in ("sft", "ebft"))
        print(f"{recompute:9s} | {sft['step_peak'] / GIB:10.2f} GiB | {ebft['step_peak'] / GIB:11.2f} GiB | "
              f"{ebft['step_peak'] / sft['step_peak']:9.2f}x | {sft['predicted'] / sft['step_peak'] - 1:+.0%}, "
              f"{ebft['predicted'] / ebft['step_peak'] - 1:+.0%}")
    if args.lora_rank:
        print(f"\nrecompute | EBFT step peak | LoRA r{args.lora_rank} EBFT step peak | LoRA / full | whole process "
              "full, LoRA | model error LoRA")
        for recompute in args.recompute:
            full, lora = (next(r for r in results if r["recompute"] == recompute and r["mode"] == "ebft"
                               and r["lora_rank"] == rank) for rank in (0, args.lora_rank))
            print(f"{recompute:9s} | {full['step_peak'] / GIB:10.2f} GiB | {lora['step_peak'] / GIB:18.2f} GiB | "
                  f"{lora['step_peak'] / full['step_peak']:10.2f}x | {full['process_peak'] / GIB:.2f}, "
                  f"{lora['process_peak'] / GIB:.2f} GiB | {lora['predicted'] / lora['step_peak'] - 1:+.0%}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
