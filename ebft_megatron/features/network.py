"""The frozen feature network and the feature moments EBFT's rewards are made of.

The feature network is a copy of the base model (or another checkpoint), built with the policy's
TP/PP layout on the same ranks, and kept only up to its deepest feature layer: the layers above it
are never needed, so they are dropped right after loading.

With LoRA (``models.lora``) the base weights stay frozen, so the feature network can be the policy
itself with its adapters switched off (:func:`share_policy`): no second copy of the model. Its
feature forward switches the adapters off and runs only the layers up to the deepest feature layer
(no final norm, no output layer), the same computation as the truncated copy.

A feature of a token is the residual stream after each feature layer (no final norm),
concatenated over the layers and L2-normalized jointly (reference §2). Features are read, in one
packed forward of the chunk and all rollouts (``block_layout``), at the completion rows:
- ground truth of block b: chunk rows a_b .. a_b+G-1 (they see x[:a_b+G]);
- rollout (b, i): its own G rows (they see x[:a_b] and the rollout).
Pooling over the G completion tokens is ``last_token`` or ``mean`` (of the unit vectors, not
renormalized), as in the reference.

Nothing gathers the features. Each pipeline stage holds some of the feature layers; it computes
its part of every token's squared norm, those are summed over the pipeline group, and then, per
block, the coordinates of its part of the n+1 pooled features (ground truth first) in an
orthonormal basis of their span: (n+1) x (n+1) numbers from a QR decomposition, whatever the
width. The stages' coordinates, side by side, are the coordinates of the full features, reduced
once more to n+1 columns. They keep the features' inner products and singular values exactly,
which is all that rewards, whitening and the CFM metric need.

Gram matrices are computed for every completion length 1..G (the pooled feature of the first
t+1 tokens), which gives the CFM-vs-completion-length curve for free; training uses length G.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ebft_megatron.block_layout import BlockLayout
from ebft_megatron.checkpoint import store
from ebft_megatron.errors import UserError
from ebft_megatron.models import gpt
from ebft_megatron.models.attention import packed_attention
from ebft_megatron.models.lora import adapters_disabled
from ebft_megatron.runtime import device
from ebft_megatron.runtime.distributed import sum_over_pipeline


class FeatureConfigError(UserError, ValueError):
    pass


def check_feature_layers(feature_layers: Sequence[int], num_layers: int) -> tuple[int, ...]:
    layers = tuple(int(layer) for layer in feature_layers)
    if not layers:
        raise FeatureConfigError("feature_layers is empty; name at least one layer (1-based)")
    bad = [layer for layer in layers if not 1 <= layer <= num_layers]
    if bad:
        raise FeatureConfigError(
            f"feature_layers {bad} are outside 1..{num_layers} (the feature model's layers; "
            "layer l is the residual stream after the l-th transformer block)"
        )
    if len(set(layers)) != len(layers):
        raise FeatureConfigError(f"feature_layers {list(layers)} repeat a layer")
    return tuple(sorted(layers))


def build_feature_network(arch, feature_layers: Sequence[int], params_dtype=torch.float32, use_te=None,
                          **config_overrides):
    """This rank's stage of the frozen feature network, full depth (weights still to be loaded;
    call :func:`truncate` after loading)."""
    layers = check_feature_layers(feature_layers, arch.num_layers)
    model = gpt.build_model(arch, params_dtype=params_dtype, use_te=use_te, post_process=False, **config_overrides)
    for param in model.parameters():
        param.requires_grad_(False)
    model.eval()
    model.feature_layers = layers
    return model


def truncate(model) -> None:
    """Drop the layers above the deepest feature layer (and with them their memory and compute).

    The network is built at full depth and loaded before this, because megatron's checkpoints
    stack all layers along one axis and a shallower model cannot read a prefix of it. Under PP the
    stages keep megatron's layer split, so upper stages may end up shorter or empty (a pass-through
    in the no-grad pipeline schedule)."""
    _keep_feature_layers(model.decoder, model.feature_layers)


def _keep_feature_layers(decoder, feature_layers) -> None:
    """This stage's layers up to the deepest feature layer, and no others."""
    deepest = max(feature_layers)
    decoder.layers = torch.nn.ModuleList([layer for layer in decoder.layers if layer.layer_number <= deepest])
    decoder.num_layers_per_pipeline_rank = len(decoder.layers)


def load_feature_network(checkpoint, feature_layers: Optional[Sequence[int]] = None, params_dtype=torch.float32,
                         **config_overrides):
    """Build, load (from a checkpoint folder, ``checkpoint.store``) and truncate the feature network."""
    arch = store.architecture_of(checkpoint)
    layers = feature_layers or arch.default_feature_layers()
    model = build_feature_network(arch, layers, params_dtype, **config_overrides)
    store.load_model_weights(model, checkpoint)
    truncate(model)
    return model


