"""Build a megatron-core GPTModel for one pipeline stage from a :class:`ModelArchitecture`.

- Local layer spec on CPU; Transformer Engine's spec when TE imports (``use_te``). Either way the
  core attention is our :class:`BlockCoreAttention`, so the block layout works on every path.
- Per-token position ids: megatron's plain ``rope`` ignores ``position_ids``. ``mrope`` with the
  whole rotary dimension in its first section is standard RoPE driven by per-token positions
  [3, b, s] (all three rows equal). Parameters are identical to ``rope``'s, so checkpoints do not
  care. :func:`model_forward` does the expansion, callers pass [b, s].
- Llama-3 rope scaling: the scaled inverse frequencies are computed here and set on the rotary
  module.
- Qwen3's per-head q/k RMSNorm is megatron's ``qk_layernorm``: megatron's SelfAttention applies the
  spec's ``q_layernorm``/``k_layernorm`` to each head's query and key before the rotary embedding,
  on every path (the KV-cached decode included), and ``finalize_model_grads`` sums their
  gradients over TP (each rank normalises only its own heads). The weights are [head_dim],
  replicated across TP; ``kv_channels`` is the config's head_dim, which may differ from
  hidden/heads.
- Padded vocabulary: the embedding/output have ``padded_vocab_size`` rows (a TP-independent
  multiple of 128); the padded logits are set to -inf so that softmax, cross entropy and sampling
  see exactly the model's real vocabulary.
- Output: logits, for the rows a forward asks for (``BlockAttentionParams.logit_rows``), or, with
  ``logit_chunk_rows`` > 0 and ``return_hidden``, the final hidden states, which the loss turns
  into log-probs a chunk of rows at a time (``models.output``).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Optional

import torch
import torch.nn.functional as F

from ebft_megatron.models import embedding, layers, rotary
from ebft_megatron.models.architecture import ModelArchitecture, ModelConfigError
from ebft_megatron.models.attention import BlockCoreAttention
from ebft_megatron.runtime import device, distributed, pipeline


def transformer_engine_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return True


def transformer_config(arch: ModelArchitecture, tp: int, pp: int, params_dtype=torch.float32, num_layers=None, **overrides):
    from megatron.core.transformer.transformer_config import TransformerConfig

    kwargs = dict(
        num_layers=num_layers or arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        # the MLP then calls the spec's activation module (layers.SwiGLU) on the whole fc1 output
        use_te_activation_func=True,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        mrope_section=[arch.head_dim // 2, 0, 0],
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        # megatron waits for the whole device after every batched p2p exchange between pipeline
        # stages, against a race in torch's batch_isend_irecv that the torch versions we support
        # (>= 2.6) do not have: a host sync per stage boundary and decode step
        batch_p2p_sync=False,
        bf16=params_dtype == torch.bfloat16,
        # megatron's GPU initialisation draws from CUDA's RNG tracker: only where CUDA exists; the
        # model is moved to the run's device after it is built either way
        use_cpu_initialization=not torch.cuda.is_available(),
        # Fusions are CUDA kernels; off on CPU (megatron's defaults are already off).
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        cross_entropy_loss_fusion=False,
        sequence_parallel=False,
        init_method_std=0.02,
        **expert_settings(arch, tp),
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def expert_settings(arch: ModelArchitecture, tp: int) -> dict:
    """TransformerConfig settings of a mixture-of-experts model (none for a dense one): megatron's
    MoE layer in every layer, dropless, with sequential experts (no grouped GEMM), tokens exchanged
    between expert-parallel ranks by all-to-all (which gloo has too), and the load-balancing loss
    off until a run sets its weight (``moe_aux_loss_coeff``)."""
    if not arch.is_moe:
        return {}
    ep = distributed.expert_parallel_size()
    return dict(
        num_moe_experts=arch.num_experts,
        moe_router_topk=arch.experts_per_token,
        moe_ffn_hidden_size=arch.ffn_hidden_size,
        # softmax over the top k logits = softmax over all then renormalised over the top k (Mixtral);
        # softmax over all then the top k as they are: Qwen3-MoE without norm_topk_prob
        moe_router_pre_softmax=not arch.normalize_top_k,
        moe_router_score_function="softmax",
        # dropless: no capacity, so a token's output never depends on what else is in the batch
        moe_expert_capacity_factor=None,
        moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=False,
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=0.0,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=tp,
    )


FP8_INSTALL_HINT = ("install Transformer Engine on a CUDA machine: pip install -e '.[gpu]' "
                    "(transformer-engine[pytorch], built against your CUDA torch)")


def fp8_overrides(recipe: str) -> dict:
    """TransformerConfig settings for an FP8 recipe; a clear error where TE or CUDA is missing."""
    if recipe == "none":
        return {}
    if not transformer_engine_available():
        where = "no CUDA device is visible" if not torch.cuda.is_available() else "transformer_engine does not import"
        raise ModelConfigError(f"model.fp8={recipe} needs Transformer Engine and a GPU, but {where}; {FP8_INSTALL_HINT}")
    # e4m3 forward and backward for the block-scaled recipes, hybrid (e5m2 gradients) otherwise
    return {"fp8": "e4m3" if recipe in ("blockwise", "mxfp8") else "hybrid", "fp8_recipe": recipe}


def sequence_parallel_overrides(enabled: bool) -> dict:
    """TransformerConfig settings for sequence parallelism; a clear error where it cannot run."""
    if not enabled:
        return {}
    if not transformer_engine_available():
        raise ModelConfigError("parallel.sequence_parallel=true needs a GPU with Transformer Engine (megatron's "
                               f"CPU/torch norm refuses sequence parallelism); {FP8_INSTALL_HINT}")
    return {"sequence_parallel": True}


def layer_spec(use_te: bool, qk_norm: bool = False, num_experts: Optional[int] = None):
    """The layer spec with our layer parts and core attention plugged in; ``qk_norm`` adds the
    per-head query/key RMSNorm (Qwen3); ``num_experts`` makes the MLP megatron's MoE layer, whose
    experts get our SwiGLU as the dense MLP does."""
    from megatron.core.models.gpt import gpt_layer_specs

    # TE fuses the norms into its linear layers, and normalises q/k with its own norm, which (unlike
    # layers.RMSNorm) also runs under sequence parallelism
    if use_te:
        spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=num_experts, moe_grouped_gemm=False, qk_layernorm=qk_norm)
    else:
        spec = gpt_layer_specs.get_gpt_layer_local_spec(num_experts=num_experts, moe_grouped_gemm=False,
                                                        normalization="RMSNorm")
        spec.submodules.input_layernorm = layers.RMSNorm
        spec.submodules.pre_mlp_layernorm = layers.RMSNorm
        if qk_norm:
            # over the last dimension, so on [s, b, heads, head_dim] it normalises each head
            spec.submodules.self_attention.submodules.q_layernorm = layers.RMSNorm
            spec.submodules.self_attention.submodules.k_layernorm = layers.RMSNorm
    attention = spec.submodules.self_attention
    attention.module = layers.self_attention_class()
    attention.submodules.core_attention = BlockCoreAttention
    mlp = spec.submodules.mlp.submodules
    if num_experts:  # each expert is a dense MLP of its own (the layer: layers.adopt_moe_layers)
        mlp = mlp.experts.submodules
    mlp.activation_func = layers.SwiGLU  # with use_te_activation_func
    return spec


def set_block_attention(model, implementation: str) -> None:
    """Switch every layer's packed-mode attention between "fused" and "generic"."""
    for module in model.modules():
        if isinstance(module, BlockCoreAttention):
            module.set_implementation(implementation)


