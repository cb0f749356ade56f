#!/usr/bin/env python
"""Every GPU figure from one command (see docs/gpu-validation.md for the device steps).

  python benchmarks/gpu_validation.py --out $OUT                 # one GPU: ~0.56B model, bf16 and FP8
  python benchmarks/gpu_validation.py --out $OUT --shape qwen2.5-1.5b   # Qwen2.5-1.5B's shape
  python benchmarks/gpu_validation.py --out $OUT --stages ebft   # rerun one stage, keep the other figures
  python benchmarks/gpu_validation.py --out /tmp/v --tiny        # CPU smoke run of the same stages

Stages (--stages; default all), each written to OUT/gpu_validation.json as soon as it finishes:
  environment      torch, the device, Transformer Engine's version (or why it is missing);
  model            a model of the requested shape (--shape) with random weights and a byte-level BPE
                   tokenizer trained on this Python's standard library, converted to a megatron
                   checkpoint (nothing is downloaded; reused from OUT when it is there);
  block_attention  the packed block attention on the device: the fused kernels (on CUDA torch's
                   memory-efficient attention operators) against the dense masked reference, forward
                   and backward, in fp32 and bf16, at micro-batches 1 and 2: the largest
                   differences, whether every value is finite, the time and (on CUDA) the peak
                   memory of each;
  te_vs_local      TE-spec against local-spec logits on the same weights and chunk, in bf16 (needs TE);
  sft, ebft        short runs of the real trainer on standard-library code, in bf16 and (with TE) in
                   FP8 with --fp8-recipe, each for --steps steps: loss first -> last, median step
                   time, tokens/s, MFU against --peak-tflops; and the EBFT/SFT step-time ratio per
                   precision once both are in the JSON (from this run or an earlier one).
A stage that fails is recorded under its key as its error (type, message and the traceback's last
lines); the other stages still run, and the command exits with 1. Figures of stages not run this
time stay in the JSON. For the tests only: GPU_VALIDATION_FAIL=<stage> makes that stage fail.
Nothing here is a unit test: the figures are for docs/gpu-validation.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import device_clock, peak_gpu_bytes, random_weight_checkpoint  # noqa: E402

SHAPES = {  # hidden, layers, heads, kv heads, ffn, vocab
    "0.5b": (1024, 28, 16, 4, 5632, 8192),
    "qwen2.5-1.5b": (1536, 28, 12, 2, 8960, 151936),
    "tiny": (64, 4, 4, 2, 128, 512),
}
STAGES = ("environment", "model", "block_attention", "te_vs_local", "sft", "ebft")
FAIL_ENV = "GPU_VALIDATION_FAIL"  # tests only: the stage named here raises
TRACEBACK_LINES = 12


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for the model, the runs and gpu_validation.json")
    parser.add_argument("--tiny", action="store_true",
                        help="the tiny shape, fp32, 2 steps of 2 chunks of 64 tokens: checks the plumbing on CPU")
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None,
                        help="the model's shape: 0.5b (default; hidden 1024, 28 layers, 16/4 heads, FFN 5632, "
                             "vocabulary 8192: 0.56B parameters), qwen2.5-1.5b (hidden 1536, 28 layers, 12/2 "
                             "heads, FFN 8960, vocabulary 151936), tiny (what --tiny runs)")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES), metavar="STAGE",
                        help=f"the stages to run (default all: {' '.join(STAGES)}); the JSON keeps the others' "
                             "figures from earlier runs")
    parser.add_argument("--steps", type=int, default=30, help="training steps per run (default 30)")
    parser.add_argument("--chunk-len", type=int, default=1024, help="P (default 1024)")
    parser.add_argument("--chunks-per-step", type=int, default=8, help="default 8 (micro-batches of 2: accumulation)")
    parser.add_argument("--fp8-recipe", default="tensorwise", choices=["delayed", "tensorwise", "blockwise", "mxfp8"])
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak per GPU (H100/H200 SXM: 989)")
    args = parser.parse_args(argv)
    if args.tiny:
        if args.shape not in (None, "tiny"):
            parser.error(f"--tiny runs the tiny shape, not --shape {args.shape}")
        args.steps, args.chunk_len, args.chunks_per_step = min(args.steps, 2), 64, 2
    args.shape = args.shape or ("tiny" if args.tiny else "0.5b")
    return args


def report(figures: dict, out: Path, key: str, value) -> None:
    """Print one figure and write all of them (None: drop the figure)."""
    if value is None:
        figures.pop(key, None)
    else:
        figures[key] = value
        print(f"[gpu-validation] {key}: {json.dumps(value)}", flush=True)
    (out / "gpu_validation.json").write_text(json.dumps(figures, indent=1))


def environment() -> dict:
    import torch

    from ebft_megatron.models.gpt import transformer_engine_available

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
    try:
        import transformer_engine

        info["transformer_engine"] = getattr(transformer_engine, "__version__", "unknown")
    except Exception as err:  # noqa: BLE001 - any import failure means the same: no TE
        info["transformer_engine"] = f"missing ({type(err).__name__}: {err})"
    info["te_usable"] = transformer_engine_available()
    return info


def make_model(out: Path, shape: str) -> Path:
    """A random-weight Qwen2-shaped model of ``shape`` + a BPE tokenizer trained on the standard
    library, converted to a megatron checkpoint in ``out`` (reused when it exists)."""
    hidden, layers, heads, kv_heads, ffn, vocab = SHAPES[shape]
    return random_weight_checkpoint(out / f"model_{shape}_mcore", dict(
        model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=vocab, hidden_size=hidden,
        intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=4096, tie_word_embeddings=True, rope_theta=1e6))


def check_block_attention(chunk_len: int, shape: str) -> dict:
    """Fused block attention against the dense masked reference on the run's device, forward and
    backward (differences relative to the reference's largest value), with time and (on CUDA) peak
    memory, for one P=``chunk_len``, C=s=G=8, n=4 sequence and the heads of ``shape``."""
    import torch

    from ebft_megatron.models import architecture, gpt
    from ebft_megatron.models.attention import BlockAttentionParams, BlockCoreAttention
    from ebft_megatron.block_layout import BlockLayout
    from ebft_megatron.runtime import device, distributed

    distributed.initialize(1, 1, seed=0)
    where = device.current()
    layout = BlockLayout(chunk_len, 8, 8, 8, 4)
    hidden, _, heads, kv_heads, _, _ = SHAPES[shape]
    head_dim = hidden // heads
    arch = architecture.from_hf_config(dict(
        architectures=["Qwen2ForCausalLM"], hidden_size=hidden, num_attention_heads=heads,
        num_key_value_heads=kv_heads, intermediate_size=4 * hidden, num_hidden_layers=1, vocab_size=512))
    core = device.move_model(BlockCoreAttention(gpt.transformer_config(arch, 1, 1), layer_number=1,
                                                attn_mask_type=None, attention_type="self"))
    S = layout.packed_len
    dense_mask = ~layout.dense_attention_mask()[None, None]  # megatron: True = masked out
    result = {"layout": [layout.chunk_len, layout.first_anchor, layout.stride, layout.rollout_len,
                         layout.num_samples], "heads": [heads, kv_heads, head_dim], "device": str(where)}
    # micro-batch 2 as well: the CUDA kernels' layout contract only shows at B > 1 (the backward's
    # Delta, computed inside the kernel in half precision, reads the output with an assumed row stride)
    for dtype, batch in ((torch.float32, 1), (torch.bfloat16, 1), (torch.float32, 2), (torch.bfloat16, 2)):
        gen = torch.Generator().manual_seed(0)  # drawn on the host: the same numbers on every device
        inputs = [torch.randn(S, batch, h, head_dim, generator=gen).to(where, dtype) for h in (heads, kv_heads, kv_heads)]
        upstream = torch.randn(S, batch, heads * head_dim, generator=gen).to(where, dtype)
        runs = {}
        for path in ("dense", "fused"):
            q, k, v = (x.clone().requires_grad_(True) for x in inputs)
            started = device_clock()
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            if path == "dense":
                out = core(q, k, v, dense_mask)
            else:
                out = core(q, k, v, None, packed_seq_params=BlockAttentionParams(layout=layout, mode="packed"))
            out.backward(upstream)
            runs[path] = {"seconds": device_clock() - started, "values": [out.detach(), q.grad, k.grad, v.grad]}
            if torch.cuda.is_available():
                runs[path]["peak_mib"] = (peak_gpu_bytes() - before) / 2 ** 20
        label = ("float32" if dtype == torch.float32 else "bfloat16") + ("" if batch == 1 else f"_micro_batch_{batch}")
        entry = {"finite": all(bool(torch.isfinite(x).all()) for x in runs["fused"]["values"])}
        for name, fused, dense in zip(("out", "dq", "dk", "dv"), runs["fused"]["values"], runs["dense"]["values"]):
            entry[f"{name}_max_rel_diff"] = float((fused.float() - dense.float()).abs().max() / dense.float().abs().max())
        for path in ("dense", "fused"):
            entry[f"{path}_s"] = round(runs[path]["seconds"], 4)
            if "peak_mib" in runs[path]:
                entry[f"{path}_peak_mib"] = round(runs[path]["peak_mib"], 1)
        result[label] = entry
    return result


def compare_te_and_local(ckpt: Path, chunk_len: int) -> dict:
    """Max and mean |logit difference| of the TE-spec model against the local-spec one, bf16."""
    import torch

    from ebft_megatron.checkpoint import store
    from ebft_megatron.models.gpt import build_model, model_forward
    from ebft_megatron.runtime import device, distributed

    distributed.initialize(1, 1, seed=0)
    arch = store.architecture_of(ckpt)
    tokens, positions = device.to_device((
        torch.randint(1, arch.vocab_size, (1, chunk_len), generator=torch.Generator().manual_seed(0)),
        torch.arange(chunk_len)[None]))
    logits = {}
    for use_te in (False, True):
        model = build_model(arch, params_dtype=torch.bfloat16, use_te=use_te)
        store.load_model_weights(model, ckpt)
        with torch.no_grad():
            logits[use_te] = model_forward(model.eval(), tokens, positions).float()
        del model
    diff = (logits[True] - logits[False]).abs()
    return {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "logit_std": float(logits[False].std())}


def train_run(args, ckpt: Path, out: Path, mode: str, fp8: str, dtype: str) -> dict:
    from ebft_megatron.config import load_config
    from ebft_megatron.training.loop import Trainer

    P = args.chunk_len
    config = load_config(None, [
        f"model.load={ckpt}", f"model.dtype={dtype}", f"model.fp8={fp8}", "model.recompute=selective",
        f"rollout.chunk_len={P}", "rollout.first_anchor=8", "rollout.stride=8", "rollout.rollout_len=8",
        "rollout.num_samples=4", f"objective.mode={mode}", "optimizer.lr=1e-4", "optimizer.warmup_fraction=0",
        f"train.steps={args.steps}", f"train.chunks_per_step={args.chunks_per_step}", "train.micro_batch=2",
        f"train.peak_tflops={args.peak_tflops}", "train.save=", "eval.before_and_after=false",
        "data.kind=code", f"data.max_documents={60 if args.tiny else 400}", "data.validation_fraction=0.1"])
    trainer = Trainer(config, log=lambda *_: None)
    history = []
    for _ in range(args.steps):
        history.append(trainer.train_step())
    timed = history[1:] or history  # the first step includes warm-up (allocations, kernels)
    result = {
        "loss_first": history[0]["loss"], "loss_last": history[-1]["loss"],
        "ce_first": history[0].get("loss/ce", history[0]["loss"]), "ce_last": history[-1].get("loss/ce", history[-1]["loss"]),
        "step_time_s": statistics.median(m["step_time_s"] for m in timed),
        "tokens_per_s": statistics.median(m["tokens_per_s"] for m in timed),
    }
    if "mfu" in timed[0]:
        result["mfu"] = statistics.median(m["mfu"] for m in timed)
    (out / f"losses_{mode}_{fp8}_{dtype}.json").write_text(json.dumps([m["loss"] for m in history]))
    return result


class Validation:
    """The stages of one command, each reported as soon as it finishes (or fails) into the figures
    of OUT/gpu_validation.json, which keeps what earlier runs measured."""

    def __init__(self, args):
        self.args, self.out = args, Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / "gpu_validation.json"
        self.figures: dict = json.loads(path.read_text()) if path.is_file() else {}
        self.figures["settings"] = vars(args)
        self.failed: list[str] = []
        self._model = None  # the checkpoint, or why it could not be made

    def stage(self, name: str, key: str, compute):
        """Report ``compute()`` under ``key``, or, when it raises, the error: the stages after it
        still run."""
        try:
            if os.environ.get(FAIL_ENV) == name:
                raise RuntimeError(f"failure injected into stage {name} ({FAIL_ENV}, for tests)")
            value = compute()
        except Exception as err:  # noqa: BLE001 - any failure of a stage is its figure
            self.failed.append(key)
            value = {"error": f"{type(err).__name__}: {err}",
                     "traceback": traceback.format_exc().rstrip().splitlines()[-TRACEBACK_LINES:]}
        report(self.figures, self.out, key, value)
        return value

    def checkpoint(self) -> Path:
        """The model of ``--shape`` (made once; a failure is remembered and raised to every stage
        that needs the model)."""
        if self._model is None:
            try:
                self._model = make_model(self.out, self.args.shape)
            except Exception as err:  # noqa: BLE001
                self._model = err
        if isinstance(self._model, Exception):
            raise RuntimeError(f"no model: {type(self._model).__name__}: {self._model}") from self._model
        return self._model

    def model(self) -> dict:
        started = time.monotonic()
        ckpt = self.checkpoint()
        return {"checkpoint": str(ckpt), "shape": dict(zip(("hidden", "layers", "heads", "kv_heads", "ffn", "vocab"),
                                                           SHAPES[self.args.shape])),
                "name": self.args.shape, "prepare_s": round(time.monotonic() - started, 1)}

    def train(self, mode: str, fp8: str, dtype: str) -> None:
        label = f"fp8_{fp8}" if fp8 != "none" else dtype
        self.stage(mode, f"{mode}_{label}", lambda: train_run(self.args, self.checkpoint(), self.out, mode, fp8, dtype))
        sft, ebft = (self.figures.get(f"{m}_{label}", {}) for m in ("sft", "ebft"))
        both = "step_time_s" in sft and "step_time_s" in ebft  # a failed run has an error instead
        report(self.figures, self.out, f"ebft_over_sft_step_time_{label}",
               round(ebft["step_time_s"] / sft["step_time_s"], 3) if both else None)


def main(argv=None) -> int:
    args = parse_args(argv)
    from ebft_megatron.cli import quiet_imports

    quiet_imports()
    started = time.monotonic()
    run = Validation(args)
    stages = set(args.stages)
    env = environment()
    if "environment" in stages:
        run.stage("environment", "environment", lambda: env)
    if "model" in stages:
        run.stage("model", "model", run.model)
    if "block_attention" in stages:
        run.stage("block_attention", "block_attention", lambda: check_block_attention(args.chunk_len, args.shape))
    if "te_vs_local" in stages:
        run.stage("te_vs_local", "te_vs_local_logits_bf16",
                  lambda: compare_te_and_local(run.checkpoint(), min(args.chunk_len, 512)) if env["te_usable"]
                  else "skipped: Transformer Engine is not usable here")
    dtype = "float32" if args.tiny else "bfloat16"
    precisions = [("none", dtype)] + ([(args.fp8_recipe, "bfloat16")] if env["te_usable"] else [])
    for fp8, run_dtype in precisions:
        for mode in ("sft", "ebft"):
            if mode in stages:
                run.train(mode, fp8, run_dtype)
    print(f"[gpu-validation] done in {time.monotonic() - started:.0f} s; figures in {run.out / 'gpu_validation.json'}"
          + (f"; failed: {', '.join(run.failed)}" if run.failed else ""), flush=True)
    return 1 if run.failed else 0


if __name__ == "__main__":
    sys.exit(main())
