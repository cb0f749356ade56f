"""From a DataConfig to packed chunks, and the order in which training visits them.

``load_chunks`` reads (or loads pre-tokenized) documents, keeps those of the requested split,
tokenizes them in batches with the fast tokenizer and packs them. ``ChunkLoader`` hands out the
chunk indices of each step to each data-parallel rank, reproducibly and resumably.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from ebft_megatron.data.config import DataConfig
from ebft_megatron.data.indexed import read_indexed
from ebft_megatron.data.packing import (
    PackedChunks, check_token_range, pack_aligned, pack_documents, response_start,
)
from ebft_megatron.data.sources import (
    DataError, Document, SkipReport, is_held_out, list_code_files, read_code_folder, read_jsonl_pairs,
    read_translation_pairs, split_hash,
)

SPLITS = ("train", "validation")
ENCODE_BATCH_DOCUMENTS = 64  # enough texts per call for the fast tokenizer to amortize its overhead


# ---------------------------------------------------------------------------------------------
# Reading and tokenizing


@dataclass
class DocumentSource:
    documents: Iterator[Document]
    total_units: int  # files (code) or lines (jsonl, translation): what the progress line counts
    unit: str


def open_documents(config: DataConfig, path, report: SkipReport, count_units: bool = False) -> DocumentSource:
    """The documents at ``path`` (config.path or config.eval_path) for a raw ``config.kind``."""
    if config.kind == "code":
        units = len(list_code_files(path, config.extensions, config.resolved_exclude_dirs())) if count_units else 0
        documents = read_code_folder(path, config.extensions, config.resolved_exclude_dirs(), config.skip_bad, report)
        return DocumentSource(documents, units, "files")
    if config.kind == "jsonl":
        documents = read_jsonl_pairs(path, config.prompt_key, config.response_key, config.skip_bad, report)
    elif config.kind == "translation":
        documents = read_translation_pairs(path, config.translation_format(), config.skip_bad, report)
    else:
        raise DataError(f"data.kind={config.kind} has no raw documents; it is read with read_indexed")
    return DocumentSource(documents, _count_lines(path) if count_units else 0, "lines")


def _count_lines(path) -> int:
    try:
        with open(path, "rb") as handle:
            return sum(block.count(b"\n") for block in iter(lambda: handle.read(1 << 20), b""))
    except OSError:
        return 0  # the reader reports the problem itself


def batch_encoder(tokenizer) -> Callable[[list[str]], list[list[int]]]:
    """Encode many texts in one call. The fast HF tokenizer's ``encode_batch`` gives the same ids as
    ``Tokenizer.encode`` (no special tokens) without a Python round trip per text."""
    public = getattr(tokenizer, "encode_batch", None)
    if callable(public):
        return public
    hf = getattr(tokenizer, "_hf", None)
    if hf is not None:
        backend = hf.backend_tokenizer
        return lambda texts: [encoding.ids for encoding in backend.encode_batch(texts, add_special_tokens=False)]
    sentencepiece = getattr(tokenizer, "_sp", None)
    if sentencepiece is not None:
        return lambda texts: sentencepiece.encode(list(texts))
    return lambda texts: [tokenizer.encode(text) for text in texts]


def encode_documents(documents: list[Document],
                     encode: Callable[[list[str]], list[list[int]]]) -> list[tuple[np.ndarray, int]]:
    """Each document's segments are encoded separately and their ids concatenated (the reference
    tokenizes question and answer apart: tokens(q) + tokens(a), not tokens(q + a)); with each, the
    index where its response (last segment) begins, for response-only metrics."""
    texts = [segment for document in documents for segment in document.segments]
    encoded = encode(texts)
    out, start = [], 0
    for document in documents:
        parts = encoded[start:start + len(document.segments)]
        start += len(document.segments)
        ids = np.concatenate([np.asarray(part, dtype=np.int64) for part in parts])
        out.append((ids, response_start([len(part) for part in parts])))
    return out


# Worker processes (prepare_data --workers): the encoder is inherited through fork.
_WORKER_ENCODE = None


def _worker_init(encode) -> None:
    global _WORKER_ENCODE
    _WORKER_ENCODE = encode


def _worker_encode(documents: list[Document]) -> list[np.ndarray]:
    return encode_documents(documents, _WORKER_ENCODE)


class Progress:
    """One self-overwriting stderr line: done/total, rate, ETA. Silent unless enabled."""

    def __init__(self, label: str, total: int, unit: str, enabled: bool, interval_s: float = 0.5):
        self.label, self.total, self.unit, self.enabled, self.interval_s = label, total, unit, enabled, interval_s
        self.done = 0
        self.start = self._last = time.monotonic()

    def update(self, done: int) -> None:
        self.done = done
        now = time.monotonic()
        if self.enabled and now - self._last >= self.interval_s:
            self._last = now
            self._print(end="")

    def close(self) -> None:
        if self.enabled:
            self._print(end="\n")

    def _print(self, end: str) -> None:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.done / elapsed
        if self.total and end == "":
            remaining = max(self.total - self.done, 0) / rate if rate > 0 else float("inf")
            tail = f", ETA {_seconds(remaining)}"
        else:
            tail = f", {_seconds(elapsed)}"
        total = f"/{self.total}" if self.total else ""
        print(f"\r{self.label}: {self.done}{total} {self.unit} ({rate:.1f} {self.unit}/s{tail})  ", end=end,
              file=sys.stderr, flush=True)


def _seconds(value: float) -> str:
    if value == float("inf"):
        return "?"
    minutes, seconds = divmod(int(round(value)), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


@dataclass
class TokenizedDocument:
    token_ids: np.ndarray  # int64, without EOS
    key_hash: int  # split_hash(document.split_key)
    response_start: int = 0  # index of the first response token (== len(token_ids) when none)


def tokenized_documents(source: DocumentSource, tokenizer, report: SkipReport, *,
                        keep: Callable[[int], bool] | None = None, max_documents: int | None = None,
                        workers: int = 1, progress: Progress | None = None) -> Iterator[TokenizedDocument]:
    """Documents in input order, the first ``max_documents`` of them, those with ``keep(hash)``."""
    encode = batch_encoder(tokenizer)

    def batches() -> Iterator[tuple[list[Document], list[int]]]:
        batch, hashes, seen = [], [], 0
        for document in source.documents:
            seen += 1
            if progress is not None:
                progress.update(seen + report.total)
            key_hash = split_hash(document.split_key)
            if keep is None or keep(key_hash):
                batch.append(document)
                hashes.append(key_hash)
            if len(batch) >= ENCODE_BATCH_DOCUMENTS:
                yield batch, hashes
                batch, hashes = [], []
            if max_documents is not None and seen >= max_documents:
                break
        if batch:
            yield batch, hashes

    if workers <= 1:
        for batch, hashes in batches():
            for (ids, start), key_hash in zip(encode_documents(batch, encode), hashes):
                yield TokenizedDocument(ids, key_hash, start)
        return
    import multiprocessing

    # Batches are read and checked here, encoded in the workers; imap keeps the input order, so the
    # output does not depend on the number of workers.
    pending_hashes: list[list[int]] = []

    def feed() -> Iterator[list[Document]]:
        for batch, hashes in batches():
            pending_hashes.append(hashes)
            yield batch

    with multiprocessing.get_context("fork").Pool(workers, initializer=_worker_init, initargs=(encode,)) as pool:
        for encoded in pool.imap(_worker_encode, feed()):
            for (ids, start), key_hash in zip(encoded, pending_hashes.pop(0)):
                yield TokenizedDocument(ids, key_hash, start)


# ---------------------------------------------------------------------------------------------
# Chunks of one split


def _split_plan(config: DataConfig, split: str):
    """(path to read, which split hashes to keep): eval_path is a whole validation set; otherwise
    the validation split is the held-out fraction of path and training gets the rest."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    fraction = config.validation_fraction
    if split == "train":
        if config.eval_path is not None or fraction == 0:
            return config.resolved_path(), None
        return config.resolved_path(), lambda key_hash: not is_held_out(key_hash, fraction)
    if config.eval_path is not None:
        return config.eval_path, None
    if fraction == 0:
        raise DataError("no validation data: set data.validation_fraction > 0 or data.eval_path")
    return config.resolved_path(), lambda key_hash: is_held_out(key_hash, fraction)