def _gpt_model_class():
    from megatron.core.models.gpt import GPTModel

    class BlockGPTModel(GPTModel):
        """megatron's GPTModel whose output follows the forward's ``BlockAttentionParams``: the LM
        head on ``logit_rows`` only, or the final hidden states when ``return_hidden`` is set and
        the model computes log-probs in chunks (``logit_chunk_rows`` > 0)."""

        logit_chunk_rows = 0

        def _postprocess(self, hidden_states, *args, **kwargs):
            params = kwargs.get("packed_seq_params")
            if self.post_process and params is not None:
                rows = getattr(params, "logit_rows", None)
                if rows is not None:
                    hidden_states = hidden_states.index_select(0, rows.to(hidden_states.device))
                if self.logit_chunk_rows and getattr(params, "return_hidden", False):
                    return _output_layer_input(self, hidden_states).transpose(0, 1)  # [b, s, h]
            return super()._postprocess(hidden_states, *args, **kwargs)

    return BlockGPTModel


def _output_layer_input(model, hidden_states):
    """What megatron's column-parallel output layer does to its input before the matmul: gather
    the sequence-parallel shards, or mark the input as copied to every TP rank, so that its
    gradient is summed over the vocabulary shards in backward."""
    from megatron.core import tensor_parallel

    if model.config.sequence_parallel:
        return tensor_parallel.gather_from_sequence_parallel_region(hidden_states)
    if model.config.tensor_model_parallel_size > 1:
        return tensor_parallel.copy_to_tensor_model_parallel_region(hidden_states)
    return hidden_states


