"""Conditional feature-matching loss as a function of completion length (the paper's Figures 1-2;
reference §5.2 and §7).

For every validation chunk the policy samples n rollouts per block (the strided block layout),
the frozen feature network embeds ground truth and rollouts in one packed forward, and
``features.embed`` returns the Gram matrices of the pooled features of the first t tokens for
every completion length t = 1..G. Per length, over the valid (chunk, block) groups (whose
ground-truth window lies in real tokens), the curve reports the mean of
- the unbiased CFM estimate  1/(n(n-1)) sum_{i!=j} phi_i.phi_j - 2/n sum_i phi_i.g + g.g,
  an estimate of ||E phi(c:y) - phi(c:y*)||^2 (``objective.rewards.cfm_loss``);
- the alignment 2a = 2 cos(phi_i, g) and the diversity 2d = 2/(n-1) sum_{j!=i} phi_i.phi_j,
  averaged over the n samples (the reference's reward_pass1_gt / reward_pass1_diversity),
all without whitening, so the numbers are the plain feature-matching quantities whatever the
training used. With unit features (last-token pooling) 2a - d = 1 - CFM exactly.

With document masking the rollouts and the feature forward follow the chunks' documents
(``chunks.doc_ids``), as training does (``block_layout``).
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from ebft_megatron.block_layout import BlockLayout
from ebft_megatron.data.packing import PackedChunks
from ebft_megatron.evaluation.files import atomic_write
from ebft_megatron.evaluation.plotting import curve_png
from ebft_megatron.evaluation.sharding import in_lockstep, mean_and_error, replica_batches
from ebft_megatron.features.network import FeatureMoments, embed
from ebft_megatron.objective.rewards import alignment_and_diversity, cfm_loss
from ebft_megatron.rollouts.sampler import SamplingSettings, sample_rollouts
from ebft_megatron.runtime import device, watchdog
from ebft_megatron.runtime.distributed import sum_over_data_parallel

SERIES = ("cfm", "alignment", "diversity")


@dataclass
class FeatureMatchingCurve:
    lengths: list[int]  # completion lengths 1..G
    cfm: list[float]  # mean unbiased CFM loss per length
    alignment: list[float]  # mean 2a per length
    diversity: list[float]  # mean 2d per length
    groups: int = 0  # valid (chunk, block) groups averaged at every length
    cfm_error: float = math.nan  # standard error over those groups of the CFM at the full length
    # this replica's groups' CFM at the full length, keyed "chunk/block" (for comparisons paired by group)
    group_cfm: dict[str, float] = field(default_factory=dict, repr=False)

    def as_metrics(self) -> dict[str, float]:
        """The values at the full rollout length G (what training optimizes)."""
        return {"eval/cfm": self.cfm[-1], "eval/cfm_se": self.cfm_error, "eval/alignment": self.alignment[-1],
                "eval/diversity": self.diversity[-1]}

    def as_dict(self) -> dict:
        return {"lengths": list(self.lengths), "cfm": list(self.cfm), "alignment": list(self.alignment),
                "diversity": list(self.diversity), "groups": self.groups, "cfm_error": self.cfm_error}

    def csv_text(self, other: Optional["FeatureMatchingCurve"] = None, other_label: str = "before") -> str:
        """One row per completion length; with ``other``, its columns follow, suffixed _<other_label>."""
        if other is not None and list(other.lengths) != list(self.lengths):
            raise ValueError(f"curves over different lengths: {self.lengths} and {other.lengths}")
        header = ["length", *SERIES]
        if other is not None:
            header += [f"{name}_{other_label}" for name in SERIES]
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(header)
        for t, length in enumerate(self.lengths):
            row = [length] + [repr(float(getattr(self, name)[t])) for name in SERIES]
            if other is not None:
                row += [repr(float(getattr(other, name)[t])) for name in SERIES]
            writer.writerow(row)
        return out.getvalue()

    def to_csv(self, path, other: Optional["FeatureMatchingCurve"] = None, other_label: str = "before") -> Path:
        return atomic_write(path, self.csv_text(other, other_label).encode())

    def plot(self, path, label: str = "after", other: Optional["FeatureMatchingCurve"] = None,
             other_label: str = "before") -> Path:
        """PNG: CFM loss vs completion length (left) and alignment / diversity (right); ``other``
        (e.g. the curve before training) is overlaid dashed."""
        return atomic_write(path, curve_png(self, label, other, other_label))


class _CurveSums:
    """Running sums per completion length over valid (chunk, block) groups."""

    def __init__(self, rollout_len: int):
        self.sums = torch.zeros(len(SERIES), rollout_len, dtype=torch.float64)
        self.groups = 0
        self.group_cfm: dict[str, float] = {}

    def add(self, moments: FeatureMoments, valid: torch.Tensor, chunk_indices: list[int]) -> None:
        """The feature moments of a micro-batch of the chunks ``chunk_indices``, valid [B, NB]."""
        a, d = alignment_and_diversity(moments.coordinates_by_length.cpu(), whiten=False)  # [B, NB, G, n]
        cfm = cfm_loss(moments.gram_by_length.cpu())
        per_group = torch.stack([cfm, 2 * a.mean(-1), 2 * d.mean(-1)])  # [3, B, NB, G]
        weight = valid.to(torch.float64).cpu()[None, :, :, None]
        self.sums += (per_group * weight).sum(dim=(1, 2))
        self.groups += int(valid.sum())
        rows, blocks = valid.cpu().nonzero(as_tuple=True)
        names = [f"{chunk_indices[row]}/{block}" for row, block in zip(rows.tolist(), blocks.tolist())]
        self.group_cfm.update(zip(names, cfm[..., -1][rows, blocks].tolist()))

    def curve(self) -> FeatureMatchingCurve:
        """Pooled over data-parallel replicas; the same on every rank."""
        packed = torch.cat([self.sums.reshape(-1), torch.tensor([float(self.groups)], dtype=torch.float64)])
        packed = sum_over_data_parallel(packed.to(device.current())).cpu()
        sums, groups = packed[:-1].reshape(self.sums.shape), int(packed[-1])
        if groups == 0:
            raise ValueError("no valid (chunk, block) group: every block's ground-truth window reaches past the real "
                             "tokens of its chunk; use longer validation chunks or a smaller first_anchor/rollout_len")
        means = (sums / groups).tolist()
        lengths = list(range(1, sums.shape[1] + 1))
        error = mean_and_error(list(self.group_cfm.values()))[1]
        return FeatureMatchingCurve(lengths, *means, groups=groups, cfm_error=error, group_cfm=self.group_cfm)


def check_layout(layout: BlockLayout, chunks: PackedChunks) -> None:
    if layout.chunk_len != chunks.chunk_len:
        raise ValueError(f"the validation chunks have {chunks.chunk_len} tokens, the block layout chunk_len="
                         f"{layout.chunk_len}; pack the validation data with the training chunk length")
    if layout.num_samples < 2:
        raise ValueError(f"the unbiased CFM estimate needs at least 2 samples per block, got num_samples="
                         f"{layout.num_samples}")


def feature_matching_curve(feature_model, layout: BlockLayout, chunks: PackedChunks,
                           rollouts_of: Callable[..., torch.Tensor], pooling: str = "last_token",
                           micro_batch_size: int = 1, document_masking: bool = False) -> FeatureMatchingCurve:
    """The curve for rollouts from any source: ``rollouts_of(chunk [B, P]) -> tokens [B, NB, n, G]``
    (a collective call on every rank of the replica), called as ``rollouts_of(chunk, doc_ids)``
    with ``document_masking``. Chunks without a valid block are skipped."""
    check_layout(layout, chunks)
    sums = _CurveSums(layout.rollout_len)
    for batch, counted in replica_batches(len(chunks), micro_batch_size):
        watchdog.progress()  # a long evaluation is not a stall
        index = torch.tensor(batch)
        valid = layout.valid_blocks(chunks.lengths[index])
        keep = valid.any(dim=1)  # the same on every rank: it depends on the data only
        if not keep.any():
            if not in_lockstep():
                continue
            counted, keep = False, torch.ones_like(keep)  # run it with the other replicas, drop it
        chunk, valid = chunks.tokens[index][keep], valid[keep]
        doc_ids = chunks.doc_ids[index][keep] if document_masking else None
        chunk, doc_ids = device.to_device((chunk, doc_ids))  # the evaluation batch's boundary
        rollouts = rollouts_of(chunk) if doc_ids is None else rollouts_of(chunk, doc_ids)
        moments = embed(feature_model, layout, layout.pack(chunk, rollouts), pooling, doc_ids=doc_ids)
        if counted:
            sums.add(moments, valid, [chunk for chunk, kept in zip(batch, keep.tolist()) if kept])
    return sums.curve()


def feature_matching_by_length(policy, feature_model, layout: BlockLayout, chunks: PackedChunks, vocab_size: int,
                               sampling: SamplingSettings, generator: Optional[torch.Generator],
                               pooling: str = "last_token", micro_batch_size: int = 1,
                               document_masking: bool = False) -> FeatureMatchingCurve:
    """CFM, alignment and diversity vs completion length for rollouts sampled from ``policy``.

    Every rank calls this. ``generator`` drives the draws; it must be in the same state on the
    ranks of one replica (``rollouts.sampler.rollout_generator(seed, dp_rank)``)."""
    return feature_matching_curve(
        feature_model, layout, chunks,
        lambda chunk, doc_ids=None: sample_rollouts(policy, layout, chunk, vocab_size, sampling, generator,
                                                    doc_ids=doc_ids).tokens,
        pooling, micro_batch_size, document_masking,
    )
