#!/usr/bin/env python
"""Every GPU figure from one command (see docs/gpu-validation.md for the device steps).

  python benchmarks/gpu_validation.py --out $OUT                 # one GPU: ~0.56B model, bf16 and FP8
  python benchmarks/gpu_validation.py --out /tmp/v --tiny        # CPU smoke run of the same stages

Stages, each printed as it finishes and collected in OUT/gpu_validation.json:
  1. environment: torch, the device, Transformer Engine's version (or why it is missing);
  2. a model of the requested shape with random weights (default: 28 layers, hidden 1024, GQA 16/4,
     0.56B parameters) and a byte-level BPE tokenizer trained on this Python's standard library,
     converted to a megatron checkpoint (nothing is downloaded);
  3. the packed block attention on the device: the fused kernels (on CUDA torch's memory-efficient
     attention operators) against the dense masked reference, forward and backward, in fp32 and bf16:
     the largest differences, the time and (on CUDA) the peak memory of each;
  4. TE-spec against local-spec logits on the same weights and chunk, in bf16 (needs TE);
  5. short runs of the real trainer on standard-library code: SFT and EBFT, in bf16 and (with TE)
     in FP8 with --fp8-recipe, each for --steps steps: loss first -> last, median step time,
     tokens/s, MFU against --peak-tflops, and the EBFT/SFT step-time ratio per precision.
Nothing here is a unit test: the figures are for docs/gpu-validation.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {  # hidden, layers, heads, kv heads, ffn, vocab
    "0.5b": (1024, 28, 16, 4, 5632, 8192),
    "tiny": (64, 4, 4, 2, 128, 512),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for the model, the runs and gpu_validation.json")
    parser.add_argument("--tiny", action="store_true", help="a 4-layer model, fp32, 2 steps: checks the plumbing on CPU")
    parser.add_argument("--steps", type=int, default=30, help="training steps per run (default 30)")
    parser.add_argument("--chunk-len", type=int, default=1024, help="P (default 1024)")
    parser.add_argument("--chunks-per-step", type=int, default=8, help="default 8 (micro-batches of 2: accumulation)")
    parser.add_argument("--fp8-recipe", default="tensorwise", choices=["delayed", "tensorwise", "blockwise", "mxfp8"])
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak per GPU (H100/H200 SXM: 989)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.steps, args.chunk_len, args.chunks_per_step = min(args.steps, 2), 64, 2
    return args


def report(figures: dict, out: Path, key: str, value) -> None:
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
    """Random-weight Qwen2-shaped HF model + a BPE tokenizer trained on the standard library,
    converted to a megatron checkpoint (reused when it exists)."""
    ckpt = out / f"model_{shape}_mcore"
    if ckpt.is_dir():
        return ckpt
    import torch
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from ebft_megatron.data.sources import python_stdlib_dir
    from ebft_megatron.checkpoint import convert

    hidden, layers, heads, kv_heads, ffn, vocab = SHAPES[shape]
    hf_dir = out / f"model_{shape}_hf"
    files = sorted(python_stdlib_dir().glob("*.py"))[:200]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator((f.read_text(errors="replace") for f in files), trainer=trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    config = tf.Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                            num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
                            tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, rope_theta=1e6)
    torch.manual_seed(0)
    tf.Qwen2ForCausalLM(config).save_pretrained(str(hf_dir))
    fast.save_pretrained(str(hf_dir))
    return convert.hf_to_mcore(hf_dir, ckpt, log=lambda *_: None)


def check_block_attention(tiny: bool) -> dict:
    """Fused block attention against the dense masked reference on this device, forward and
    backward (differences relative to the reference's largest value), with time and peak memory."""
    import torch

    from ebft_megatron.models import architecture, gpt
    from ebft_megatron.models.attention import BlockAttentionParams, BlockCoreAttention
    from ebft_megatron.rollouts.layout import BlockLayout
    from ebft_megatron.runtime import distributed

    distributed.initialize(1, 1, seed=0)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    layout = BlockLayout(64, 8, 8, 8, 4) if tiny else BlockLayout(1024, 8, 8, 8, 4)
    heads, kv_heads, head_dim = (4, 2, 16) if tiny else (16, 4, 64)
    arch = architecture.from_hf_config(dict(
        architectures=["Qwen2ForCausalLM"], hidden_size=heads * head_dim, num_attention_heads=heads,
        num_key_value_heads=kv_heads, intermediate_size=4 * heads * head_dim, num_hidden_layers=1, vocab_size=512))
    core = BlockCoreAttention(gpt.transformer_config(arch, 1, 1), layer_number=1, attn_mask_type=None,
                              attention_type="self")
    S = layout.packed_len
    dense_mask = (~layout.dense_attention_mask()[None, None]).to(device)  # megatron: True = masked out
    result = {"layout": [layout.chunk_len, layout.first_anchor, layout.stride, layout.rollout_len,
                         layout.num_samples], "heads": [heads, kv_heads, head_dim], "device": str(device)}
    for dtype in (torch.float32, torch.bfloat16):
        gen = torch.Generator().manual_seed(0)
        inputs = [torch.randn(S, 1, h, head_dim, generator=gen).to(device, dtype) for h in (heads, kv_heads, kv_heads)]
        upstream = torch.randn(S, 1, heads * head_dim, generator=gen).to(device, dtype)
        runs = {}
        for path in ("dense", "fused"):
            q, k, v = (x.clone().requires_grad_(True) for x in inputs)
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            started = time.perf_counter()
            if path == "dense":
                out = core(q, k, v, dense_mask)
            else:
                out = core(q, k, v, None, packed_seq_params=BlockAttentionParams(layout=layout, mode="packed"))
            out.backward(upstream)
            if cuda:
                torch.cuda.synchronize()
            run = {"seconds": time.perf_counter() - started, "values": [out.detach(), q.grad, k.grad, v.grad]}
            if cuda:
                run["peak_mib"] = (torch.cuda.max_memory_allocated() - before) / 2 ** 20
            runs[path] = run
        label = "float32" if dtype == torch.float32 else "bfloat16"
        entry = {}
        for name, fused, dense in zip(("out", "dq", "dk", "dv"), runs["fused"]["values"], runs["dense"]["values"]):
            entry[f"{name}_max_rel_diff"] = float((fused.float() - dense.float()).abs().max() / dense.float().abs().max())
        for path in ("dense", "fused"):
            entry[f"{path}_s"] = round(runs[path]["seconds"], 4)
            if cuda:
                entry[f"{path}_peak_mib"] = round(runs[path]["peak_mib"], 1)
        result[label] = entry
    return result


def compare_te_and_local(ckpt: Path, chunk_len: int) -> dict:
    """Max and mean |logit difference| of the TE-spec model against the local-spec one, bf16."""
    import torch

    from ebft_megatron.checkpoint import store
    from ebft_megatron.models.gpt import build_model, model_forward
    from ebft_megatron.runtime import distributed

    distributed.initialize(1, 1, seed=0)
    arch = store.architecture_of(ckpt)
    tokens = torch.randint(1, arch.vocab_size, (1, chunk_len), generator=torch.Generator().manual_seed(0))
    logits = {}
    for use_te in (False, True):
        model = build_model(arch, params_dtype=torch.bfloat16, use_te=use_te)
        store.load_model_weights(model, ckpt)
        with torch.no_grad():
            logits[use_te] = model_forward(model.eval(), tokens.cuda(), torch.arange(chunk_len)[None].cuda()).float()
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


def main(argv=None) -> int:
    args = parse_args(argv)
    from ebft_megatron.cli import quiet_imports

    quiet_imports()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    figures: dict = {"settings": vars(args)}
    env = environment()
    report(figures, out, "environment", env)
    started = time.monotonic()
    ckpt = make_model(out, "tiny" if args.tiny else "0.5b")
    report(figures, out, "model", {"checkpoint": str(ckpt), "shape": SHAPES["tiny" if args.tiny else "0.5b"],
                                   "prepare_s": round(time.monotonic() - started, 1)})
    report(figures, out, "block_attention", check_block_attention(args.tiny))
    if env["te_usable"]:
        report(figures, out, "te_vs_local_logits_bf16", compare_te_and_local(ckpt, min(args.chunk_len, 512)))
    else:
        report(figures, out, "te_vs_local_logits_bf16", "skipped: Transformer Engine is not usable here")
    dtype = "float32" if args.tiny else "bfloat16"
    precisions = [("none", dtype)] + ([(args.fp8_recipe, "bfloat16")] if env["te_usable"] else [])
    for fp8, run_dtype in precisions:
        runs = {mode: train_run(args, ckpt, out, mode, fp8, run_dtype) for mode in ("sft", "ebft")}
        label = f"fp8_{fp8}" if fp8 != "none" else run_dtype
        for mode, result in runs.items():
            report(figures, out, f"{mode}_{label}", result)
        report(figures, out, f"ebft_over_sft_step_time_{label}",
               round(runs["ebft"]["step_time_s"] / runs["sft"]["step_time_s"], 3))
    print(f"[gpu-validation] done in {time.monotonic() - started:.0f} s; figures in {out / 'gpu_validation.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
