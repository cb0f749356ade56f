"""Strided block-parallel rollouts with a KV cache, under TP, PP and DP.

For a micro-batch of chunks [B, P]:
1. prefill: one causal forward of the chunk writes every layer's keys/values into a
   :class:`RolloutKVCache`; the LM head runs only on the NB rows a_b - 1, whose logits give token 0
   of every block, drawn n times (the n samples share this prefill);
2. decode: G - 1 forwards of the n*NB newest tokens each (positions a_b + t), attending to the
   cached chunk prefix x[:a_b] and to their own earlier tokens; each gives the next token.
With document masking (``doc_ids``) both follow the layout's rule (``block_layout``): positions
restart per document, and a step sees only the keys of the document of the ground-truth token it
is scored against.

Cost: one prefill per chunk plus n*NB*(G-1) decoded tokens, against the reference's G full
forwards of the whole growing sequence for each of the n copies. Every forward goes through
megatron's pipeline schedule (``models.gpt.forward``), so the decode steps pass through the
pipeline stages; sampling happens on the last stage with TP-gathered logits and the tokens are
broadcast back, so every rank stays in lockstep.

The reference's method (full recompute with a dense mask), which tests and the benchmark check
this engine against, is ``benchmarks/reference_sampler.py``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch

from ebft_megatron.models.attention import BlockAttentionParams, RolloutKVCache
from ebft_megatron.block_layout import BlockLayout
from ebft_megatron.rollouts.sampling import SamplingSettings, sample_tokens
from ebft_megatron.models import gpt
from ebft_megatron.models.output import unwrap
from ebft_megatron.runtime import device, pipeline


@dataclass
class Rollouts:
    tokens: torch.Tensor  # [B, NB, n, G]
    logits: Optional[torch.Tensor] = None  # [B, NB, n, G, V] when asked for (tests)


def rollout_generator(seed: int, dp_rank: int) -> torch.Generator:
    """Each data-parallel rank samples its own chunks, reproducibly from the run seed.

    On the host, by decision: one seed then draws the same numbers on a CPU and on any GPU, and
    its state is saved with checkpoints. A generation draws all its numbers (one uniform per
    sampled token) in one call before its first forward and moves them to the device in one
    copy that does not block the host (:func:`generation_uniforms`)."""
    return torch.Generator().manual_seed(seed * 1000003 + dp_rank)


def generation_uniforms(batch: int, layout: BlockLayout, generator: Optional[torch.Generator]) -> torch.Tensor:
    """[B, NB, n, G] uniforms for every token of a generation, on the run's device. Drawn step by
    step in the order a step-by-step sampler would draw them (step, then chunk, block and sample),
    so a seed samples the same tokens as it did when each step drew its own; a generator on the
    host draws on the host and the draws cross to the device once (``runtime.device.to_device``)."""
    shape = (layout.rollout_len, batch, layout.num_blocks, layout.num_samples)
    where = generator.device if generator is not None else device.current()
    return device.to_device(torch.rand(shape, generator=generator, device=where).permute(1, 2, 3, 0))


def _drawer(vocab_size, settings, generator, uniforms, keep_logits, store):
    """Build the last-stage reduce: gather TP logits, optionally keep them, sample. ``step`` picks
    the uniforms: an int, or a [1] device tensor (a decode step's, the same op at every step)."""

    def draw(logits, shape, num_samples=None, step=0):
        full = pipeline.gather_vocab_parallel(logits)[..., :vocab_size]
        full = full.reshape(*shape, vocab_size)
        if keep_logits:
            store.append(full.expand(*shape[:2], num_samples, vocab_size) if num_samples else full)
        u = None
        if uniforms is not None:  # [B, NB, n]
            u = uniforms[..., step] if isinstance(step, int) else uniforms.index_select(-1, step)[..., 0]
        return sample_tokens(full, settings.temperature, settings.top_p, generator, uniforms=u,
                             num_samples=num_samples, overwrite_logits=not keep_logits)

    return draw


class CapturedStep:
    """One decode step captured as a CUDA graph and replayed for the others: a step costs one
    launch instead of thousands. What the step reads and writes must be in the same buffers at
    every step (the fed tokens, the device step index, the KV cache, the masks; the sampler and
    the decode attention keep them so), and nothing in it may wait for the host.

    Built on ``torch.cuda.CUDAGraph`` rather than megatron-core's CUDA-graph support: megatron's
    captures its own transformer layers for training and for its inference engine's KV cache,
    while a rollout step is our attention's own cache, masks and sampling around megatron's
    forward, and all of it belongs in the graph."""

    def __init__(self, run):
        try:
            self._capture(run)
        except RuntimeError as error:  # one line on what to do, the CUDA error beneath it
            lines = str(error).strip().splitlines()
            reason = lines[0] if lines else type(error).__name__
            raise RuntimeError(f"capturing a rollout decode step as a CUDA graph failed ({reason}); set "
                               "rollout.cuda_graphs=false to run the decode steps eagerly") from error

    def _capture(self, run) -> None:
        # warm up on a side stream (lazy initialisations must not happen inside the capture); the
        # step's writes are the same when it runs again, so running it twice is harmless
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            run()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread-local: other threads of the process (NCCL's watchdog polling the events of earlier
        # collectives, a logger) are not part of the step and may call CUDA meanwhile; calls this
        # thread makes that a capture forbids still fail
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.output = run()

    def __call__(self):
        self.graph.replay()
        return self.output


def _graphs_possible(model, settings: SamplingSettings, keep_logits: bool) -> bool:
    """Capture needs CUDA, no collectives in the step (tp=pp=1), nothing kept per step, and shapes
    that do not depend on the data: a mixture of experts' layers read how many tokens each expert
    got on the host, so its decode steps run eagerly."""
    from megatron.core import parallel_state as ps

    return (settings.cuda_graphs and device.real_cuda() and not keep_logits
            and unwrap(model).config.num_moe_experts is None
            and ps.get_tensor_model_parallel_world_size() == 1 and ps.get_pipeline_model_parallel_world_size() == 1)


def sample_rollouts(
    model,
    layout: BlockLayout,
    chunk: torch.Tensor,
    vocab_size: int,
    settings: SamplingSettings,
    generator: Optional[torch.Generator] = None,
    uniforms: Optional[torch.Tensor] = None,
    return_logits: bool = False,
    doc_ids: Optional[torch.Tensor] = None,
) -> Rollouts:
    """KV-cached rollouts for ``chunk`` [B, P]. ``uniforms`` [B, NB, n, G] fixes the draws.

    With ``doc_ids`` [B, P] (document masking) attention and positions follow the documents."""
    B, P = chunk.shape
    if P != layout.chunk_len:
        raise ValueError(f"chunk length {P} does not match the layout's chunk_len={layout.chunk_len}")
    NB, n, G = layout.num_blocks, layout.num_samples, layout.rollout_len
    anchors = layout.anchor_positions
    if uniforms is None and settings.temperature != 0:
        uniforms = generation_uniforms(B, layout, generator)
    cache = RolloutKVCache()
    kept: list[torch.Tensor] = []
    draw = _drawer(vocab_size, settings, generator, uniforms, return_logits, kept)

    prefill = BlockAttentionParams(layout=layout, mode="prefill", cache=cache, logit_rows=anchors - 1,
                                   doc_ids=doc_ids)
    all_positions = layout.batch_position_ids(B, doc_ids)  # [B, packed_len]
    positions = all_positions[:, :P]
    # the sampled tokens cross the pipeline as tensors of known shape, not as pickled objects
    first = gpt.forward(
        model, chunk, positions, block_params=prefill,
        reduce=lambda logits: draw(logits, (B, NB, 1), num_samples=n, step=0),
        result=((B, NB, 1, n), torch.long),
    )
    # The decode steps read and write the same buffers at every step: the fed tokens, the device
    # step index (``RolloutKVCache.begin_step``) that picks the positions, the uniforms, the KV
    # slot and the masks. That is what replaying one captured step needs.
    fed = first.reshape(B, NB * n).clone()
    fed_positions = all_positions[:, P:].reshape(B, NB * n, G).transpose(1, 2).contiguous()  # [B, G, NB*n]

    def decode_step(params: BlockAttentionParams):
        cache.step_masks = None  # the step's masks are made inside the step (and inside a capture)
        step_index = cache.step_index
        return gpt.forward(
            model, fed, fed_positions.index_select(1, step_index)[:, 0], block_params=params,
            reduce=lambda logits: draw(logits, (B, NB, n), step=step_index + 1), result=((B, NB, n), torch.long),
        )

    steps = [first.reshape(B, NB, n)]
    captured = None
    for t in range(1, G):
        decode = BlockAttentionParams(layout=layout, mode="decode", cache=cache, step=t - 1, doc_ids=doc_ids)
        if captured is None and t < G - 1 and _graphs_possible(model, settings, return_logits):
            # replays run the kernels recorded here; only the device step index changes between them
            captured = CapturedStep(functools.partial(decode_step, decode))
        sampled = captured() if captured is not None else decode_step(decode)
        steps.append(sampled.clone() if captured is not None else sampled)
        fed.copy_(sampled.reshape(B, NB * n))
    tokens = torch.stack(steps, dim=-1)  # [B, NB, n, G]
    logits = None
    if return_logits:
        logits = pipeline.broadcast_from_last_stage(torch.stack(kept, dim=3) if kept else None)
    return Rollouts(tokens=tokens, logits=logits)