def llama3_inv_freq(arch: ModelArchitecture) -> torch.Tensor:
    """Llama-3 frequency-dependent RoPE scaling (as in the Llama-3.1 release)."""
    dim = arch.head_dim
    inv_freq = 1.0 / (arch.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device.current()) / dim))
    s = arch.rope_scaling
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def build_model(
    arch: ModelArchitecture,
    params_dtype=torch.float32,
    use_te: Optional[bool] = None,
    num_layers: Optional[int] = None,
    post_process: Optional[bool] = None,
    **config_overrides,
):
    """Build this rank's pipeline stage of the model. Parallel state must be initialized.

    ``num_layers`` truncates the model (the feature network stops at its deepest feature layer);
    ``post_process=False`` then drops the final norm and output layer on the last stage. The
    model starts with fused block attention and full logits; a run's settings change both
    (``set_block_attention``, ``logit_chunk_rows``).
    """
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    pp = ps.get_pipeline_model_parallel_world_size()
    layer_count = num_layers or arch.num_layers
    # a dense model (a feature network beside an MoE policy) is simply not split over the EP ranks
    replace(arch, num_layers=layer_count).check_parallel(
        tp, pp, ps.get_expert_model_parallel_world_size() if arch.is_moe else 1)
    rotary.install()  # cos and sin of the rotary frequencies once per forward, not per layer
    embedding.install()  # the vocabulary-parallel embedding masks without a host sync
    if use_te is None:
        use_te = transformer_engine_available()
    config = transformer_config(arch, tp, pp, params_dtype, num_layers=layer_count, **config_overrides)
    is_last = ps.is_pipeline_last_stage()
    model = _gpt_model_class()(
        config=config,
        transformer_layer_spec=layer_spec(use_te, arch.qk_norm, arch.num_experts),
        vocab_size=arch.padded_vocab_size,
        max_sequence_length=arch.max_position_embeddings,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=is_last if post_process is None else (post_process and is_last),
        # without an output layer there is nothing to tie (and megatron would otherwise wait for the
        # last stage to join the embedding all-reduce at construction)
        share_embeddings_and_output_weights=arch.tie_word_embeddings and post_process is not False,
        position_embedding_type="mrope",
        rotary_base=arch.rope_theta,
    )
    # megatron's torch norm (the final norm without TE) is made in fp32 whatever the model's dtype:
    # in a bf16 model it was the one fp32 parameter, with a gradient buffer (and a reduction) of its own
    final_norm = getattr(model.decoder, "final_layernorm", None)
    if final_norm is not None and not use_te:
        final_norm.to(config.params_dtype)
    # the rotary frequencies are a plain attribute, not a buffer: moving the model does not move them
    inv_freq = llama3_inv_freq(arch) if arch.rope_scaling is not None else model.rotary_pos_emb.inv_freq
    model.rotary_pos_emb.inv_freq = inv_freq.to(device.current())
    if model.post_process and arch.padded_vocab_size != arch.vocab_size:
        model.output_layer.register_forward_hook(_mask_padded_vocab(arch.vocab_size, tp))
    layers.adopt_moe_layers(model)
    model.architecture = arch
    # built on the host (megatron's CPU initialisation; our norms), moved to the run's device once,
    # as Megatron-LM's get_model does: every model of a run is built here
    return device.move_model(model)


def _mask_padded_vocab(vocab_size: int, tp: int):
    """Forward hook on the (vocab-parallel) output layer: padded vocabulary rows get -inf."""
    from megatron.core import parallel_state as ps

    def hook(module, inputs, output):
        logits, bias = output
        local = logits.shape[-1]
        start = local * ps.get_tensor_model_parallel_rank() if not module.gather_output else 0
        column = torch.arange(start, start + local, device=logits.device)
        return logits.masked_fill(column >= vocab_size, float("-inf")), bias

    return hook


def expand_positions(position_ids: torch.Tensor) -> torch.Tensor:
    """[b, s] per-token positions -> the [3, b, s] form megatron's mrope takes."""
    return position_ids.unsqueeze(0).expand(3, *position_ids.shape)


def model_forward(model, tokens, position_ids, attention_mask=None, block_params=None, labels=None):
    """One forward of this stage. ``tokens``/``position_ids`` are [b, s] (ignored off the first
    stage except for rotary). Returns vocab-parallel logits [b, s, V/TP] on the last stage (or
    per-token loss when ``labels`` is given), hidden states [s, b, h] elsewhere. Inputs are on the
    run's device already (``runtime.device.to_device`` is where batches cross)."""
    return model(
        input_ids=tokens,
        position_ids=expand_positions(position_ids),
        attention_mask=attention_mask,
        labels=labels,
        packed_seq_params=block_params,
    )


def forward(model, tokens: torch.Tensor, position_ids: torch.Tensor, reduce, block_params=None,
            attention_mask: Optional[torch.Tensor] = None, result=None):
    """No-grad forward of one micro-batch [b, s] through all pipeline stages; returns
    ``reduce(output)`` computed on the last stage (vocab-parallel logits, or hidden states for a
    model built with ``post_process=False``), on every rank (``runtime.pipeline.forward``; a
    ``result`` (shape, dtype) says it is one tensor of that shape)."""
    return pipeline.forward(
        model, lambda stage: model_forward(stage, tokens, position_ids, attention_mask, block_params),
        seq_length=tokens.shape[1], micro_batch_size=tokens.shape[0], reduce=reduce, result=result)
