#!/usr/bin/env python
"""One EBFT step against one SFT step on the same chunk, same run, same model and optimizer.

  python benchmarks/step.py                     # SmolLM2-135M (30 layers), fp32, P=1024, C=s=G=8, n=4
  python benchmarks/step.py --random-weights    # same shapes, random weights: nothing downloaded
  python benchmarks/step.py --chunk-len 256     # a quicker look
  python benchmarks/step.py --random-weights --layers 2 --chunk-len 64   # the plumbing only (the tests)
  python benchmarks/step.py --random-weights --count   # also ops, kernels and host syncs by phase

EBFT step = rollouts (KV-cached engine) + features (truncated frozen network, one packed forward)
+ rewards + policy forward/backward over the packed sequence + optimizer step. SFT step = forward/
backward of the chunk + optimizer step. Both use megatron's schedule, DDP and distributed Adam, with
the same activation-recompute setting; every tensor lives on the run's device (on CUDA the clock
waits for the device). Prints the measured ratio, the time by phase, the steps' losses, peak RSS
(and on CUDA torch's max allocated memory), and the FLOP-model ratio for the reference's method,
ours with dense attention and ours with real-pair attention (ebft_megatron.models.flops). With
--count, one more SFT and one more EBFT step run under a launch counter (ebft_megatron.runtime.
launch_count; without CUDA the whole run is under the device guard, so the GPU path is counted):
the ops dispatched, device kernels and host syncs of each step by the trainer's phases.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    StepBench, add_count_argument, add_layout_arguments, add_model_arguments, count_on_the_gpu_path, layout_from,
    model_checkpoint, peak_gpu_bytes, print_counts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_layout_arguments(parser)
    add_model_arguments(parser)
    parser.add_argument("--recompute", default="selective", choices=["none", "selective", "full"])
    add_count_argument(parser)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    count_on_the_gpu_path(args)

    from ebft_megatron.cli import quiet_imports

    quiet_imports()
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    from ebft_megatron.runtime import device, distributed
    from ebft_megatron.models import flops

    layout = layout_from(args)
    bench = StepBench(layout, model_checkpoint(args), args.recompute)
    arch = bench.arch

    def sft_step():
        return bench.step("sft")[0]["total"]

    print(f"layout: P={layout.chunk_len} C={layout.first_anchor} s={layout.stride} G={layout.rollout_len} "
          f"n={layout.num_samples} NB={layout.num_blocks}; packed length {layout.packed_len}; "
          f"threads {torch.get_num_threads()}; recompute {args.recompute}; {arch.num_layers} layers", flush=True)
    sft_step()  # warm-up (allocations, first-call overheads)
    sft_times = [sft_step(), sft_step()]
    sft_time = min(sft_times)
    print(f"SFT step: {sft_time:.2f} s (runs {', '.join(f'{t:.2f}' for t in sft_times)})", flush=True)
    ebft, ebft_terms = bench.step("ebft")
    sft_after, sft_terms = bench.step("sft")
    sft_time = min(sft_time, sft_after["total"])
    print("EBFT step: " + ", ".join(f"{k} {v:.2f} s" for k, v in ebft.items()), flush=True)
    print(f"SFT step again after EBFT: {sft_after['total']:.2f} s", flush=True)

    peak_gpu = peak_gpu_bytes()
    cost = flops.CostModel.of(arch)
    deepest = max(arch.default_feature_layers())
    model = {m: flops.ebft_step(cost, layout, m, deepest) for m in ("reference", "ours_dense", "ours")}
    sft_flops, sft_flops_ckpt = flops.sft_step(cost, layout.chunk_len), flops.sft_step(cost, layout.chunk_len, True)
    figures = {
        "device": str(device.current()), "layers": arch.num_layers,
        "sft_s": sft_time, "ebft_s": ebft["total"], "ebft_phases_s": ebft, "measured_ratio": ebft["total"] / sft_time,
        "flop_ratio": {
            "reference_vs_sft_with_checkpointing": model["reference"]["total"] / sft_flops_ckpt,
            "reference_vs_sft": model["reference"]["total"] / sft_flops,
            "ours_dense_vs_sft": model["ours_dense"]["total"] / sft_flops,
            "ours_vs_sft": model["ours"]["total"] / sft_flops,
        },
        "flop_phases_tflop": {m: {k: v / 1e12 for k, v in p.items()} for m, p in model.items()},
        "losses": {"sft": sft_terms, "ebft": ebft_terms},
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
        "peak_gpu_gb": None if peak_gpu is None else peak_gpu / 1e9,
    }
    print(f"\nmeasured: EBFT step / SFT step = {figures['measured_ratio']:.2f}x "
          f"({ebft['total']:.1f} s vs {sft_time:.1f} s), peak RSS {figures['peak_rss_gb']:.1f} GB"
          + ("" if figures["peak_gpu_gb"] is None else f", peak GPU memory {figures['peak_gpu_gb']:.1f} GB"))
    print(f"losses: EBFT {ebft_terms}, SFT {sft_terms}")
    print("FLOP model, EBFT step / SFT step: " + ", ".join(f"{k} {v:.1f}x" for k, v in figures["flop_ratio"].items()))
    if args.count:
        figures["counts_per_step"] = {mode: bench.count(mode).as_dict() for mode in ("sft", "ebft")}
        for mode, counts in figures["counts_per_step"].items():
            print_counts(f"one {mode.upper()} step, counted on {device.current()}", counts)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    distributed.destroy()


if __name__ == "__main__":
    main()
