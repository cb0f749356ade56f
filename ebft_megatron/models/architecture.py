"""Hugging Face ``config.json`` -> a validated, family-independent description of the model.

Supported families: Llama (incl. Llama-3 rope scaling), Qwen2 (q/k/v bias), Mistral, Qwen3 (per-head
q/k RMSNorm, explicit head_dim), and two mixtures of experts: Qwen3-MoE (Qwen3's attention, every
layer's MLP a set of routed SwiGLU experts) and Mixtral (Mistral's attention, the same). Anything
else, other MoE variants included, is refused here, before a model is built, with the list of what
is supported.

A mixture-of-experts layer routes each token to ``experts_per_token`` of ``num_experts`` experts by a
softmax over the router's logits; ``normalize_top_k`` says whether the chosen experts' weights are
renormalised to sum to one (Mixtral always; Qwen3-MoE when ``norm_topk_prob``). Routing is
dropless: every token reaches every expert it chose, whatever the batch holds.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from ebft_megatron.errors import UserError

# The one dtype vocabulary: settings, checkpoints and tools all name dtypes these ways.
DTYPES = ("float32", "bfloat16")


def torch_dtype(name: str):
    """The torch dtype of a dtype name (torch is imported here, on first use, so that reading
    settings and architectures stays light)."""
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "MistralForCausalLM": "mistral",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "MixtralForCausalLM": "mixtral",
}

# Families whose attention RMS-normalises each head's query and key (own weights of head_dim,
# shared by all heads) before the rotary embedding.
QK_NORM_FAMILIES = ("qwen3", "qwen3_moe")
# Families whose every layer's MLP is a mixture of routed experts.
MOE_FAMILIES = ("qwen3_moe", "mixtral")

# The padded vocabulary is a multiple of this, independent of TP, so that a checkpoint has the same
# tensor shapes at every TP size (TP must divide it). 128 is megatron-LM's default granule.
VOCAB_GRANULE = 128


class ModelConfigError(UserError, ValueError):
    """A model config that we cannot build, with what to do about it."""


@dataclass(frozen=True)
class Llama3RopeScaling:
    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelArchitecture:
    family: str
    hf_architecture: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    qkv_bias: bool
    rope_scaling: Optional[Llama3RopeScaling] = None
    sliding_window: Optional[int] = None
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    # defaults to off so that checkpoints written before the field existed still describe their model
    qk_norm: bool = False
    # mixture of experts (None: a dense MLP); ffn_hidden_size is then each expert's
    num_experts: Optional[int] = None
    experts_per_token: Optional[int] = None
    normalize_top_k: bool = True
    router_aux_loss_coef: Optional[float] = None  # the weight its authors trained the router with
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def is_moe(self) -> bool:
        return self.num_experts is not None

    @property
    def padded_vocab_size(self) -> int:
        return int(math.ceil(self.vocab_size / VOCAB_GRANULE) * VOCAB_GRANULE)

    def default_feature_layers(self) -> tuple[int, ...]:
        """Layers after which the reference reads features: floor(L/4), floor(L/2), floor(3L/4),
        each clamped to [1, L] (1-based: "after layer k" = HF hidden_states[k]); a layer that
        models of fewer than 4 layers would name twice is named once."""
        L = self.num_layers
        return tuple(sorted({min(max(int(q * L), 1), L) for q in (0.25, 0.5, 0.75)}))

    def check_parallel(self, tp: int, pp: int, ep: int = 1) -> None:
        """Refuse layouts that cannot shard this model, before any compute."""
        problems = []
        if ep > 1 and not self.is_moe:
            problems.append(f"expert parallel size {ep} needs a mixture-of-experts model ({self.hf_architecture} "
                            "has no experts; set parallel.ep=1)")
        elif self.is_moe and self.num_experts % ep:
            valid_ep = [e for e in range(1, self.num_experts + 1) if self.num_experts % e == 0]
            problems.append(f"expert parallel size {ep} does not divide num_experts={self.num_experts} "
                            f"(valid: {valid_ep})")
        if self.num_attention_heads % tp:
            problems.append(f"tensor parallel size {tp} does not divide num_attention_heads={self.num_attention_heads}")
        if self.num_query_groups % tp:
            problems.append(
                f"tensor parallel size {tp} does not divide num_key_value_heads={self.num_query_groups}"
            )
        if self.ffn_hidden_size % tp:
            problems.append(f"tensor parallel size {tp} does not divide intermediate_size={self.ffn_hidden_size}")
        if self.padded_vocab_size % tp:
            problems.append(f"tensor parallel size {tp} does not divide the padded vocabulary {self.padded_vocab_size}")
        if self.num_layers % pp:
            problems.append(f"pipeline parallel size {pp} does not divide num_hidden_layers={self.num_layers}")
        if problems:
            valid_tp = [t for t in (1, 2, 4, 8, 16) if self.num_attention_heads % t == 0
                        and self.num_query_groups % t == 0 and self.ffn_hidden_size % t == 0]
            valid_pp = [p for p in range(1, self.num_layers + 1) if self.num_layers % p == 0]
            raise ModelConfigError(
                "cannot shard the model: " + "; ".join(problems)
                + f". Valid tensor parallel sizes: {valid_tp}; valid pipeline parallel sizes: {valid_pp}."
            )

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "ModelArchitecture":
        data = dict(data)
        if data.get("rope_scaling"):
            data["rope_scaling"] = Llama3RopeScaling(**data["rope_scaling"])
        return cls(**data)


def _require(config: dict, key: str, source: str):
    if key not in config:
        raise ModelConfigError(f"{source}: missing required key '{key}'")
    return config[key]


def from_hf_config(config: dict, source: str = "config.json") -> ModelArchitecture:
    """Parse a Hugging Face config dict. ``source`` names the file in error messages."""
    archs = config.get("architectures") or []
    model_type = config.get("model_type")
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None and not archs:
        # model_type only when the config names no architecture: a named one that is not ours
        # (e.g. Qwen3MoeForCausalLM) must not pass as its dense relative
        by_type = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}
        arch = by_type.get(model_type)
    if arch is None:
        raise ModelConfigError(unsupported_message(archs or model_type, source))
    family = SUPPORTED_ARCHITECTURES[arch]
    hidden = int(_require(config, "hidden_size", source))
    heads = int(_require(config, "num_attention_heads", source))
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    if heads % kv_heads:
        raise ModelConfigError(f"{source}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise ModelConfigError(f"{source}: hidden_act={act!r} is not supported (only 'silu' / SwiGLU)")

    # transformers v5 writes "rope_parameters" (theta and scaling together); v4 writes
    # "rope_theta" and "rope_scaling". Read both.
    rope_parameters = config.get("rope_parameters") or {}
    rope_theta = config.get("rope_theta", rope_parameters.get("rope_theta", 10000.0))
    rope_scaling = None
    scaling = config.get("rope_scaling") or rope_parameters
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind == "llama3":
            rope_scaling = Llama3RopeScaling(
                factor=float(scaling["factor"]),
                low_freq_factor=float(scaling["low_freq_factor"]),
                high_freq_factor=float(scaling["high_freq_factor"]),
                original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
            )
        elif kind not in (None, "default"):
            raise ModelConfigError(f"{source}: rope_scaling type {kind!r} is not supported (only 'llama3')")

    if family == "qwen2":
        qkv_bias = True
    elif family in ("qwen3", "qwen3_moe"):
        # Qwen3's attention_bias puts a bias on o_proj as well, which the model has no place for
        if config.get("attention_bias"):
            raise ModelConfigError(f"{source}: attention_bias=true is not supported for Qwen3")
        qkv_bias = False
    else:
        qkv_bias = bool(config.get("attention_bias", False))
    if family != "qwen2" and config.get("mlp_bias"):
        raise ModelConfigError(f"{source}: mlp_bias=true is not supported")

    sliding_window = config.get("sliding_window")
    if family in ("qwen2", "qwen3", "qwen3_moe") and not config.get("use_sliding_window", False):
        sliding_window = None
    if family in ("qwen3", "qwen3_moe"):
        # the model attends over the whole sequence in every layer; a Qwen3 that windows some
        # layers would silently compute something else
        windowed = [t for t in config.get("layer_types") or () if t != "full_attention"]
        if sliding_window is not None or windowed:
            raise ModelConfigError(f"{source}: sliding-window attention (use_sliding_window=true) is not supported "
                                   "for Qwen3")

    eos = config.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    moe = _experts(config, family, source) if family in MOE_FAMILIES else {}

    return ModelArchitecture(
        family=family,
        hf_architecture=arch,
        num_layers=int(_require(config, "num_hidden_layers", source)),
        hidden_size=hidden,
        ffn_hidden_size=moe.pop("ffn_hidden_size", None) or int(_require(config, "intermediate_size", source)),
        num_attention_heads=heads,
        num_query_groups=kv_heads,
        head_dim=head_dim,
        vocab_size=int(_require(config, "vocab_size", source)),
        max_position_embeddings=int(config.get("max_position_embeddings", 4096)),
        norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope_theta),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        rope_scaling=rope_scaling,
        sliding_window=int(sliding_window) if sliding_window else None,
        bos_token_id=config.get("bos_token_id"),
        eos_token_id=eos,
        qk_norm=family in QK_NORM_FAMILIES,
        **moe,
    )


def _experts(config: dict, family: str, source: str) -> dict:
    """The mixture-of-experts fields of a Qwen3-MoE or Mixtral config; variants the model cannot
    compute exactly (dense layers between sparse ones, jittered routing) are refused."""
    # transformers 5 writes either family's expert count as num_local_experts; Qwen3-MoE's published
    # configs call it num_experts
    key = "num_experts" if "num_experts" in config else "num_local_experts"
    num_experts = int(_require(config, key, source))
    if family == "qwen3_moe":
        ffn = int(_require(config, "moe_intermediate_size", source))
        normalize = bool(config.get("norm_topk_prob", False))
        if int(config.get("decoder_sparse_step", 1)) != 1 or config.get("mlp_only_layers"):
            raise ModelConfigError(f"{source}: dense MLP layers between the expert layers (decoder_sparse_step != 1 "
                                   "or mlp_only_layers) are not supported; every layer must be a mixture of experts")
    else:
        ffn = int(_require(config, "intermediate_size", source))
        normalize = True
        if float(config.get("router_jitter_noise") or 0.0):
            raise ModelConfigError(f"{source}: router_jitter_noise={config['router_jitter_noise']} is not supported: "
                                   "noisy routing would send identical tokens to different experts (set it to 0)")
    top_k = int(_require(config, "num_experts_per_tok", source))
    if not 1 <= top_k <= num_experts:
        raise ModelConfigError(f"{source}: num_experts_per_tok={top_k} must be between 1 and the {num_experts} experts")
    return dict(num_experts=num_experts, experts_per_token=top_k, normalize_top_k=normalize, ffn_hidden_size=ffn,
                router_aux_loss_coef=float(config.get("router_aux_loss_coef") or 0.0))


def unsupported_message(name, source: str) -> str:
    """One error line: what the config names, and every architecture that is supported."""
    supported = ", ".join(f"{a} ({f})" for a, f in SUPPORTED_ARCHITECTURES.items())
    names = name if isinstance(name, list) else [name]
    moe = any(word in str(n).lower() for n in names for word in ("moe", "deepseek", "gptoss", "gpt_oss"))
    why = " (of the mixtures of experts, Qwen3-MoE and Mixtral are supported)" if moe else ""
    return f"{source}: unsupported architecture {name!r}{why}; supported: {supported}"


def load_hf_config(hf_dir: str | Path) -> tuple[dict, ModelArchitecture]:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise ModelConfigError(f"{path}: not found; point at a Hugging Face model folder that has config.json")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ModelConfigError(f"{path}: not valid JSON (line {err.lineno}: {err.msg})") from None
    return config, from_hf_config(config, source=str(path))