def share_policy(policy, feature_layers: Optional[Sequence[int]] = None):
    """The policy (with LoRA adapters, base weights frozen) as its own feature network: the base
    model is the policy with its adapters off. Returns the policy, marked with its feature layers."""
    layers = check_feature_layers(feature_layers or policy.architecture.default_feature_layers(),
                                  policy.architecture.num_layers)
    policy.feature_layers = layers
    policy.shares_feature_network = True
    return policy


@contextlib.contextmanager
def _feature_forward(model):
    """For a policy shared as the feature network: its adapters off, and for the forward's
    duration only the layers up to the deepest feature layer, with the final norm and the output
    layer skipped (what :func:`truncate` keeps of a separate feature network). Restored after."""
    if not getattr(model, "shares_feature_network", False):
        yield
        return
    decoder = model.decoder
    saved = (decoder.layers, decoder.num_layers_per_pipeline_rank, decoder.final_layernorm, model.post_process)
    try:
        _keep_feature_layers(decoder, model.feature_layers)
        decoder.final_layernorm = None
        model.post_process = False  # the model's output is then the last kept layer's hidden states
        with adapters_disabled(model):
            yield
    finally:
        decoder.layers, decoder.num_layers_per_pipeline_rank, decoder.final_layernorm, model.post_process = saved


@dataclass
class FeatureMoments:
    """coordinates_by_length [B, NB, G, n+1, n+1] (float64): the pooled features of the first t+1
    completion tokens (index 0 = ground truth, 1..n = the samples), as coordinates in an
    orthonormal basis of their span. They have the features' inner products and singular values
    (their Gram matrix is the features' Gram matrix), in (n+1) numbers per row instead of D."""

    coordinates_by_length: torch.Tensor

    @property
    def coordinates(self) -> torch.Tensor:
        """[B, NB, n+1, n+1] at the full rollout length G (what the rewards use)."""
        return self.coordinates_by_length[:, :, -1]

    @property
    def gram_by_length(self) -> torch.Tensor:
        """[B, NB, G, n+1, n+1] the Gram matrices."""
        coordinates = self.coordinates_by_length
        return coordinates @ coordinates.transpose(-1, -2)

    @property
    def gram(self) -> torch.Tensor:
        """[B, NB, n+1, n+1] at the full rollout length G."""
        coordinates = self.coordinates
        return coordinates @ coordinates.transpose(-1, -2)


def span_coordinates(rows: torch.Tensor, known: Optional[torch.Tensor] = None) -> torch.Tensor:
    """rows [..., m, D] (with ``known`` [..., m, k], coordinates of more columns of the same rows)
    -> [..., m, m] coordinates C with C C^T = [known rows] [known rows]^T + rows rows^T.

    From the R factor of a QR decomposition (C = R^T) rather than from the Gram matrix, which
    would square the condition number that the whitening's small singular values depend on."""
    m = rows.shape[-2]
    columns = rows.transpose(-1, -2)
    if known is not None:
        columns = torch.cat([known.transpose(-1, -2), columns], dim=-2)
    if columns.shape[-2] < m:  # fewer columns than rows: pad, so that R is square
        columns = torch.cat([columns, columns.new_zeros(*columns.shape[:-2], m - columns.shape[-2], m)], dim=-2)
    return torch.linalg.qr(columns, mode="r")[1].transpose(-1, -2)


def completion_rows(layout: BlockLayout) -> torch.Tensor:
    """[NB, n+1, G] packed row of each completion token: ground truth (slot 0), then samples."""
    NB, n, G = layout.num_blocks, layout.num_samples, layout.rollout_len
    where = device.current()  # beside the layout's other index maps
    rows = torch.empty(NB, n + 1, G, dtype=torch.long, device=where)
    rows[:, 0] = layout.ground_truth_windows
    rows[:, 1:] = layout.rollout_index(torch.arange(NB, device=where)[:, None, None],
                                       torch.arange(n, device=where)[None, :, None],
                                       torch.arange(G, device=where)[None, None, :])
    return rows


