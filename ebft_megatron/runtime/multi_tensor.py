"""megatron-core's multi-tensor ops without Transformer Engine or Apex, on torch's foreach ops.

Without either, megatron-core falls back to Python loops (``megatron.core.utils.local_multi_tensor_*``):
the gradient norm launches one norm kernel per parameter and then copies every one of those norms
to the host (``torch.tensor`` of device scalars, one device-to-host read each), and clipping and
the main-to-model copy launch a kernel or two per parameter (the distributed optimizer's copy of
its updated shards back into the parameter buffer is such a loop whatever is installed). A plain
``pip install`` has neither
package, so that is what most single-node GPU runs get. :func:`apply` puts torch's ``_foreach_*``
ops in their place: a few multi-tensor kernels for all parameters, and nothing read back. It
changes nothing where TE or Apex provides the ops (megatron then uses theirs), and it applies on
a CPU too, so that CPU tests run the code a GPU without them runs.
"""

from __future__ import annotations

import torch


def l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """Drop-in for ``amp_C.multi_tensor_l2norm`` (no per-tensor norms): -> ([1] fp32, None)."""
    norms = torch._foreach_norm(tensor_lists[0])
    return torch.linalg.vector_norm(torch.stack(norms).float()).reshape(1), None


def scale(chunk_size, noop_flag, tensor_lists, factor):
    """Drop-in for ``amp_C.multi_tensor_scale``: ``dst = src * factor`` for each pair, the product
    taken in the source's precision, as megatron's fallback takes it."""
    sources, targets = tensor_lists
    if factor == 1.0:
        torch._foreach_copy_(targets, sources)
    elif all(source is target for source, target in zip(sources, targets)):
        torch._foreach_mul_(targets, factor)
    else:
        torch._foreach_copy_(targets, torch._foreach_mul(sources, factor))


def copy_main_params_to_model_params(self) -> None:
    """``DistributedOptimizer._copy_main_params_to_model_params`` as one foreach copy: the same
    shards into the same places of the parameter buffer. FP8 parameters, Megatron-FSDP and the
    precision-aware optimizer keep megatron's own."""
    from megatron.core.fp8_utils import is_float8tensor

    if (self.is_stub_optimizer or self.ddp_config.use_megatron_fsdp
            or self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8):
        return _megatron_copy_main_params(self)
    targets, sources = [], []
    for shard_main_groups, model_groups in ((self.shard_fp32_from_float16_groups, self.model_float16_groups),
                                            (self.shard_fp32_groups, self.model_fp32_groups)):
        for shard_main_group, model_group in zip(shard_main_groups, model_groups):
            for shard_main_param, model_param in zip(shard_main_group, model_group):
                if is_float8tensor(model_param):  # nothing copied yet: megatron's does it all
                    return _megatron_copy_main_params(self)
                world_range = self._get_model_param_range_map(model_param)["gbuf_world_in_bucket"]
                buffer_index, _, bucket_id = self.model_param_gbuf_map[model_param]
                param_data = self.buffers[buffer_index].buckets[bucket_id].param_data
                targets.append(param_data.view(-1)[world_range.start:world_range.end])
                sources.append(shard_main_param)
    if targets:
        torch._foreach_copy_(targets, sources)


_megatron_copy_main_params = None
_APPLIED = False


def apply() -> None:
    """Replace megatron's Python-loop fallbacks where megatron chose them, and the distributed
    optimizer's per-parameter copy. Safe to call many times."""
    global _APPLIED, _megatron_copy_main_params
    if _APPLIED:
        return
    _APPLIED = True
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads, optimizer
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    _megatron_copy_main_params = DistributedOptimizer._copy_main_params_to_model_params
    DistributedOptimizer._copy_main_params_to_model_params = copy_main_params_to_model_params

    if clip_grads.l2_norm_impl is utils.local_multi_tensor_l2_norm:
        clip_grads.l2_norm_impl = l2_norm
    for module in (clip_grads, optimizer):
        if module.multi_tensor_scale_impl is utils.local_multi_tensor_scale:
            module.multi_tensor_scale_impl = scale
