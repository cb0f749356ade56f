"""A memory model of one training step, per process: what to expect before launching.

The figures are bytes this process's tensors hold at the step's peak. On a GPU they compare with
``torch.cuda.max_memory_allocated()``; on a CPU the peak resident set also holds the runtime
(Python, torch, megatron), which the caller adds (``benchmarks/memory.py`` measures it before it
builds anything, and compares the sum with the measured peak).

What is counted:
- model state of this rank's pipeline stage: weights, megatron DDP's fp32 gradient buffer, Adam's
  two fp32 moments (and an fp32 master copy of low-precision weights), the last two sharded over
  data-parallel ranks by the distributed optimizer;
- the frozen feature network up to its deepest feature layer;
- then the largest of the step's phases, which run one after another:
  * rollouts: the KV cache of the chunk and every rollout token, and the prefill's working set;
  * features: one no-grad forward of the packed sequence, one layer's working set at a time;
  * training: the activations autograd keeps for backward (for every micro-batch in flight under
    pipeline parallelism), plus the working set of one layer's backward, one chunk of output-layer
    logits and the output-layer weight's gradient;
  * optimizer: one fp32 temporary the size of the optimizer's shard.

Activations kept per layer and token, in elements (h hidden, a = query width and kv = key+value
width and f = FFN width per tensor-parallel rank, d head dim), as autograd saves them with the
layer parts of ``models.layers`` and the fused block attention:
    two norms 2 x (2h + 1) (input and inverse RMS; the next linear layer keeps the output), q a,
    k kv/2, v kv/2, attention output a (shared with the output projection), SwiGLU 3f (the fc1
    output and the fc2 input), and the attention's row log-sum-exps (one per head). The rotary
    tables (cos and sin, 2d) are kept once per forward: every layer's query and key share them
    (``models.rotary``).
A mixture of experts' MLP keeps, in place of SwiGLU's 3f, per token: its k chosen experts' copies
of the token (k h; the first expert linear's input), per copy the fc1 output (2f), the activation
output and its product with the routing weight (f each, the product being fc2's input) and the
weight, and the router's scores and routing map (E each) with the top-k weights, indices and their
dispatched copies (4k): k h + 4 k f + 2E + 4k. At TP > 1 each rank routes its own share of the
tokens (``models.layers``; its copy of the share, h, is kept too) and computes the f/tp slice of
the experts for every rank's tokens. The all-to-all's receive buffers (tokens in, expert outputs
back: 2 k h per token) are working set, not kept.
Selective recompute re-runs the core attention in backward (with the fused kernels that saves
only the log-sum-exps: no score matrices are kept in the first place) and the norms, whose outputs
megatron discards once the next linear layer has used them (2 x (h + 1) fewer per layer). Full
recompute keeps each layer's input (h) and re-runs one layer at a time in backward.
(``tests/training/test_memory.py`` checks these counts against what autograd saves.)

Experts are spread over EP ranks: each holds num_experts / ep of every layer's experts, and the
distributed optimizer shards their fp32 state over the expert-data-parallel ranks (dp / ep), the
rest of the model's over dp.

LoRA (``lora_rank`` > 0): the base weights are frozen, so they hold no gradient buffer, no Adam
moments and no master copy: only the adapters do (A and B of each target linear, one of them
sharded over TP). The frozen feature network is the policy itself (no second copy) unless the run
names another checkpoint. Autograd keeps the same activations (megatron's frozen linears keep
only their weights, but each adapter's A keeps the input that a trained linear would; counted for
all four targets, an upper bound with fewer) plus each adapter's r-wide A x; the output layer gets
no weight gradient.

    python -m ebft_megatron.training.memory --config examples/ebft_qwen2.5_7b.yaml \
        --architecture examples/architectures/qwen2.5-7b.json --gpus 8

prints the estimate for a config (the model's config.json; default: the checkpoint in model.load).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

from ebft_megatron.checkpoint import store
from ebft_megatron.cli import run_cli
from ebft_megatron.config import ConfigError, layout_of, load_config
from ebft_megatron.models.architecture import from_hf_config

GIB = 1024 ** 3


@dataclass(frozen=True)
class StepShape:
    """What a step's memory depends on besides the model."""

    chunk_len: int
    packed_len: int  # tokens of the policy's forward: the chunk, plus the rollouts packed after it
    rollout_tokens: int  # NB * n * G sampled per chunk (0: the objective samples none)
    feature_forward: bool  # the objective embeds the packed sequence with the feature network
    micro_batch: int = 1
    micro_batches: int = 1
    tp: int = 1
    pp: int = 1
    dp: int = 1
    recompute: str = "selective"  # none | selective | full
    bytes_per_value: int = 4  # parameters and activations: 4 fp32, 2 bf16
    distributed_optimizer: bool = True
    logit_chunk_rows: int = 1024
    feature_layers: int = 0  # the feature network's depth (0: none is held; the trainer holds it in
    # every mode, for the evaluation's feature-matching loss, except LoRA's shared one)
    lora_rank: int = 0  # 0: full fine-tuning
    lora_targets: tuple = ("qkv", "proj", "fc1", "fc2")
    ep: int = 1  # expert parallel size (a mixture of experts'; dp / ep expert-data-parallel ranks)

    @classmethod
    def of(cls, config, arch, dp: int = 1) -> "StepShape":
        """The step a run of ``config`` on model ``arch`` takes, at ``dp`` data-parallel ranks."""
        # megatron loads on first use: the memory model is arithmetic, and its command answers --help
        # without it
        from ebft_megatron.objective.objectives import OBJECTIVES

        layout = layout_of(config)
        m, t = config.model, config.train
        objective = OBJECTIVES[config.objective.mode]
        shared_features = config.lora.rank and not m.feature_load  # LoRA: the policy, adapters off
        return cls(layout.chunk_len, objective.tokens_of(layout),
                   layout.num_rollout_tokens if objective.samples_rollouts else 0, objective.embeds_features,
                   t.micro_batch, max(1, t.chunks_per_step // (dp * t.micro_batch)), config.parallel.tp,
                   config.parallel.pp, dp, m.recompute, 2 if m.dtype == "bfloat16" else 4,
                   config.optimizer.distributed, m.logit_chunk_rows,
                   0 if shared_features else max(m.feature_layers or arch.default_feature_layers()),
                   config.lora.rank, tuple(config.lora.targets), ep=config.parallel.ep)


@dataclass(frozen=True)
class MemoryEstimate:
    model_state: float
    feature_network: float
    phases: dict = field(default_factory=dict)  # rollouts / features / training / optimizer -> bytes

    @property
    def peak(self) -> float:
        return self.model_state + self.feature_network + max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)

    def describe(self) -> str:
        parts = [f"model state {self.model_state / GIB:.2f}", f"feature network {self.feature_network / GIB:.2f}"]
        parts += [f"{name} {value / GIB:.2f}" for name, value in self.phases.items()]
        return f"peak {self.peak / GIB:.2f} GiB at {self.peak_phase} ({', '.join(parts)} GiB)"


