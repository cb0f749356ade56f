"""From the data settings to packed chunks, and the order in which training visits them.

``split_plan`` says which documents a split holds. ``load_chunks`` reads (``reading``) or loads
pre-tokenized (``indexed``) documents, keeps those of the requested split and packs them, all in
memory: for small data, and as the reference that ``mapped.open_chunks`` (what training reads, at
any size) is tested equal to. ``ChunkLoader`` hands out the chunk indices of each step to each
data-parallel rank, reproducibly and resumably.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from ebft_megatron.data.config import RESPONSE_KINDS, DataConfig
from ebft_megatron.data.indexed import read_indexed
from ebft_megatron.data.packing import PackedChunks, check_token_range, pack_aligned, pack_documents
from ebft_megatron.data.reading import Progress, open_documents, tokenized_documents
from ebft_megatron.data.sources import DataError, SkipReport, held_out_below, is_held_out

SPLITS = ("train", "validation")


# ---------------------------------------------------------------------------------------------
# Chunks of one split


@dataclass(frozen=True)
class SplitPlan:
    """The documents of a split: those of ``path`` whose split hash is held out (``held_out``) or
    not, at ``fraction``; every document of ``path`` when ``fraction`` is None."""

    path: Path
    fraction: Optional[float] = None
    held_out: bool = False

    def keeps(self, key_hash: int) -> bool:
        return self.fraction is None or is_held_out(key_hash, self.fraction) == self.held_out

    def mask(self, key_hashes: np.ndarray) -> np.ndarray:
        """``keeps`` of each of an array of uint64 hashes, compared as integers (exactly)."""
        if self.fraction is None:
            return np.ones(len(key_hashes), dtype=bool)
        return (key_hashes < np.uint64(held_out_below(self.fraction))) == self.held_out


def split_plan(config: DataConfig, split: str) -> SplitPlan:
    """eval_path is a whole validation set; otherwise the validation split is the held-out fraction
    of path and training gets the rest."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    fraction = config.validation_fraction
    if split == "train":
        if config.eval_path is not None or fraction == 0:
            return SplitPlan(config.resolved_path())
        return SplitPlan(config.resolved_path(), fraction, held_out=False)
    if config.eval_path is not None:
        return SplitPlan(Path(config.eval_path))
    if fraction == 0:
        raise DataError("no validation data: set data.validation_fraction > 0 or data.eval_path")
    return SplitPlan(config.resolved_path(), fraction, held_out=True)


def require_eos(tokenizer) -> None:
    if tokenizer.eos_id is None:
        raise DataError(f"the tokenizer {tokenizer.path} has no EOS token, which packing puts between documents; "
                        "use a tokenizer whose tokenizer_config.json names an eos_token")


def check_corpus_tokenizer(prefix, info, tokenizer) -> None:
    if info.vocab_size != tokenizer.vocab_size or info.eos_id != tokenizer.eos_id:
        raise DataError(
            f"{prefix}: tokenized with {info.tokenizer} (vocabulary {info.vocab_size}, EOS {info.eos_id}) but the "
            f"tokenizer here is {tokenizer.path} (vocabulary {tokenizer.vocab_size}, EOS {tokenizer.eos_id}); "
            "prepare the data again with this tokenizer")
    check_token_range(info.max_token_id, tokenizer.vocab_size, str(prefix))


def load_chunks(config: DataConfig, tokenizer, chunk_len: int, split: str = "train", verbose: bool = False,
                workers: int = 1) -> PackedChunks:
    """Tokenize and pack one split of the data into chunks of ``chunk_len`` tokens, in memory."""
    require_eos(tokenizer)
    plan = split_plan(config, split)
    path, keep = plan.path, None if plan.fraction is None else plan.keeps
    report = SkipReport()
    response_starts = response_spans = None
    if config.kind == "indexed":
        corpus = read_indexed(path)
        check_corpus_tokenizer(path, corpus.info, tokenizer)
        limit = config.max_documents or len(corpus.documents)
        kept = [i for i, key_hash in enumerate(corpus.key_hashes[:limit].tolist()) if keep is None or keep(key_hash)]
        token_lists = [corpus.documents[i] for i in kept]
        if corpus.response_spans is not None:  # prepared from prompt/response documents
            response_spans = [corpus.response_spans[i] for i in kept]
            response_starts = [spans[-1][0] if spans else len(ids) for spans, ids in zip(response_spans, token_lists)]
        report.counts.update(corpus.info.skipped)  # skipped when the corpus was prepared (reported then)
    else:
        source = open_documents(config, path, report, count_units=verbose, tokenizer=tokenizer)
        progress = Progress(f"[data] tokenizing {path} ({split})", source.total_units, source.unit, verbose)
        documents = list(tokenized_documents(
            source, tokenizer, report, keep=keep, max_documents=config.max_documents, workers=workers,
            progress=progress))
        token_lists = [doc.token_ids for doc in documents]
        if config.kind in RESPONSE_KINDS:  # prompt/response documents: mark the responses
            response_starts = [doc.response_start for doc in documents]
        if config.kind == "chat":  # the assistant turns, which the template's text separates
            response_spans = [doc.response_spans for doc in documents]
        progress.close()
        if report.total:  # never silently: say what was left out and why
            print(f"[data] {path}: {report.summary()}", file=sys.stderr, flush=True)
    if not token_lists:
        detail = (f"validation_fraction={config.validation_fraction}; raise it or set data.eval_path"
                  if keep is not None else report.summary())
        raise DataError(f"{path}: no documents in the {split} split ({detail})")
    if config.response_anchor is not None:  # below chunk_len (config.validate)
        if response_starts is None:
            raise DataError(f"data.response_anchor: {path} keeps no responses; prepare it again from prompt/response "
                            "data or unset data.response_anchor")
        packed = pack_aligned(token_lists, tokenizer.eos_id, chunk_len, response_starts, config.response_anchor,
                              response_spans=response_spans)
    else:
        packed = pack_documents(token_lists, tokenizer.eos_id, chunk_len, response_starts=response_starts,
                                response_spans=response_spans)
    packed.skipped = dict(report.counts)
    return packed


