"""One evaluation (validation CE + feature-matching curve) and its report files.

``write_report`` is safe to call on every rank: only global rank 0 writes, each file atomically.
Files: ``cfm_by_length.csv`` and ``cfm_by_length.png`` (the curve, overlaid with the "before"
curve when given) and ``metrics.json`` (the scalar metrics and the curves).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Mapping, NamedTuple, Optional

import torch

from ebft_megatron.block_layout import BlockLayout
from ebft_megatron.config import layout_of
from ebft_megatron.data.packing import PackedChunks
from ebft_megatron.evaluation.ce import validation_ce
from ebft_megatron.evaluation.feature_matching import FeatureMatchingCurve, feature_matching_by_length
from ebft_megatron.evaluation.files import atomic_write
from ebft_megatron.evaluation.sharding import gather_items, mean_and_error
from ebft_megatron.evaluation.statistics import NOISE_STANDARD_ERRORS
from ebft_megatron.rollouts.sampler import SamplingSettings, rollout_generator
from ebft_megatron.runtime import distributed

CSV_NAME, PNG_NAME, METRICS_NAME, ITEMS_NAME = "cfm_by_length.csv", "cfm_by_length.png", "metrics.json", "items.json"


class Evaluation(NamedTuple):
    ce: Optional[dict]  # validation_ce's result
    curve: Optional[FeatureMatchingCurve]
    chunk_ce: Mapping[str, float] = MappingProxyType({})  # this replica's per-chunk CE, by chunk index

    def metrics(self) -> dict[str, float]:
        return {**(self.ce or {}), **(self.curve.as_metrics() if self.curve is not None else {})}

    def items(self) -> dict[str, dict[str, float]]:
        """The per-item values behind the means, gathered from every replica (collective): the CE of
        each chunk (keyed by its index) and the CFM of each (chunk, block) group at the full length
        (keyed "chunk/block"), so that two evaluations of the same data can be compared item by item."""
        local = {}
        if self.ce is not None:
            local["eval/ce"] = dict(self.chunk_ce)
        if self.curve is not None:
            local["eval/cfm"] = dict(self.curve.group_cfm)
        return gather_items(local)


@dataclass(frozen=True)
class Change:
    """A held-out figure's change between two evaluations of the same chunks, with the standard
    error of the mean of the paired differences (over ``count`` blocks or chunks)."""

    before: float
    after: float
    change: float
    error: float
    count: int

    def beyond(self, standard_errors: float = NOISE_STANDARD_ERRORS) -> bool:
        return abs(self.change) > standard_errors * self.error

    def text(self, name: str, unit: str) -> str:
        return (f"{name} {self.before:.4f} -> {self.after:.4f}, {self.change:+.4f} +- {self.error:.4f} "
                f"(standard error over {self.count} {unit}, paired)")


def paired_change(before: Mapping[str, float], after: Mapping[str, float]) -> tuple[float, float, int]:
    """(mean difference, its standard error, count) of values measured twice on the same items
    (keyed alike), pooled over the data-parallel replicas, each of which pairs its own share
    (collective). What the items differ in cancels; what is left is what changed and the noise of
    both measurements."""
    if before.keys() != after.keys():
        raise ValueError(f"the evaluations have {len(before)} and {len(after)} items on this rank, not the same ones; "
                         "a paired change needs the same chunks")
    return mean_and_error([after[item] - before[item] for item in before])


def changes(before: Evaluation, after: Evaluation) -> dict[str, Change]:
    """The CFM's change (at the full rollout length, paired over (chunk, block) groups) and the
    CE's (paired over chunks) between two evaluations of the same chunks (collective)."""
    result = {}
    if before.curve is not None and after.curve is not None:
        result["cfm"] = Change(before.curve.cfm[-1], after.curve.cfm[-1],
                               *paired_change(before.curve.group_cfm, after.curve.group_cfm))
    if before.ce is not None and after.ce is not None:
        result["ce"] = Change(before.ce["eval/ce"], after.ce["eval/ce"],
                              *paired_change(before.chunk_ce, after.chunk_ce))
    return result


# The evaluation's rollouts draw from their own stream, apart from training's (seed + this).
EVAL_SEED_OFFSET = 17