def micro_batch_advice(arch, shape: StepShape) -> str:
    """How a step is cut into micro-batches, and what the next larger micro-batch that divides the
    rank's chunks would cost in memory: fewer, larger forwards launch fewer kernels per chunk, which
    is what a GPU's step time is made of until the model is large."""
    chunks = shape.micro_batch * shape.micro_batches
    now = (f"{shape.micro_batches} micro-batch{'es' if shape.micro_batches != 1 else ''} of {shape.micro_batch} "
           f"chunk{'s' if shape.micro_batch != 1 else ''} per step and process")
    larger = next((size for size in range(shape.micro_batch + 1, chunks + 1) if chunks % size == 0), None)
    if larger is None:
        return f"micro-batches: {now}, the largest micro-batch the step allows"
    peak_now = estimate(arch, shape).peak
    peak_then = estimate(arch, replace(shape, micro_batch=larger, micro_batches=chunks // larger)).peak
    return (f"micro-batches: {now}; train.micro_batch={larger} would make {chunks // larger} per step, with fewer "
            f"kernel launches per chunk, at a peak of {_size(peak_then)} per process instead of {_size(peak_now)}")


def _size(size: float) -> str:
    return f"{size / GIB:.2f} GiB" if size >= GIB else f"{size / 2 ** 20:.1f} MiB"


def layer_activation_elements(arch, tp: int, recompute: str) -> float:
    """Elements autograd keeps per token for one layer's backward (see the module docstring)."""
    h, d = arch.hidden_size, arch.head_dim
    heads = arch.num_attention_heads // tp
    a = heads * d
    kv = 2 * (arch.num_query_groups // tp) * d
    f = arch.ffn_hidden_size // tp
    if recompute == "full":
        return h
    kept = 2 * a + kv + (moe_activation_elements(arch, tp) if arch.is_moe else 3 * f)
    if getattr(arch, "qk_norm", False):  # the q and k norms keep their inputs and a 1/RMS per head
        kept += a + kv / 2 + heads + arch.num_query_groups // tp
    if recompute == "selective":
        return kept + 2 * h  # the norms' inputs
    return kept + 2 * (2 * h + 1) + heads  # norms' inputs, outputs and inverse RMS; log-sum-exps


def moe_activation_elements(arch, tp: int) -> float:
    """Elements a mixture of experts' MLP keeps per token for backward (see the module docstring)."""
    h, k, E, f = arch.hidden_size, arch.experts_per_token, arch.num_experts, arch.ffn_hidden_size // tp
    routing = (4 * k + 2 * E + (h if tp > 1 else 0)) / tp  # this rank's share of the tokens
    return k * h + 4 * k * f + routing


def moe_buffer_elements(arch) -> float:
    """The all-to-all's receive buffers per token of one MoE layer: the k copies going to the
    experts and the k outputs coming back (0 for a dense model)."""
    return 2 * arch.experts_per_token * arch.hidden_size if arch.is_moe else 0


def _layer_parameters(arch, tp: int) -> float:
    """One layer's parameters on a TP rank, its experts aside (:func:`_expert_layer_parameters`)."""
    h, q, kv = arch.hidden_size, arch.num_attention_heads * arch.head_dim, arch.num_query_groups * arch.head_dim
    bias = (q + 2 * kv) if arch.qkv_bias else 0
    mlp = 0 if arch.is_moe else 3 * h * arch.ffn_hidden_size
    router = arch.num_experts * h if arch.is_moe else 0  # the same on every TP rank
    return (2 * h * q + 2 * h * kv + mlp + bias) / tp + router + 2 * h


def _expert_layer_parameters(arch, tp: int, ep: int) -> float:
    """One layer's experts on a rank: num_experts / ep of them, each a SwiGLU MLP split over TP."""
    if not arch.is_moe:
        return 0.0
    return arch.num_experts // ep * 3 * arch.hidden_size * arch.ffn_hidden_size / tp


def lora_layer_parameters(arch, tp: int, rank: int, targets=("qkv", "proj", "fc1", "fc2")) -> float:
    """One layer's adapter parameters on a TP rank: a column-parallel target (qkv, fc1) holds the
    full A [r, in] and its shard of B [out/tp, r]; a row-parallel one (proj, fc2) its shard of A
    [r, in/tp] and the full B [out, r]."""
    h, q, kv, f = (arch.hidden_size, arch.num_attention_heads * arch.head_dim, arch.num_query_groups * arch.head_dim,
                   arch.ffn_hidden_size)
    sizes = {"qkv": rank * (h + (q + 2 * kv) / tp), "proj": rank * (q / tp + h),
             "fc1": rank * (h + 2 * f / tp), "fc2": rank * (f / tp + h)}
    return sum(sizes[target] for target in targets)


def stage_expert_parameters(arch, tp: int, pp: int, ep: int, layers: Optional[int] = None) -> float:
    """The experts among :func:`stage_parameters`."""
    layers = arch.num_layers if layers is None else layers
    return -(-layers // pp) * _expert_layer_parameters(arch, tp, ep)


def stage_parameters(arch, tp: int, pp: int, layers: Optional[int] = None, output_layer: bool = True,
                     ep: int = 1) -> float:
    """Parameters of the largest pipeline stage of this rank (first: embedding; last: output layer),
    its share of the experts included."""
    per_stage = stage_expert_parameters(arch, tp, pp, ep, layers)
    layers = arch.num_layers if layers is None else layers
    per_stage += -(-layers // pp) * _layer_parameters(arch, tp)
    vocab = arch.padded_vocab_size * arch.hidden_size / tp
    if pp == 1:
        untied = output_layer and not arch.tie_word_embeddings
        return per_stage + vocab * (2 if untied else 1) + arch.hidden_size
    return per_stage + vocab + (arch.hidden_size if output_layer else 0)


def estimate(arch, shape: StepShape) -> MemoryEstimate:
    s, b = shape, shape.bytes_per_value
    params = stage_parameters(arch, s.tp, s.pp, ep=s.ep)
    experts = stage_expert_parameters(arch, s.tp, s.pp, s.ep)
    shard = s.dp if s.distributed_optimizer else 1
    expert_shard = max(1, s.dp // s.ep) if s.distributed_optimizer else 1
    optimizer_bytes = 8 + (4 if b < 4 else 0)  # Adam moments (+ fp32 master weights)
    layers = -(-arch.num_layers // s.pp)
    if s.lora_rank:  # frozen weights, trained adapters (weights, gradient buffer, optimizer state)
        trained = layers * lora_layer_parameters(arch, s.tp, s.lora_rank, s.lora_targets)
        optimizer_shard = trained / shard
        model_state = params * b + trained * (b + 4) + optimizer_shard * optimizer_bytes
    else:
        optimizer_shard = (params - experts) / shard + experts / expert_shard
        model_state = params * (b + 4) + optimizer_shard * optimizer_bytes
    feature_network = 0.0
    if s.feature_layers:
        feature_network = stage_parameters(arch, s.tp, s.pp, s.feature_layers, output_layer=False, ep=s.ep) * b

    h = arch.hidden_size
    vocab = arch.padded_vocab_size / s.tp
    kv = 2 * (arch.num_query_groups // s.tp) * arch.head_dim
    tokens = s.packed_len * s.micro_batch
    # per token: one layer's forward with nothing recomputed, and a mixture of experts' all-to-all buffers
    layer_working_set = (layer_activation_elements(arch, s.tp, "none") + moe_buffer_elements(arch)) * b
    phases = {}
    if s.rollout_tokens:
        cache = layers * s.micro_batch * (s.chunk_len + s.rollout_tokens) * kv * b
        phases["rollouts"] = cache + s.chunk_len * s.micro_batch * layer_working_set
    if s.feature_forward:
        phases["features"] = tokens * layer_working_set

    in_flight = min(s.pp, s.micro_batches)
    per_layer = layer_activation_elements(arch, s.tp, s.recompute)
    if s.lora_rank and s.recompute != "full":
        per_layer += len(s.lora_targets) * s.lora_rank  # each adapter's A x, for B's gradient
    kept = layers * per_layer * b * tokens * in_flight
    # final norm and the rows handed to the output layer; the rotary tables all layers share
    outside = (3 * h + 3 + 2 * arch.head_dim) * b * tokens
    logit_rows = min(s.logit_chunk_rows, tokens) if s.logit_chunk_rows else 3 * tokens
    logits = logit_rows * vocab * (4 + (b if b < 4 else 0))  # fp32 logits (+ the matmul's own output)
    output_grad = 0 if s.lora_rank else vocab * h * 4  # the output weight's gradient, fp32
    phases["training"] = kept + outside + tokens * layer_working_set + logits + output_grad
    phases["optimizer"] = optimizer_shard * 4
    return MemoryEstimate(model_state, feature_network, phases)


def main(argv=None) -> int:
    import argparse
    import json
    from pathlib import Path

    parser = argparse.ArgumentParser(
        prog="python -m ebft_megatron.training.memory",
        description="Estimate the peak memory per GPU (or process) of one training step of a config.")
    parser.add_argument("--config", required=True, help="the run's YAML config")
    parser.add_argument("--architecture", help="the model's Hugging Face config.json (default: the checkpoint "
                                               "in model.load)")
    parser.add_argument("--gpus", type=int, help="processes in the job (default: tp x pp, i.e. DP 1)")
    parser.add_argument("overrides", nargs="*", help="section.key=value settings, as for training")
    args = parser.parse_args(argv)

    def run():
        config = load_config(args.config, args.overrides)
        if args.architecture:
            path = Path(args.architecture)
            if not path.is_file():
                raise ConfigError(f"--architecture {path} does not exist")
            arch = from_hf_config(json.loads(path.read_text()), source=str(path))
        else:
            arch = store.architecture_of(config.model.load)
        tp, pp, ep = config.parallel.tp, config.parallel.pp, config.parallel.ep
        arch.check_parallel(tp, pp, ep)
        gpus = args.gpus or tp * pp * ep
        if gpus % (tp * pp * ep):
            raise ConfigError(f"--gpus {gpus} is not a multiple of tp x ep x pp = {tp * ep * pp}")
        shape = StepShape.of(config, arch, dp=gpus // (tp * pp))
        lora = f", LoRA rank {config.lora.rank}" if config.lora.rank else ""
        experts = f" (EP{ep}: {arch.num_experts // ep} experts per layer and GPU)" if arch.is_moe else ""
        print(f"{config.objective.mode}{lora}, {config.model.dtype}, recompute {config.model.recompute}, "
              f"TP{tp} x PP{pp} x DP{shape.dp}{experts}, {shape.micro_batches} micro-batches of {shape.micro_batch} "
              f"x {shape.packed_len} tokens: {estimate(arch, shape).describe()}")

    return run_cli(run)


if __name__ == "__main__":
    raise SystemExit(main())