def select_rows(hidden: torch.Tensor, rows: torch.Tensor, full_len: int) -> torch.Tensor:
    """hidden [s, B, H] -> [len(rows), B, H].

    Without sequence parallelism every TP rank holds all s = full_len rows. With it, TP rank r
    holds rows [r*s, (r+1)*s); each rank then fills the rows it owns into a zero buffer and the
    buffers are summed over the TP group, which sends only the selected rows.
    """
    if hidden.shape[0] == full_len:
        return hidden.index_select(0, rows)
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    local_len = hidden.shape[0]
    start = ps.get_tensor_model_parallel_rank() * local_len
    owned = (rows >= start) & (rows < start + local_len)
    picked = hidden.new_zeros(len(rows), *hidden.shape[1:])
    picked[owned] = hidden.index_select(0, rows[owned] - start)
    dist.all_reduce(picked, group=ps.get_tensor_model_parallel_group())
    return picked


class _LayerTaps:
    """Forward hooks that keep the completion rows of the feature layers held by this stage."""

    def __init__(self, model, feature_layers, rows: torch.Tensor, full_len: int):
        self.outputs: dict[int, torch.Tensor] = {}
        self._handles = []
        for layer in model.decoder.layers:
            if layer.layer_number in feature_layers:
                self._handles.append(layer.register_forward_hook(self._keeper(layer.layer_number, rows, full_len)))

    def _keeper(self, layer_number, rows, full_len):
        def keep(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            self.outputs[layer_number] = select_rows(hidden.detach(), rows.to(hidden.device), full_len)

        return keep

    def remove(self):
        for handle in self._handles:
            handle.remove()


def moments_from_hidden(hidden_by_layer: Sequence[torch.Tensor], layout: BlockLayout, pooling: str,
                        batch_size: int, device=None) -> FeatureMoments:
    """This stage's feature layers' completion rows ([NB*(n+1)*G, B, H] each, possibly none)
    -> the coordinates of the full features (every stage's layers), the same on every stage."""
    NB, n, G, B = layout.num_blocks, layout.num_samples, layout.rollout_len, batch_size
    R = NB * (n + 1) * G
    squared_norm = torch.zeros(R, B, dtype=torch.float64, device=device)
    for hidden in hidden_by_layer:
        squared_norm += hidden.double().square().sum(-1)
    sum_over_pipeline(squared_norm)
    inverse_norm = squared_norm.clamp_min(1e-24).rsqrt()
    coordinates = torch.zeros(B, NB, G, n + 1, n + 1, dtype=torch.float64, device=device)
    for index, hidden in enumerate(hidden_by_layer):  # this stage's layers, one at a time
        unit = (hidden.double() * inverse_norm[..., None]).view(NB, n + 1, G, B, -1).permute(3, 0, 2, 1, 4)
        if pooling == "mean":  # mean of the first t+1 unit vectors, for every length t+1
            steps = torch.arange(1, G + 1, dtype=unit.dtype, device=unit.device)
            unit = unit.cumsum(dim=2) / steps[None, None, :, None, None]
        coordinates = span_coordinates(unit, coordinates if index else None)  # [B, NB, G, n+1, n+1]
    return FeatureMoments(coordinates_by_length=_over_pipeline_stages(coordinates))


def _over_pipeline_stages(coordinates: torch.Tensor) -> torch.Tensor:
    """Each stage's coordinates of its own layers' columns -> the coordinates of all columns: the
    stages' (n+1)-column blocks side by side, reduced once more to n+1 columns."""
    from megatron.core import parallel_state as ps

    stages = ps.get_pipeline_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1
    if stages == 1:
        return coordinates
    by_stage = coordinates.new_zeros(stages, *coordinates.shape)
    by_stage[ps.get_pipeline_model_parallel_rank()] = coordinates
    sum_over_pipeline(by_stage)
    side_by_side = torch.cat(list(by_stage), dim=-1)  # [..., n+1, stages*(n+1)]
    return span_coordinates(side_by_side)


def embed(feature_model, layout: BlockLayout, packed_tokens: torch.Tensor, pooling: str = "last_token",
          doc_ids: Optional[torch.Tensor] = None) -> FeatureMoments:
    """One no-grad forward of the packed chunk + rollouts [B, packed_len] through the feature
    network's stages; returns the feature moments on every rank. ``doc_ids`` [B, P]: document
    masking."""
    B, S = packed_tokens.shape
    if S != layout.packed_len:
        raise ValueError(f"packed sequence has {S} tokens, the layout needs {layout.packed_len}")
    rows = completion_rows(layout).reshape(-1)
    taps = _LayerTaps(feature_model, feature_model.feature_layers, rows, S)
    try:
        with _feature_forward(feature_model):
            gpt.forward(feature_model, packed_tokens, layout.batch_position_ids(B, doc_ids),
                             reduce=lambda output: None, block_params=packed_attention(layout, doc_ids))
    finally:
        taps.remove()
    hidden = [taps.outputs[layer] for layer in sorted(taps.outputs)]
    return moments_from_hidden(hidden, layout, pooling, B, device=packed_tokens.device)
