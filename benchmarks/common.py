"""What the benchmarks share: the rollout-layout flags (defaults: the paper's code setting), the model
they run (SmolLM2-135M-Instruct, or with ``--random-weights`` a model of its shape made here, with
nothing downloaded), the device's clock, ``--count`` (ops, kernels and host syncs by phase,
``runtime.launch_count``), and one set-up of an SFT and an EBFT step as the trainer runs them."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

from ebft_megatron.runtime import device_guard
from ebft_megatron.runtime.launch_count import LaunchCounter
from ebft_megatron.runtime.timing import PhaseTimer

SMOLLM2_CONFIG = Path(__file__).with_name("smollm2_config.json")  # SmolLM2-135M's architecture
TOKENIZER_FILES = 200  # standard-library modules a random-weight model's tokenizer is trained on


def add_layout_arguments(parser) -> None:
    parser.add_argument("--chunk-len", type=int, default=1024, help="P (default 1024)")
    parser.add_argument("--first-anchor", type=int, default=8, help="C (default 8)")
    parser.add_argument("--stride", type=int, default=8, help="s (default 8)")
    parser.add_argument("--rollout-len", type=int, default=8, help="G (default 8)")
    parser.add_argument("--num-samples", type=int, default=4, help="n (default 4)")


def add_model_arguments(parser) -> None:
    parser.add_argument("--random-weights", action="store_true",
                        help="SmolLM2-135M's shape (benchmarks/smollm2_config.json) with random weights and a "
                             "tokenizer trained on the standard library: nothing is downloaded")
    parser.add_argument("--layers", type=int, default=None,
                        help="with --random-weights: this many layers (default: SmolLM2-135M's 30; at least 4, "
                             "so that the feature layers L/4, L/2, 3L/4 differ)")
    parser.add_argument("--experts", type=int, default=0,
                        help="with --random-weights: a mixture of experts of SmolLM2-135M's shape (Mixtral's "
                             "architecture): every layer's MLP is this many SwiGLU experts of half SmolLM2's FFN "
                             "width, 2 chosen per token, so that a token costs the dense model's FLOPs")


def add_count_argument(parser) -> None:
    parser.add_argument("--count", action="store_true",
                        help="also run the measured thing once more under a launch counter and give its ops "
                             "dispatched, device kernels and host syncs by phase (ebft_megatron.runtime."
                             "launch_count); without CUDA the whole run is under the device guard "
                             "(EBFT_DEVICE_GUARD=1), so that the GPU code path is the one counted")


def count_on_the_gpu_path(args) -> None:
    """With ``--count``, put a run without CUDA under the device guard: it must be asked for before
    the run's device is decided (``runtime.device``), so before anything is built. (Under CUDA the
    guard stays off by itself.)"""
    if args.count:
        os.environ[device_guard.ENV] = "1"


def print_counts(title: str, counts: dict) -> None:
    """A table of ``LaunchCounter.as_dict()``: ops, kernels, syncs and async copies by phase."""
    print(f"{title}:")
    for phase, c in counts.items():
        kinds = ", ".join(f"{kind} {n}" for kind, n in sorted(c["sync_kinds"].items(), key=lambda kv: -kv[1]))
        print(f"  {phase:<18} ops {c['ops']:>9,}  kernels {c['kernels']:>8,}  syncs {c['syncs']:>6,}"
              f"  async copies {c['async_copies']:>3}" + (f"  ({kinds})" if kinds else ""))


def layout_from(args):
    from ebft_megatron.block_layout import BlockLayout

    return BlockLayout(args.chunk_len, args.first_anchor, args.stride, args.rollout_len, args.num_samples)


def model_checkpoint(args) -> Path:
    """The megatron checkpoint the benchmark runs (see :func:`add_model_arguments`): SmolLM2-135M-
    Instruct (downloaded and converted once), or a random-weight model of its shape."""
    from ebft_megatron import assets

    if args.random_weights:
        return smollm2_random_checkpoint(args.layers, args.experts)
    if args.layers is not None or args.experts:
        raise SystemExit("--layers and --experts need --random-weights (SmolLM2-135M's weights come with its "
                         "30 dense layers)")
    return assets.smollm2_checkpoint()


def smollm2_random_checkpoint(layers: int | None = None, experts: int = 0) -> Path:
    """SmolLM2-135M's shape (with ``layers`` layers; with ``experts`` > 0 a Mixtral of that many
    experts of half the FFN width, 2 per token) with random weights (:func:`random_weight_checkpoint`),
    made once and kept under the cache folder (``$EBFT_CACHE_DIR``)."""
    from ebft_megatron import assets

    hf_config = json.loads(SMOLLM2_CONFIG.read_text())
    if layers is not None:
        hf_config["num_hidden_layers"] = layers
    if experts:
        hf_config.update(architectures=["MixtralForCausalLM"], model_type="mixtral", num_local_experts=experts,
                         num_experts_per_tok=2, intermediate_size=hf_config["intermediate_size"] // 2,
                         sliding_window=None, router_aux_loss_coef=0.001)
    digest = hashlib.sha256(json.dumps(hf_config, sort_keys=True).encode()).hexdigest()[:12]
    name = f"smollm2-135m_{hf_config['num_hidden_layers']}layers_{digest}"
    return random_weight_checkpoint(assets.cache_dir() / "random_weights" / name, hf_config)


def random_weight_checkpoint(out: Path, hf_config: dict, seed: int = 0) -> Path:
    """A model of the architecture ``hf_config`` (a Hugging Face config.json's fields, ``model_type``
    included) with random weights, and a byte-level BPE tokenizer trained on this Python's standard
    library (at most the model's vocabulary; ``<|endoftext|>`` is id 0, the model's BOS and EOS),
    converted to a megatron checkpoint at ``out``; reused when ``out`` holds one. Nothing is
    downloaded. The Hugging Face folder it is converted from is removed afterwards."""
    from ebft_megatron.checkpoint import convert, store

    out = Path(out)
    try:
        store.read_meta(out)
        return out
    except store.CheckpointError:
        shutil.rmtree(out, ignore_errors=True)
    import torch
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from ebft_megatron.data.sources import python_stdlib_dir

    hf_dir = out.with_name(out.name + "_hf")
    shutil.rmtree(hf_dir, ignore_errors=True)
    fields = dict(hf_config, bos_token_id=0, eos_token_id=0)
    files = sorted(python_stdlib_dir().glob("*.py"))[:TOKENIZER_FILES]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator((f.read_text(errors="replace") for f in files), trainer=trainers.BpeTrainer(
        vocab_size=fields["vocab_size"], special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    config = tf.AutoConfig.for_model(fields.pop("model_type"), **fields)
    torch.manual_seed(seed)
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(str(hf_dir))
    fast.save_pretrained(str(hf_dir))
    convert.hf_to_mcore(hf_dir, out, log=lambda *_: None)
    shutil.rmtree(hf_dir)
    return out


def text_tokens(tokenizer, count: int, module: str = "argparse.py") -> list[int]:
    """The first ``count`` tokens of a standard-library module's source (repeated if it is short)."""
    from ebft_megatron.data.sources import python_stdlib_dir

    text = (python_stdlib_dir() / module).read_text()
    ids = tokenizer.encode(text)
    return (ids * (count // len(ids) + 1))[:count]


def synchronize() -> None:
    """Wait for the device's queued work (CUDA runs kernels asynchronously: a clock read without
    this measures the time to queue them)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def device_clock() -> float:
    """``time.perf_counter()`` once the device's queued work has run."""
    synchronize()
    return time.perf_counter()


class DeviceTimer(PhaseTimer):
    """The trainer's PhaseTimer, waiting for the device at each phase's ends (on CUDA a phase's
    clock would otherwise stop when its kernels are queued, not when they have run), unless
    ``waits`` is off (a counted run counts what the trainer does, not the benchmark's waits)."""

    waits = True

    @contextmanager
    def phase(self, name: str):
        if self.waits:
            synchronize()
        with super().phase(name):
            yield
            if self.waits:
                synchronize()


def peak_gpu_bytes() -> int | None:
    """torch's max allocated CUDA memory since the process began (or the last reset); None off CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    synchronize()
    return torch.cuda.max_memory_allocated()


class StepBench:
    """The model at ``checkpoint`` (fp32, one process) as the trainer builds it: the policy with the
    given recompute setting in megatron's DDP with distributed Adam, and the frozen feature network
    (with ``lora_rank`` > 0: LoRA adapters on a frozen policy that is its own feature network); one
    real chunk of Python source (the standard library's argparse module), on the run's device; the
    training config's defaults for everything else. ``step("sft")`` and ``step("ebft")`` each run
    one optimizer step and return its wall time by phase, as the trainer times them (on CUDA waiting
    for the device at each phase's ends), and its loss; ``count("sft")`` and ``count("ebft")`` run
    one more, under a launch counter whose phases are the timer's."""

    def __init__(self, layout, checkpoint: Path, recompute: str = "selective", attention: str = "fused",
                 logit_chunk_rows: int = 1024, lora_rank: int = 0):
        import torch

        from ebft_megatron.config import load_config
        from ebft_megatron.objective.objectives import EBFT, SFT, Batch, ObjectiveContext
        from ebft_megatron.rollouts.sampler import rollout_generator
        from ebft_megatron.runtime import device
        from ebft_megatron.training import builder

        self.layout = r = layout
        config = load_config(None, [  # the training defaults for everything not set here
            f"model.load={checkpoint}", f"model.recompute={recompute}", f"model.attention={attention}",
            f"model.logit_chunk_rows={logit_chunk_rows}", f"rollout.chunk_len={r.chunk_len}",
            f"rollout.first_anchor={r.first_anchor}", f"rollout.stride={r.stride}",
            f"rollout.rollout_len={r.rollout_len}", f"rollout.num_samples={r.num_samples}", "train.seed=43",
            f"lora.rank={lora_rank}"])
        builder.initialize(config)
        self.arch = arch = builder.architecture(config)
        self.policy = builder.policy(config, arch)
        # with adapters: the policy with its adapters off, as the trainer does; else a frozen copy
        self.features = builder.feature_network(config, self.policy)
        self.ddp, self.optimizer = builder.optimizer(config, self.policy)
        tokens = text_tokens(builder.tokenizer(config, arch), layout.chunk_len)
        self.batch = device.to_device(Batch(torch.tensor(tokens)[None], torch.tensor([layout.chunk_len])))
        self.timer = DeviceTimer()
        context = ObjectiveContext(layout, arch.vocab_size, rollout_generator(43, 0), self.features, timer=self.timer)
        self.objectives = {"sft": SFT.from_config(config, context), "ebft": EBFT.from_config(config, context)}

    def step(self, mode: str) -> tuple[dict[str, float], dict[str, float]]:
        """One optimizer step of ``mode`` (sft or ebft) on the chunk: (seconds by phase and in
        total, the step's loss terms)."""
        self._zero_grads()
        self.timer.take()
        started = device_clock()
        terms = self._run(mode)
        return {**self.timer.take(), "total": device_clock() - started}, terms

    def count(self, mode: str):
        """One more optimizer step of ``mode`` under a LaunchCounter (returned), without the
        benchmark's clock waits: the step's phases are the trainer's PhaseTimer phases (rollouts,
        features, rewards, forward_backward, optimizer), zeroing the gradients is outside them."""
        self.timer.waits = False
        try:
            with LaunchCounter() as counter:
                self._zero_grads()
                self._run(mode)
        finally:
            self.timer.waits = True
            self.timer.take()
        return counter

    def _zero_grads(self) -> None:
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()

    def _run(self, mode: str) -> dict[str, float]:
        from ebft_megatron.training.optimizer import finish_step, prepare_step
        from ebft_megatron.training.step import loss_terms, read_figures, term_names

        objective = self.objectives[mode]
        experience = objective.experience(self.batch, self.ddp)
        with self.timer.phase("forward_backward"):
            terms = loss_terms(self.ddp, [experience], objective)
        with self.timer.phase("optimizer"):  # as the trainer steps: one read of the step's figures
            names = term_names(objective, self.ddp)
            figures = read_figures(names, terms, [experience.metrics], prepare_step(self.optimizer))
            finish_step(self.optimizer, figures["grad_norm"])
        return {name: figures[name] for name in names}
