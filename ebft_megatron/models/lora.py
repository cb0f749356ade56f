"""LoRA adapters on a built megatron-core GPT model, tensor-parallel.

Adapters are attached after the base weights are loaded, so base checkpoints load unchanged, and
the base parameters are frozen: megatron's DDP only buffers parameters that require gradients,
so DDP's gradient buffers and the (distributed) optimizer's fp32 copies and Adam moments hold the
adapters alone. Switching the adapters off (:func:`adapters_disabled`) gives back exactly the base
model, which is what lets the policy double as the frozen feature network.

Each target linear (``linear_qkv``, ``linear_proj``, ``linear_fc1``, ``linear_fc2``) gets a
:class:`LoraAdapter` attached to the linear's parent module (``linear_qkv_lora`` beside
``linear_qkv``), so it lives on its layer's pipeline stage and in its layer's state dict, and a
forward hook on the linear that adds ``scale * B (A x)`` (scale = alpha / rank) to the linear's
output. B starts at zero, so a fresh adapter leaves the model unchanged; A is drawn uniformly in
+-1/sqrt(in), which is what PEFT's kaiming-uniform (a = sqrt(5)) amounts to. A is drawn full size
from a generator seeded by the layer and target, then sharded: the same adapters on any layout.

Tensor parallelism. W is [out, in]; y = W x, plus the adapter's scale * B A x.

Column-parallel linear (qkv, fc1): the output is sharded, y_k = W_k x on TP rank k, with x the
same on every rank. Then A [r, in] is replicated and B is sharded like W's rows, B_k [out/tp, r]:
  h = A x                    (the same on every rank)
  y_k += scale * B_k h
In backward each rank only sees dy_k, so its dh_k = scale * B_k^T dy_k is a partial sum: the full
dh is the sum over ranks. ``copy_to_tensor_model_parallel_region`` on h (identity forward,
all-reduce backward) makes dh complete and identical on every rank, hence A's gradient (dh x^T)
and the adapter's part of dx (A^T dh) are too, as the replicated A and the replicated x need. It
reduces r numbers per token instead of the in numbers that reducing dx would.

Row-parallel linear (proj, fc2): the input is sharded, x_k on rank k, and y = sum_k W_k x_k is
all-reduced inside the linear, so the base output is the same on every rank. Then A is sharded
on its input dimension, A_k [r, in/tp], and B [out, r] is replicated:
  h = sum_k A_k x_k          (``reduce_from_tensor_model_parallel_region``: all-reduce forward)
  y += scale * B h           (the same on every rank)
In backward dy is the same on every rank, so dh = scale * B^T dy is complete everywhere (the
region's backward is the identity), and dA_k = dh x_k^T, dx_k = A_k^T dh are each rank's own.

Sharded adapter parameters carry megatron's TP attributes (``tensor_model_parallel``,
``partition_dim``, ``partition_stride``), so the gradient norm counts them once per shard and the
replicated ones once in all. The SwiGLU fc1's output rows on rank k are [gate_k; up_k], so its B
is kept as [2, ffn/tp, r] (full: [2, ffn, r], gate then up), sharded along dimension 1: a
contiguous slice of the full tensor on every rank, which dist checkpointing can address.

Sequence parallelism is refused: the column-parallel input would be the sequence-sharded
activation before megatron's all-gather inside the linear.

Mixtures of experts: adapters go on the attention (qkv, proj) only; the router and the experts stay
frozen, and the MLP targets are refused (:func:`check_targets`). An adapter per expert would
multiply the adapters, their gradients and Adam's moments by the number of experts (128 in
Qwen3-30B-A3B) while each one learns from the few tokens routed to it, and would make the adapters
expert-parallel parameters, reduced over other ranks than the rest. Adapting the router would
move tokens between experts the base model trained together. The attention is where a dense
model's LoRA has most of its effect, and every token passes through it.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ebft_megatron.errors import UserError
from ebft_megatron.models.output import unwrap

TARGETS = {"qkv": ("self_attention", "linear_qkv", "column"), "proj": ("self_attention", "linear_proj", "row"),
           "fc1": ("mlp", "linear_fc1", "column"), "fc2": ("mlp", "linear_fc2", "row")}
# per target, so that each linear of a layer draws its own A from the init seed
_TARGET_INDEX = {name: i for i, name in enumerate(TARGETS)}
# the targets a mixture of experts' layer has (its MLP is a router and experts, left frozen)
MOE_TARGETS = ("qkv", "proj")


class LoraError(UserError, ValueError):
    pass


@dataclass
class LoraState:
    """What a model's adapters are (kept on the model as ``model.lora``): the settings a checkpoint
    records, the switch the hooks read, and the hook handles."""

    rank: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]
    enabled: bool = True
    handles: list = field(default_factory=list, repr=False)
    base: str = ""  # the base checkpoint the frozen weights came from (recorded in LoRA checkpoints)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@functools.lru_cache(maxsize=None)  # one class (megatron is imported lazily)
def _adapter_class():
    from megatron.core.transformer.module import MegatronModule

    class LoraAdapter(MegatronModule):
        """The A and B of one target linear, on this TP rank (see the module docstring for the
        shapes). ``kind`` is "column" or "row"; ``glu`` marks the SwiGLU fc1, whose B is
        [2, ffn/tp, r]."""

        def __init__(self, config, kind: str, target: str, in_features: int, out_features: int, rank: int,
                     glu: bool, dtype):
            super().__init__(config=config)
            from megatron.core import parallel_state as ps

            self.kind, self.target, self.glu, self.rank = kind, target, glu, rank
            self.tp = ps.get_tensor_model_parallel_world_size()
            self.tp_rank = ps.get_tensor_model_parallel_rank()
            # local shapes, from the linear's own (local) weight: in/out as this rank holds them
            if kind == "column":
                a_shape = (rank, in_features)
                b_shape = (2, out_features // 2, rank) if glu else (out_features, rank)
            else:
                a_shape, b_shape = (rank, in_features), (out_features, rank)
            self.lora_a = torch.nn.Parameter(torch.zeros(a_shape, dtype=dtype))
            self.lora_b = torch.nn.Parameter(torch.zeros(b_shape, dtype=dtype))
            from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes

            # tensor_model_parallel=False on the replicated one too: megatron's gradient norm and
            # checkpointing read the attribute, and a missing one is taken as replicated anyway
            sharded, replicated = (self.lora_b, self.lora_a) if kind == "column" else (self.lora_a, self.lora_b)
            set_tensor_model_parallel_attributes(sharded, True, self.shard_dim(sharded is self.lora_b), 1)
            set_tensor_model_parallel_attributes(replicated, False, 0, 1)

        def shard_dim(self, of_b: bool) -> int:
            """The dimension the sharded tensor is split along over TP."""
            if of_b:
                return 1 if self.glu else 0
            return 1

        def full_shapes(self) -> dict[str, tuple[int, ...]]:
            """The TP1 shapes of lora_a and lora_b."""
            shapes = {}
            for name in ("lora_a", "lora_b"):
                param = getattr(self, name)
                shape = list(param.shape)
                if getattr(param, "tensor_model_parallel", False):
                    shape[param.partition_dim] *= self.tp
                shapes[name] = tuple(shape)
            return shapes

        def shard(self, name: str, full: torch.Tensor) -> torch.Tensor:
            """This rank's part of a full (TP1) lora_a / lora_b."""
            param = getattr(self, name)
            if not getattr(param, "tensor_model_parallel", False) or self.tp == 1:
                return full
            return full.chunk(self.tp, dim=param.partition_dim)[self.tp_rank]

        def set_full(self, lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
            """Set both from full (TP1) tensors (the same on every rank)."""
            with torch.no_grad():
                for name, full in (("lora_a", lora_a), ("lora_b", lora_b)):
                    getattr(self, name).copy_(self.shard(name, full.to(getattr(self, name).dtype)))

        def delta(self, x: torch.Tensor, scale: float, dropout: float) -> torch.Tensor:
            """scale * B (A x) for this rank: its slice of the output (column), or the whole
            output increment (row)."""
            from megatron.core import tensor_parallel

            if dropout and self.training:
                # the default generator, seeded alike and drawn in lockstep on the ranks of a TP
                # group: the column case's replicated x gets one mask on every rank, as it must
                # (h has to agree); the row case's shards get the same pattern each, still an
                # unbiased dropout of every element
                x = torch.nn.functional.dropout(x, dropout, training=True)
            h = torch.matmul(x, self.lora_a.t())
            if self.kind == "column":
                if self.tp > 1:
                    h = tensor_parallel.copy_to_tensor_model_parallel_region(h)
                b = self.lora_b.reshape(-1, self.rank)
            else:
                if self.tp > 1:
                    h = tensor_parallel.reduce_from_tensor_model_parallel_region(h)
                b = self.lora_b
            return torch.matmul(h, b.t()) * scale

        def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
            from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

            state = self.state_dict(prefix="", keep_vars=True)
            axis = {name: getattr(self, name).partition_dim for name in ("lora_a", "lora_b")
                    if getattr(getattr(self, name), "tensor_model_parallel", False)}
            return make_sharded_tensors_for_checkpoint(state, prefix, axis, sharded_offsets)

    return LoraAdapter


def _init_a(full_shape, layer_number: int, target: str, seed: int) -> torch.Tensor:
    """A drawn U(-1/sqrt(in), 1/sqrt(in)) in full size: kaiming-uniform with a = sqrt(5) has
    gain sqrt(2 / (1 + 5)) and bound gain * sqrt(3 / fan_in) = 1 / sqrt(fan_in). The generator
    depends only on (seed, layer, target), so every layout draws the same full A."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + layer_number * 16 + _TARGET_INDEX[target])
    bound = 1.0 / math.sqrt(full_shape[-1])
    return torch.empty(full_shape).uniform_(-bound, bound, generator=gen)


def _norm_of_fused_linear(linear):
    """Transformer Engine's LayerNorm+Linear takes the un-normalised residual stream and
    normalises it inside: the adapter has to see the normalised input, as the base matmul does.
    Returns a function x -> RMSNorm(x), or None for a plain linear."""
    weight = getattr(linear, "layer_norm_weight", None)
    if weight is None:
        return None
    config = linear.config
    if config.normalization != "RMSNorm":
        raise LoraError(f"LoRA on Transformer Engine's fused norm+linear supports RMSNorm, not {config.normalization}")
    eps, centered = config.layernorm_epsilon, config.layernorm_zero_centered_gamma

    def norm(x):
        x32 = x.float()
        w = weight.float() + 1 if centered else weight.float()
        return (x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + eps) * w).to(x.dtype)

    return norm


def _hook(state: LoraState, adapter, norm):
    def hook(module, args, kwargs, output):
        if not state.enabled:
            return None
        x = args[0] if args else next(iter(kwargs.values()))  # megatron's "input_", TE's "inp"
        if norm is not None:
            x = norm(x)
        out, bias = output
        return out + adapter.delta(x, state.scale, state.dropout).to(out.dtype), bias

    return hook


def check_targets(targets: Sequence[str], is_moe: bool) -> None:
    """Refuse targets a model's layers do not have: a mixture of experts' MLP takes no adapters."""
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown:
        raise LoraError(f"unknown LoRA targets {unknown}; choose among {', '.join(TARGETS)}")
    mlp = sorted(set(targets) - set(MOE_TARGETS))
    if is_moe and mlp:
        raise LoraError(f"lora.targets {mlp}: a mixture of experts' MLP (its router and experts) stays frozen under "
                        f"LoRA; set lora.targets=[{','.join(MOE_TARGETS)}]")


def attach_adapters(model, rank: int, alpha: float = 16.0, dropout: float = 0.0,
                    targets: Sequence[str] = tuple(TARGETS), seed: int = 0) -> LoraState:
    """Attach adapters to this stage's layers (after its base weights are loaded), freeze every
    base parameter, and keep the state as ``model.lora``. Returns it."""
    if rank < 1:
        raise LoraError(f"LoRA rank must be at least 1, got {rank}")
    check_targets(targets, model.config.num_moe_experts is not None)
    if getattr(model, "lora", None) is not None:
        raise LoraError("the model already has LoRA adapters")
    config = model.config
    if config.sequence_parallel:
        raise LoraError("LoRA does not run with sequence parallelism (the adapters need the full sequence on "
                        "every TP rank); turn parallel.sequence_parallel off")
    for param in model.parameters():
        param.requires_grad_(False)
    state = LoraState(rank, float(alpha), float(dropout), tuple(targets))
    adapter_class = _adapter_class()
    for layer in model.decoder.layers:
        for target in targets:
            parent_name, linear_name, kind = TARGETS[target]
            parent = getattr(layer, parent_name)
            linear = getattr(parent, linear_name)
            out_local, in_local = linear.weight.shape
            glu = target == "fc1" and config.gated_linear_unit
            dtype = linear.weight.dtype
            adapter = adapter_class(config, kind, target, in_local, out_local, rank, glu, dtype)
            adapter.to(linear.weight.device)
            full_a = _init_a(adapter.full_shapes()["lora_a"], layer.layer_number, target, seed)
            adapter.set_full(full_a, torch.zeros(adapter.full_shapes()["lora_b"]))
            adapter.train(model.training)
            parent.add_module(f"{linear_name}_lora", adapter)
            hook = _hook(state, adapter, _norm_of_fused_linear(linear))
            state.handles.append(linear.register_forward_hook(hook, with_kwargs=True))
    if getattr(model, "pre_process", False):
        state.handles.append(model.embedding.register_forward_hook(_input_requires_grad))
    model.lora = state
    return state


def _input_requires_grad(module, args, output):
    """The frozen embedding's output would not require gradients, and then neither would the
    first layer's input. megatron's activation recompute needs it to: the norm recompute of
    selective recompute saves nothing to recompute from, and full recompute's checkpoint
    (reentrant) gives the layers inside it no gradients at all. Asking for the gradient of the
    embedding's output (a leaf) costs one [tokens, hidden] gradient on the first stage."""
    if torch.is_grad_enabled() and not output.requires_grad:
        return output.detach().requires_grad_(True)
    return None


def adapters(model):
    """(name, adapter) for every adapter of this stage, names as in ``model.named_modules()``."""
    for name, module in model.named_modules():
        if name.endswith("_lora") and hasattr(module, "lora_a"):
            yield name, module


def lora_parameters(model) -> list[torch.nn.Parameter]:
    return [p for _, a in adapters(model) for p in (a.lora_a, a.lora_b)]


def has_adapters(model) -> bool:
    return getattr(unwrap(model), "lora", None) is not None


@contextlib.contextmanager
def adapters_disabled(model):
    """Run the model as its base model: the hooks add nothing while this is open (nests)."""
    state = getattr(unwrap(model), "lora", None)
    if state is None:
        yield model
        return
    before = state.enabled
    state.enabled = False
    try:
        yield model
    finally:
        state.enabled = before


# --- merging ---------------------------------------------------------------------------------
def merge_adapters(model) -> None:
    """Fold every adapter into its linear's weight, W += scale * B A, and remove the adapters:
    the model is then a plain model computing what the LoRA model computed (within rounding). Per
    TP shard, which is exact: a column-parallel shard is W_k + scale * B_k A (A replicated), a
    row-parallel one W_k + scale * B A_k (B replicated). fc1's B [2, ffn/tp, r] flattens to the
    shard's [gate_k; up_k] rows. The product is formed in fp32."""
    state = getattr(model, "lora", None)
    if state is None:
        raise LoraError("the model has no LoRA adapters to merge")
    with torch.no_grad():
        for layer in model.decoder.layers:
            for target in state.targets:
                parent_name, linear_name, _ = TARGETS[target]
                parent = getattr(layer, parent_name)
                adapter = getattr(parent, f"{linear_name}_lora")
                weight = getattr(parent, linear_name).weight
                delta = adapter.lora_b.float().reshape(-1, adapter.rank) @ adapter.lora_a.float()
                weight.copy_((weight.float() + state.scale * delta).to(weight.dtype))
    remove_adapters(model)


def remove_adapters(model) -> None:
    """Detach the hooks and drop the adapter modules (the base weights stay frozen)."""
    state = getattr(model, "lora", None)
    if state is None:
        return
    for handle in state.handles:
        handle.remove()
    for layer in model.decoder.layers:
        for target in state.targets:
            parent_name, linear_name, _ = TARGETS[target]
            delattr(getattr(layer, parent_name), f"{linear_name}_lora")
    model.lora = None


def adapter_sharded_state_dict(model) -> dict:
    """The adapters' part of ``model.sharded_state_dict()`` (what a LoRA checkpoint stores:
    ``checkpoint.lora``)."""
    return {key: value for key, value in model.sharded_state_dict().items() if "_lora." in key}
