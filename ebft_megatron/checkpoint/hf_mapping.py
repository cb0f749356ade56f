"""Hugging Face <-> megatron-core (local spec, TP1, EP1) state-dict mapping for Llama, Qwen2,
Mistral, Qwen3, Qwen3-MoE and Mixtral.

The families share one mapping; they differ only in what the architecture says (q/k/v bias,
Qwen3's per-head q/k norms, tied embeddings, experts). A mixture of experts' router is megatron's
``mlp.router`` (Qwen3-MoE's ``mlp.gate``, Mixtral's ``block_sparse_moe.gate``), and each expert is
a dense SwiGLU MLP, megatron's ``mlp.experts.local_experts.<j>`` (Mixtral names its gate, down and
up projections w1, w2 and w3). Neither family has shared experts. The q/k norm weights are
[head_dim] vectors used by every head, so they are copied as they are (and replicated across TP).
Resharding to TP/PP/EP > 1 is not done here: the TP1 model is saved as a dist checkpoint, and
dist_checkpointing reshards on load.

Megatron's fused ``linear_qkv`` interleaves per query group: for each group g,
[q heads of g; k_g; v_g]. SwiGLU's ``linear_fc1`` is [gate; up].
"""

from __future__ import annotations

import torch

from ebft_megatron.errors import UserError
from ebft_megatron.models.architecture import ModelArchitecture
from ebft_megatron.runtime.rows import pad_rows


class MappingError(UserError, ValueError):
    pass


def _fuse_qkv(q, k, v, arch: ModelArchitecture):
    groups, d = arch.num_query_groups, arch.head_dim
    per_group = arch.num_attention_heads // groups
    q = q.reshape(groups, per_group * d, *q.shape[1:])
    k = k.reshape(groups, d, *k.shape[1:])
    v = v.reshape(groups, d, *v.shape[1:])
    return torch.cat([q, k, v], dim=1).reshape(groups * (per_group + 2) * d, *q.shape[2:])


def _split_qkv(qkv, arch: ModelArchitecture):
    groups, d = arch.num_query_groups, arch.head_dim
    per_group = arch.num_attention_heads // groups
    fused = qkv.reshape(groups, (per_group + 2) * d, *qkv.shape[1:])
    q, k, v = fused.split([per_group * d, d, d], dim=1)
    return (
        q.reshape(groups * per_group * d, *qkv.shape[1:]),
        k.reshape(groups * d, *qkv.shape[1:]),
        v.reshape(groups * d, *qkv.shape[1:]),
    )


# Where each family keeps its experts and router, and what it calls the gate, up and down projections.
_HF_EXPERTS = {"qwen3_moe": ("mlp.", ("gate_proj", "up_proj", "down_proj")),
               "mixtral": ("block_sparse_moe.", ("w1", "w3", "w2"))}


def _mlps(arch: ModelArchitecture) -> list[tuple[str, str, tuple[str, str, str]]]:
    """A layer's dense SwiGLU MLPs, as (HF prefix, megatron prefix, HF (gate, up, down) names):
    the layer's MLP, or each of its experts."""
    if not arch.is_moe:
        return [("mlp.", "mlp.", ("gate_proj", "up_proj", "down_proj"))]
    where, names = _HF_EXPERTS[arch.family]
    return [(f"{where}experts.{j}.", f"mlp.experts.local_experts.{j}.", names) for j in range(arch.num_experts)]


def _router(arch: ModelArchitecture) -> tuple[str, str]:
    """(HF, megatron) names of a layer's router weight."""
    return _HF_EXPERTS[arch.family][0] + "gate.weight", "mlp.router.weight"