# ---------------------------------------------------------------------------------------------
# Order of chunks


def micro_batches(indices: list[int], micro_batch_size: int) -> Iterator[list[int]]:
    """Consecutive groups of ``micro_batch_size`` chunk indices (the last one may be shorter)."""
    if isinstance(micro_batch_size, bool) or not isinstance(micro_batch_size, int) or micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be a positive integer, got {micro_batch_size!r}")
    for start in range(0, len(indices), micro_batch_size):
        yield indices[start:start + micro_batch_size]


class ChunkLoader:
    """Which chunks each data-parallel rank trains on at each step.

    Every epoch visits the chunks in a fresh order drawn from (seed, epoch); a step takes the next
    ``chunks_per_step`` of them (the global batch) and rank r gets the r-th contiguous slice. The
    incomplete batch at the end of an epoch is dropped, as the reference's ``drop_last``. The order
    does not depend on the data-parallel size, and ``state_dict`` (epoch, position) resumes it
    exactly.
    """

    def __init__(self, num_chunks: int, chunks_per_step: int, dp_rank: int = 0, dp_size: int = 1, seed: int = 0):
        for name, value, low in (("num_chunks", num_chunks, 1), ("chunks_per_step", chunks_per_step, 1),
                                 ("dp_size", dp_size, 1), ("dp_rank", dp_rank, 0), ("seed", seed, 0)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise DataError(f"ChunkLoader: {name} must be an integer >= {low}, got {value!r}")
        if chunks_per_step % dp_size:
            raise DataError(f"chunks per step ({chunks_per_step}) must be divisible by the data-parallel size "
                            f"({dp_size}), so that every rank gets the same number of chunks")
        if dp_rank >= dp_size:
            raise DataError(f"ChunkLoader: dp_rank {dp_rank} is not below dp_size {dp_size}")
        if num_chunks < chunks_per_step:
            raise DataError(f"only {num_chunks} chunks, fewer than the {chunks_per_step} chunks of one step; use more "
                            "data, shorter chunks or fewer chunks per step")
        self.num_chunks, self.chunks_per_step = int(num_chunks), int(chunks_per_step)
        self.dp_rank, self.dp_size, self.seed = int(dp_rank), int(dp_size), int(seed)
        self.epoch = 0
        self.position = 0  # steps already taken in this epoch
        self._order_epoch, self._order = -1, None

    @property
    def steps_per_epoch(self) -> int:
        return self.num_chunks // self.chunks_per_step

    @property
    def chunks_per_rank(self) -> int:
        return self.chunks_per_step // self.dp_size

    def epoch_order(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
            self._order, self._order_epoch = rng.permutation(self.num_chunks), epoch
        return self._order

    def global_indices(self) -> list[int]:
        """All ranks' chunks of the next step (does not advance)."""
        epoch, position = self.epoch, self.position
        if position >= self.steps_per_epoch:
            epoch, position = epoch + 1, 0
        start = position * self.chunks_per_step
        return self.epoch_order(epoch)[start:start + self.chunks_per_step].tolist()

    def next_indices(self) -> list[int]:
        """This rank's chunks for the next step, then advance."""
        step = self.global_indices()
        if self.position >= self.steps_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        self.position += 1
        start = self.dp_rank * self.chunks_per_rank
        return step[start:start + self.chunks_per_rank]

    def __iter__(self) -> "ChunkLoader":
        return self

    def __next__(self) -> list[int]:
        return self.next_indices()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "num_chunks": self.num_chunks,
                "chunks_per_step": self.chunks_per_step}

    def load_state_dict(self, state: dict) -> None:
        for name in ("seed", "num_chunks", "chunks_per_step"):
            if name in state and state[name] != getattr(self, name):
                raise DataError(f"cannot resume the chunk order: the saved state has {name}={state[name]}, this run "
                                f"has {getattr(self, name)}; resuming needs the same data, chunk length and batch")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