def _check_corpus_tokenizer(prefix, info, tokenizer) -> None:
    if info.vocab_size != tokenizer.vocab_size or info.eos_id != tokenizer.eos_id:
        raise DataError(
            f"{prefix}: tokenized with {info.tokenizer} (vocabulary {info.vocab_size}, EOS {info.eos_id}) but the "
            f"tokenizer here is {tokenizer.path} (vocabulary {tokenizer.vocab_size}, EOS {tokenizer.eos_id}); "
            "prepare the data again with this tokenizer")
    check_token_range(info.max_token_id, tokenizer.vocab_size, str(prefix))


def load_chunks(config: DataConfig, tokenizer, chunk_len: int, split: str = "train", verbose: bool = False,
                workers: int = 1) -> PackedChunks:
    """Tokenize and pack one split of the data into chunks of ``chunk_len`` tokens."""
    if tokenizer.eos_id is None:
        raise DataError(f"the tokenizer {tokenizer.path} has no EOS token, which packing puts between documents; "
                        "use a tokenizer whose tokenizer_config.json names an eos_token")
    path, keep = _split_plan(config, split)
    report = SkipReport()
    response_starts = None  # indexed corpora keep no segment boundaries
    if config.kind == "indexed":
        corpus = read_indexed(path)
        _check_corpus_tokenizer(path, corpus.info, tokenizer)
        limit = config.max_documents or len(corpus.documents)
        token_lists = [ids for ids, key_hash in zip(corpus.documents[:limit], corpus.key_hashes[:limit].tolist())
                       if keep is None or keep(key_hash)]
        report.counts.update(corpus.info.skipped)  # skipped when the corpus was prepared (reported then)
    else:
        source = open_documents(config, path, report, count_units=verbose)
        progress = Progress(f"[data] tokenizing {path} ({split})", source.total_units, source.unit, verbose)
        documents = list(tokenized_documents(
            source, tokenizer, report, keep=keep, max_documents=config.max_documents, workers=workers,
            progress=progress))
        token_lists = [doc.token_ids for doc in documents]
        if config.kind in ("jsonl", "translation"):  # prompt/response documents: mark the responses
            response_starts = [doc.response_start for doc in documents]
        progress.close()
        if report.total:  # never silently: say what was left out and why
            print(f"[data] {path}: {report.summary()}", file=sys.stderr, flush=True)
    if not token_lists:
        detail = (f"validation_fraction={config.validation_fraction}; raise it or set data.eval_path"
                  if keep is not None else report.summary())
        raise DataError(f"{path}: no documents in the {split} split ({detail})")
    if config.response_anchor is not None:
        if config.response_anchor >= chunk_len:
            raise DataError(f"data.response_anchor={config.response_anchor} must be below the chunk length {chunk_len}")
        packed = pack_aligned(token_lists, tokenizer.eos_id, chunk_len, response_starts, config.response_anchor)
    else:
        packed = pack_documents(token_lists, tokenizer.eos_id, chunk_len, response_starts=response_starts)
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
