"""Every training mode under the device guard, in one 4-process launch (see test_device_guard.py).

    EBFT_DEVICE_GUARD=1 torchrun --nproc_per_node=4 tests/runtime/guarded_launch.py --work DIR --checkpoint CKPT
    torchrun --nproc_per_node=1 tests/runtime/guarded_launch.py --work DIR --checkpoint CKPT --layouts tp1  # a GPU

At TP1 (4 data-parallel replicas: data-parallel means and evaluation sums are collectives) and at
TP2 x PP2: SFT saved after one step and resumed for a second, EBFT, RLVR and LoRA EBFT, each with
evaluation before and after. Then one rollout generation at TP1, TP2, PP2 and TP2 x PP2, counted
(``runtime.launch_count``): its tokens and each decode step's host syncs. Rank 0 appends each
finished run to DIR/guarded.json as it finishes, so a run that fails leaves the earlier ones
reported and itself missing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ebft_megatron.cli import quiet_imports  # noqa: E402

quiet_imports()

import torch.distributed as dist  # noqa: E402

import torch  # noqa: E402

from ebft_megatron.block_layout import BlockLayout  # noqa: E402
from ebft_megatron.checkpoint import store  # noqa: E402
from ebft_megatron.config import load_config  # noqa: E402
from ebft_megatron.models import gpt  # noqa: E402
from ebft_megatron.rollouts import sampler  # noqa: E402
from ebft_megatron.rollouts.sampling import SamplingSettings  # noqa: E402
from ebft_megatron.runtime import device, device_guard, distributed  # noqa: E402
from ebft_megatron.runtime.launch_count import LaunchCounter  # noqa: E402
from ebft_megatron.training.loop import Trainer  # noqa: E402
from tests.training.common import tiny_overrides  # noqa: E402

LAYOUTS = {"tp1": (1, 1), "tp2pp2": (2, 2)}
RUNS = {  # name: (mode, steps, extra settings)
    "sft": ("sft", 1, {}),
    "sft_resumed": ("sft", 2, {}),  # the same folder as "sft": resumes its step-1 checkpoint
    "ebft": ("ebft", 1, {}),
    "rlvr": ("rlvr", 1, {}),
    "lora_ebft": ("ebft", 1, {"lora.rank": 4}),
}


def run(work: Path, checkpoint: Path, layout: str, name: str) -> dict:
    tp, pp = LAYOUTS[layout]
    mode, steps, extra = RUNS[name]
    folder = work / f"{layout}_{name.replace('_resumed', '')}"
    overrides = tiny_overrides(checkpoint, work / "code", folder, steps=steps, mode=mode, **{
        "parallel.tp": tp, "parallel.pp": pp, "train.chunks_per_step": 4, "train.save_interval": 1,
        "eval.ce_chunks": 4, "eval.cfm_chunks": 1, **extra})
    trainer = Trainer(load_config(None, overrides))
    start = trainer.step
    history = trainer.run()
    return {"start": start, "losses": history["losses"], "dp": trainer.info.dp_size,
            "ce_after": history["eval_after"]["eval/ce"], "device": str(device.current()),
            "guarded": device_guard.active()}


ROLLOUT_LAYOUTS = {"tp1": (1, 1), "tp2": (2, 1), "pp2": (1, 2), "tp2pp2": (2, 2)}


def count_rollouts(checkpoint: Path, layout: str) -> dict:
    """One generation of 2 chunks at ``layout``, counted by forward (prefill, decode 1, ...):
    its tokens and the host syncs of each decode step, with their places."""
    tp, pp = ROLLOUT_LAYOUTS[layout]
    distributed.initialize(tp, pp)
    arch = store.architecture_of(checkpoint)
    model = gpt.build_model(arch)
    store.load_model_weights(model, checkpoint)
    blocks = BlockLayout(24, 4, 4, 4, 3)
    chunk = device.to_device(torch.randint(0, arch.vocab_size, (2, 24), generator=torch.Generator().manual_seed(5)))
    forwards = []
    plain_forward = gpt.forward

    def counted_forward(*args, **kwargs):
        forwards.append("prefill" if not forwards else f"decode {len(forwards)}")
        with counter.phase(forwards[-1]):
            return plain_forward(*args, **kwargs)

    gpt.forward = counted_forward
    try:
        with LaunchCounter() as counter:
            rollouts = sampler.sample_rollouts(model, blocks, chunk, arch.vocab_size, SamplingSettings(0.8, 1.0),
                                               sampler.rollout_generator(43, 0))
    finally:
        gpt.forward = plain_forward
    decode = [counter.counts[name] for name in forwards[1:]]
    return {"tokens": rollouts.tokens.cpu().tolist(), "decode_steps": len(decode),
            "decode_syncs": [step.syncs for step in decode],
            "decode_sync_sites": [step.sync_sites for step in decode if step.syncs]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", required=True)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--layouts", nargs="+", choices=sorted(LAYOUTS), default=list(LAYOUTS),
                        help="tp1 alone runs on one process (one GPU)")
    args = parser.parse_args()
    work, checkpoint = Path(args.work), Path(args.checkpoint)
    distributed.initialize(1, 1)
    results = {}
    for layout in args.layouts:
        for name in RUNS:
            results[f"{layout}/{name}"] = run(work, checkpoint, layout, name)
            if dist.get_rank() == 0:
                (work / "guarded.json").write_text(json.dumps(results, indent=1))
    for layout in ROLLOUT_LAYOUTS if args.layouts == list(LAYOUTS) else ():
        results[f"rollouts/{layout}"] = count_rollouts(checkpoint, layout)
        if dist.get_rank() == 0:
            (work / "guarded.json").write_text(json.dumps(results, indent=1))
    distributed.destroy()


if __name__ == "__main__":
    main()