def expected_hf_keys(arch: ModelArchitecture) -> list[str]:
    keys = ["model.embed_tokens.weight", "model.norm.weight"]
    if not arch.tie_word_embeddings:
        keys.append("lm_head.weight")
    for i in range(arch.num_layers):
        p = f"model.layers.{i}."
        keys += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        for name in ("q_proj", "k_proj", "v_proj"):
            keys.append(p + f"self_attn.{name}.weight")
            if arch.qkv_bias:
                keys.append(p + f"self_attn.{name}.bias")
        keys.append(p + "self_attn.o_proj.weight")
        if arch.qk_norm:
            keys += [p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"]
        for hf_mlp, _, names in _mlps(arch):
            keys += [p + f"{hf_mlp}{n}.weight" for n in names]
        if arch.is_moe:
            keys.append(p + _router(arch)[0])
    return keys


def _some(names: list) -> str:
    more = f" (and {len(names) - 5} more)" if len(names) > 5 else ""
    return ", ".join(names[:5]) + more


def _ignorable(name: str, arch: ModelArchitecture) -> bool:
    """HF tensors that carry nothing the model needs: rotary tables some older checkpoints saved,
    and an output matrix stored next to the embedding it is tied to."""
    return name.endswith("rotary_emb.inv_freq") or (arch.tie_word_embeddings and name == "lm_head.weight")


def hf_to_mcore(hf: dict, arch: ModelArchitecture) -> dict:
    """HF tensors -> megatron TP1 state dict (local spec names)."""
    expected = expected_hf_keys(arch)
    missing = [k for k in expected if k not in hf]
    if missing:
        raise MappingError(f"the HF weights lack {_some(missing)}")
    # a tensor the mapping would not read means config.json describes another model (e.g. q/k
    # norms, biases): converting would silently drop weights
    known = set(expected)
    unused = sorted(k for k in hf if k not in known and not _ignorable(k, arch))
    if unused:
        raise MappingError(f"the HF weights hold tensors that a {arch.hf_architecture} with this config.json does "
                           f"not have: {_some(unused)}; config.json and the weights do not match")
    V = arch.padded_vocab_size
    out = {
        "embedding.word_embeddings.weight": pad_rows(hf["model.embed_tokens.weight"], V),
        "decoder.final_layernorm.weight": hf["model.norm.weight"],
    }
    if not arch.tie_word_embeddings:
        out["output_layer.weight"] = pad_rows(hf["lm_head.weight"], V)
    for i in range(arch.num_layers):
        h, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        attn = h + "self_attn."
        out[m + "input_layernorm.weight"] = hf[h + "input_layernorm.weight"]
        out[m + "pre_mlp_layernorm.weight"] = hf[h + "post_attention_layernorm.weight"]
        out[m + "self_attention.linear_qkv.weight"] = _fuse_qkv(
            hf[attn + "q_proj.weight"], hf[attn + "k_proj.weight"], hf[attn + "v_proj.weight"], arch
        )
        if arch.qkv_bias:
            out[m + "self_attention.linear_qkv.bias"] = _fuse_qkv(
                hf[attn + "q_proj.bias"], hf[attn + "k_proj.bias"], hf[attn + "v_proj.bias"], arch
            )
        out[m + "self_attention.linear_proj.weight"] = hf[attn + "o_proj.weight"]
        if arch.qk_norm:
            out[m + "self_attention.q_layernorm.weight"] = hf[attn + "q_norm.weight"]
            out[m + "self_attention.k_layernorm.weight"] = hf[attn + "k_norm.weight"]
        for hf_mlp, mc_mlp, (gate, up, down) in _mlps(arch):
            out[m + mc_mlp + "linear_fc1.weight"] = torch.cat(
                [hf[h + f"{hf_mlp}{gate}.weight"], hf[h + f"{hf_mlp}{up}.weight"]], dim=0)
            out[m + mc_mlp + "linear_fc2.weight"] = hf[h + f"{hf_mlp}{down}.weight"]
        if arch.is_moe:
            hf_router, mc_router = _router(arch)
            out[m + mc_router] = hf[h + hf_router]
    return out


def mcore_to_hf(mc: dict, arch: ModelArchitecture) -> dict:
    """megatron TP1 state dict -> HF tensors (vocabulary padding removed)."""
    V = arch.vocab_size
    out = {
        "model.embed_tokens.weight": mc["embedding.word_embeddings.weight"][:V],
        "model.norm.weight": mc["decoder.final_layernorm.weight"],
    }
    if not arch.tie_word_embeddings:
        out["lm_head.weight"] = mc["output_layer.weight"][:V]
    for i in range(arch.num_layers):
        h, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        attn = h + "self_attn."
        out[h + "input_layernorm.weight"] = mc[m + "input_layernorm.weight"]
        out[h + "post_attention_layernorm.weight"] = mc[m + "pre_mlp_layernorm.weight"]
        q, k, v = _split_qkv(mc[m + "self_attention.linear_qkv.weight"], arch)
        out[attn + "q_proj.weight"], out[attn + "k_proj.weight"], out[attn + "v_proj.weight"] = q, k, v
        if arch.qkv_bias:
            q, k, v = _split_qkv(mc[m + "self_attention.linear_qkv.bias"], arch)
            out[attn + "q_proj.bias"], out[attn + "k_proj.bias"], out[attn + "v_proj.bias"] = q, k, v
        out[attn + "o_proj.weight"] = mc[m + "self_attention.linear_proj.weight"]
        if arch.qk_norm:
            out[attn + "q_norm.weight"] = mc[m + "self_attention.q_layernorm.weight"]
            out[attn + "k_norm.weight"] = mc[m + "self_attention.k_layernorm.weight"]
        for hf_mlp, mc_mlp, (gate, up, down) in _mlps(arch):
            out[h + f"{hf_mlp}{gate}.weight"], out[h + f"{hf_mlp}{up}.weight"] = mc[
                m + mc_mlp + "linear_fc1.weight"].chunk(2, dim=0)
            out[h + f"{hf_mlp}{down}.weight"] = mc[m + mc_mlp + "linear_fc2.weight"]
        if arch.is_moe:
            hf_router, mc_router = _router(arch)
            out[h + hf_router] = mc[m + mc_router]
    return {k: v.contiguous() for k, v in out.items()}