def first_chunks(chunks: PackedChunks, count: int) -> PackedChunks:
    """The first ``count`` chunks (0 = all)."""
    return chunks.select(range(min(len(chunks.tokens), count))) if count else chunks


def evaluate(policy, feature_model, layout: BlockLayout, chunks: PackedChunks, vocab_size: int,
             sampling: SamplingSettings, generator: Optional[torch.Generator], pooling: str = "last_token",
             micro_batch_size: int = 1, ce_chunks: int = 0, cfm_chunks: int = 0,
             document_masking: bool = False) -> Evaluation:
    """Validation CE of ``policy`` on the first ``ce_chunks`` chunks and its feature-matching
    curve on the first ``cfm_chunks`` (0 = all) (collective); with ``document_masking`` both keep
    attention inside documents, as training does."""
    chunk_ce: dict[str, float] = {}
    ce = validation_ce(policy, first_chunks(chunks, ce_chunks), micro_batch_size, document_masking=document_masking,
                       chunk_ce=chunk_ce)
    curve = feature_matching_by_length(policy, feature_model, layout, first_chunks(chunks, cfm_chunks), vocab_size,
                                       sampling, generator, pooling, micro_batch_size,
                                       document_masking=document_masking)
    return Evaluation(ce, curve, MappingProxyType(chunk_ce))


def evaluate_run(config, policy, feature_model, chunks: PackedChunks, vocab_size: int, dp_rank: int) -> Evaluation:
    """:func:`evaluate` with a run's settings (``ebft_megatron.config.Config``): what the trainer
    and ``python -m ebft_megatron.evaluate`` both report."""
    return evaluate(policy, feature_model, layout_of(config), chunks, vocab_size,
                    SamplingSettings(config.eval.temperature, config.rollout.top_p),
                    rollout_generator(config.train.seed + EVAL_SEED_OFFSET, dp_rank), pooling=config.objective.pooling,
                    micro_batch_size=config.train.micro_batch, ce_chunks=config.eval.ce_chunks,
                    cfm_chunks=max(config.eval.cfm_chunks, 1), document_masking=config.data.document_masking)


def _json_safe(value):
    """JSON has no NaN or infinity (an overflowing perplexity): those become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value


def _section(evaluation: Evaluation) -> dict:
    section = {"metrics": evaluation.metrics()}
    if evaluation.curve is not None:
        section["cfm_by_length"] = evaluation.curve.as_dict()
    return section


def write_items(out_dir, items: dict[str, dict[str, float]]) -> list[Path]:
    """``items.json`` on rank 0: {metric: {item: value}}, the per-item values behind the reported
    means (chunks, (chunk, block) groups, tasks), for comparisons paired item by item."""
    if not distributed.is_rank0():
        return []
    text = json.dumps(_json_safe(items), indent=1, allow_nan=False, sort_keys=True) + "\n"
    return [atomic_write(Path(out_dir) / ITEMS_NAME, text.encode())]


def write_report(out_dir, ce: Optional[dict], curve: Optional[FeatureMatchingCurve],
                 before: Optional[Evaluation | tuple] = None) -> list[Path]:
    """Write the report on rank 0 (other ranks write nothing and get []). ``before`` is an
    :class:`Evaluation` (or a ``(ce, curve)`` pair), e.g. of the model before training; its
    curve is overlaid and its metrics are kept under "before". Returns the paths written."""
    if not distributed.is_rank0():
        return []
    out_dir = Path(out_dir)
    before = Evaluation(*before) if before is not None else None
    before_curve = before.curve if before is not None else None
    written = []
    if curve is not None:
        written.append(curve.to_csv(out_dir / CSV_NAME, other=before_curve))
        written.append(curve.plot(out_dir / PNG_NAME, label="after" if before is not None else "policy",
                                  other=before_curve))
    report = _section(Evaluation(ce, curve))
    if before is not None:
        report["before"] = _section(before)
    text = json.dumps(_json_safe(report), indent=2, allow_nan=False) + "\n"
    written.append(atomic_write(out_dir / METRICS_NAME, text.encode()))
    return written
