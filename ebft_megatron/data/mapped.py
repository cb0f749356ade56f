"""A split's chunks read from a memory map through a chunk index built once: what training and
evaluation read, at any corpus size.

The chunks are those of ``packing.pack_documents`` (the split's documents joined with EOS, cut
into ``chunk_len`` chunks, the last one padded) or, with ``data.response_anchor``, of
``packing.pack_aligned`` (one chunk per document, its response at the anchor, the stream closed
into a ring by one more EOS): the same tokens, lengths, document ids and response masks, tested
equal. Only the chunks a micro-batch asks for are read (:class:`MappedChunks`), so a process
holds no more of the corpus than its current micro-batch.

The corpus is an indexed corpus (``indexed.MappedCorpus``): one prepared by ``tools/prepare_data.py``,
or raw input (JSONL, chat, Parquet, code, translation) tokenized once into the cache
(:func:`tokenized_copy`). The chunk index of a split (:class:`ChunkIndex`) is built once from the
corpus's document lengths and split hashes, never its tokens, and holds int64 arrays:

  documents.npy        [m]  the corpus's number of each document of the split, in order
  starts.npy           [m]  where each one starts in the split's token stream
  chunk_starts.npy     [N]  where each chunk starts in that stream (with the anchor: in the ring)
  chunk_documents.npy  [N]  the document of the split that holds that first token
  index.json           what it was built from (its key) and the counts

Both are built by one process while the others wait (``cache.built_once``), keyed by what
determines them, and memory-mapped by every process.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ebft_megatron.assets import cache_dir
from ebft_megatron.data.cache import built_once, file_digest, key_of, say, writable_folder
from ebft_megatron.data.config import DataConfig
from ebft_megatron.data.dataset import SplitPlan, check_corpus_tokenizer, require_eos, split_plan
from ebft_megatron.data.indexed import MappedCorpus, tokenize_to_corpus
from ebft_megatron.data.packing import PackedChunks
from ebft_megatron.data.sources import DataError, list_code_files, record_files
from ebft_megatron.runtime import watchdog

INDEX_FORMAT = "ebft_megatron.chunk_index/1"
TOKENIZED_FORMAT = "ebft_megatron.tokenized/1"
BLOCK = 1 << 18  # documents or chunks handled at a time while building: memory of a few MB at any size
LARGE_RAW_INPUT = 256 << 20  # bytes of raw input past which the trainer suggests preparing it ahead
# the settings that decide what raw input tokenizes to (besides kind, path and the tokenizer)
READING_SETTINGS = ("prompt_key", "response_key", "chat_train_on", "source_key", "target_key", "source_lang",
                    "target_lang", "template", "extensions", "skip_bad", "max_documents")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json")


def cache_folder(config: DataConfig) -> Path:
    """``data.cache_dir``, else $EBFT_CACHE_DIR/data."""
    if config.cache_dir:
        return Path(config.cache_dir)

    return cache_dir() / "data"


def open_chunks(config: DataConfig, tokenizer, chunk_len: int, split: str = "train",
                verbose: bool = False) -> "MappedChunks":
    """The ``split`` of the data as chunks of ``chunk_len`` tokens, read when asked for: raw input is
    tokenized once into the cache, the chunk index built once (see :func:`cache_folder`)."""
    require_eos(tokenizer)
    if isinstance(chunk_len, bool) or not isinstance(chunk_len, int) or chunk_len < 1:
        raise DataError(f"chunk length must be a positive integer, got {chunk_len!r}")
    plan = split_plan(config, split)
    cache = cache_folder(config)
    built = []
    if config.kind == "indexed":
        prefix = Path(plan.path)
    else:
        prefix = tokenized_copy(config, plan.path, tokenizer, cache, verbose, built)
    corpus = MappedCorpus(prefix)
    check_corpus_tokenizer(prefix, corpus.info, tokenizer)
    anchor = config.response_anchor
    if anchor is not None and not corpus.info.responses:
        raise DataError(f"data.response_anchor: {prefix} keeps no responses (prepared from kind={corpus.info.kind or '?'}"
                        ", or by an earlier version); prepare it again from prompt/response data or unset "
                        "data.response_anchor")
    if anchor is not None and not 0 < anchor < chunk_len:
        raise DataError(f"response anchor {anchor} must be inside the chunk (1..{chunk_len - 1})")
    index = chunk_index(corpus, plan, config, chunk_len, split, cache, verbose, built)
    if verbose and corpus.info.skipped and config.kind != "indexed":  # never silently: what was left out
        say(f"{plan.path}: {json.loads((prefix.parent / 'source.json').read_text())['skipped_summary']}")
    return MappedChunks(corpus, index, tokenizer.eos_id, built=tuple(built))


# ---------------------------------------------------------------------------------------------
# Raw input, tokenized once


def _input_files(config: DataConfig, path: Path) -> list[Path]:
    if config.kind == "code":
        return list_code_files(path, config.extensions, config.resolved_exclude_dirs())
    if config.kind in ("jsonl", "chat"):
        return record_files(path)[0]
    return [Path(path)]


def tokenizer_identity(tokenizer) -> dict:
    """The tokenizer's files (by content), vocabulary size and EOS: what its ids depend on."""
    path = Path(getattr(tokenizer, "path", ""))
    folder = Path(getattr(tokenizer, "folder", path if path.is_dir() else path.parent))
    files = {name: file_digest(folder / name) for name in TOKENIZER_FILES if (folder / name).is_file()}
    if path.is_file():
        files[path.name] = file_digest(path)
    return {"files": files, "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id}


def _raw_input(config: DataConfig, path: Path, tokenizer) -> tuple[dict, int]:
    """(what a tokenized copy of ``path`` depends on, the input's size in bytes)."""
    files, size = [], 0
    for file in _input_files(config, path):
        try:
            stat = file.stat()
        except OSError:  # the reader says what is wrong with it
            files.append([str(file), None, None])
            continue
        files.append([str(file.resolve()), stat.st_size, stat.st_mtime_ns])
        size += stat.st_size
    settings = {name: getattr(config, name) for name in READING_SETTINGS}
    settings["exclude_dirs"] = config.resolved_exclude_dirs()
    description = {"format": TOKENIZED_FORMAT, "kind": config.kind, "path": str(Path(path).resolve()),
                   "files": files, "settings": settings, "tokenizer": tokenizer_identity(tokenizer)}
    return description, size


def tokenized_copy(config: DataConfig, path: Path, tokenizer, cache: Path, verbose: bool = False,
                   built: Optional[list] = None) -> Path:
    """The prefix of raw input ``path`` tokenized into an indexed corpus in ``cache``: made once
    (by one process, the others wait for it), under a key of the input files (path, size,
    modification time), the reading settings and the tokenizer's files."""
    description, size = _raw_input(config, path, tokenizer)
    key = key_of(description)
    entry = cache / "tokenized" / f"{config.kind}-{Path(path).name or 'input'}-{key[:16]}"

    def build(folder: Path) -> None:
        if size >= LARGE_RAW_INPUT:
            say(f"{path}: {size / 2**30:.1f} GiB of raw input, tokenized by one process before the first step; for "
                "input this large, tokenize it ahead with tools/prepare_data.py --workers K (docs/launching.md, "
                "Data) and train with data.kind=indexed")
        say(f"tokenizing {path} once, in this process (pid {os.getpid()}), into {entry}; any other process of the "
            "run waits for it and reads the copy")
        started = time.monotonic()
        info, report = tokenize_to_corpus(config, path, tokenizer, folder / "corpus",
                                          tokenizer_name=str(getattr(tokenizer, "path", "")), verbose=verbose)
        (folder / "source.json").write_text(json.dumps({**description, "skipped_summary": report.summary()},
                                                       indent=1) + "\n")
        say(f"tokenized {path}: {info.documents} documents, {info.tokens} tokens in "
            f"{time.monotonic() - started:.1f}s ({report.summary()})")

    if built_once(entry, build, f"the tokenized copy of {path}", verbose) and built is not None:
        built.append("tokenized")
    return entry / "corpus"


# ---------------------------------------------------------------------------------------------
# The chunk index of a split


class _NpyWriter:
    """A 1-D int64 ``.npy`` file of ``count`` values, written a block at a time (nothing mapped)."""

    def __init__(self, path: Path, count: int):
        self.path, self.count, self.written = path, count, 0
        self.handle = open(path, "wb")
        np.lib.format.write_array_header_1_0(self.handle, {"descr": np.dtype(np.int64).str, "fortran_order": False,
                                                           "shape": (count,)})

    def write(self, values: np.ndarray) -> None:
        values = np.ascontiguousarray(values, dtype=np.int64)
        self.handle.write(values.tobytes())
        self.written += len(values)

    def __enter__(self) -> "_NpyWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.handle.close()
        if exc_type is None and self.written != self.count:
            raise AssertionError(f"{self.path}: {self.written} values written, {self.count} declared")


def _response_starts(corpus: MappedCorpus, documents: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Where each document's response starts: its last span's start, its length when it has none."""
    spans = corpus.spans
    if spans.shape[1] == 0:
        return lengths
    last = np.searchsorted(spans[0], documents, side="right") - 1
    at = np.maximum(last, 0)
    has = (last >= 0) & (np.asarray(spans[0][at]) == documents)
    return np.where(has, spans[1][at], lengths)


def _kept(corpus: MappedCorpus, plan: SplitPlan, first: int, stop: int) -> np.ndarray:
    """The corpus's numbers of the documents in [first, stop) that the split keeps."""
    keep = plan.mask(np.asarray(corpus.key_hashes[first:stop]))
    return np.arange(first, stop, dtype=np.int64)[keep]


def _build_index(corpus: MappedCorpus, plan: SplitPlan, limit: int, chunk_len: int, anchor: Optional[int],
                 folder: Path, empty: str) -> dict:
    """Write the chunk index of the split ``plan`` of ``corpus``'s first ``limit`` documents into
    ``folder``, ``BLOCK`` documents or chunks at a time; its counts."""
    # 1. the whole index checked (once per chunk index built); the split's documents and tokens
    kept = tokens = first = 0
    for lengths in corpus.checked_lengths(BLOCK):
        stop = min(first + len(lengths), limit)
        if first < stop:
            documents = _kept(corpus, plan, first, stop)
            kept += len(documents)
            tokens += int(lengths[documents - first].sum())
        first += len(lengths)
        watchdog.progress("data")
    if kept == 0:
        raise DataError(empty)
    total = tokens + kept - 1  # an EOS between documents
    if total == 0:
        raise DataError(f"{plan.path}: all documents of the split are empty after tokenization")
    count = kept if anchor is not None else -(-total // chunk_len)
    # 2. the split's documents, where they start, and with the anchor where their chunks start
    with _NpyWriter(folder / "documents.npy", kept) as documents_out, \
            _NpyWriter(folder / "starts.npy", kept) as starts_out, \
            _NpyWriter(folder / "chunk_starts.npy", count) as chunk_starts_out:
        position = 0
        for first in range(0, limit, BLOCK):
            documents = _kept(corpus, plan, first, min(first + BLOCK, limit))
            lengths = np.asarray(corpus.lengths[documents], dtype=np.int64)
            starts = position + np.cumsum(lengths + 1) - (lengths + 1)
            position += int((lengths + 1).sum())
            documents_out.write(documents)
            starts_out.write(starts)
            if anchor is not None:  # the ring: the stream and one more EOS
                chunk_starts_out.write((starts + _response_starts(corpus, documents, lengths) - anchor) % (total + 1))
            watchdog.progress("data")
        if anchor is None:
            for first in range(0, count, BLOCK):
                chunk_starts_out.write(np.arange(first, min(first + BLOCK, count), dtype=np.int64) * chunk_len)
    # 3. the document that holds each chunk's first token
    starts, chunk_starts = (np.load(folder / name, mmap_mode="r") for name in ("starts.npy", "chunk_starts.npy"))
    with _NpyWriter(folder / "chunk_documents.npy", count) as out:
        for first in range(0, count, BLOCK):
            out.write(np.searchsorted(starts, chunk_starts[first:first + BLOCK], side="right") - 1)
    del starts, chunk_starts
    return {"documents": kept, "chunks": count, "stream_tokens": total}


class ChunkIndex:
    """A built chunk index, memory-mapped (see the module's description)."""

    FILES = ("documents", "starts", "chunk_starts", "chunk_documents")

    def __init__(self, folder: Path, key: str):
        self.folder = folder
        again = f"delete {folder} and it is built again"
        try:
            meta = json.loads((folder / "index.json").read_text())
            if meta["format"] != INDEX_FORMAT or meta["key"] != key:
                raise ValueError("it belongs to other data or another version")
            self.chunk_len, self.cyclic = int(meta["chunk_len"]), meta["response_anchor"] is not None
            self.num_documents, self.num_chunks = int(meta["documents"]), int(meta["chunks"])
            self.stream_tokens = int(meta["stream_tokens"])
            arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r", allow_pickle=False) for name in self.FILES}
        except (OSError, ValueError, KeyError, TypeError, EOFError) as err:
            raise DataError(f"{folder}: a damaged chunk index ({str(err).splitlines()[0] if str(err) else err!r}); "
                            f"{again}") from None
        sizes = {"documents": self.num_documents, "starts": self.num_documents, "chunk_starts": self.num_chunks,
                 "chunk_documents": self.num_chunks}
        for name, array in arrays.items():
            if array.dtype != np.int64 or array.shape != (sizes[name],):
                raise DataError(f"{folder}: a damaged chunk index ({name}.npy is a {array.dtype} array of shape "
                                f"{array.shape}, not {sizes[name]} int64 values); {again}")
        self.documents, self.starts = arrays["documents"], arrays["starts"]
        self.chunk_starts, self.chunk_documents = arrays["chunk_starts"], arrays["chunk_documents"]


def _index_parent(corpus: MappedCorpus, cache: Path, name: str) -> Path:
    """Beside the corpus (PREFIX.chunk_index/) where it is or can be, else in the cache."""
    beside = Path(f"{corpus.prefix}.chunk_index")
    if (beside / name).is_dir() or writable_folder(corpus.prefix.parent):
        return beside
    return cache / "chunk_index" / key_of({"prefix": str(corpus.prefix.resolve())})[:16]


def chunk_index(corpus: MappedCorpus, plan: SplitPlan, config: DataConfig, chunk_len: int, split: str, cache: Path,
                verbose: bool = False, built: Optional[list] = None) -> ChunkIndex:
    """The chunk index of ``split``: built once, under a key of the corpus's identity, the split
    rule, max_documents, the chunk length and the anchor (the chunk order's seed is not in it:
    ``dataset.ChunkLoader`` shuffles chunk numbers at run time)."""
    limit = min(config.max_documents or len(corpus), len(corpus))
    anchor = config.response_anchor
    description = {"format": INDEX_FORMAT, "corpus": corpus.identity(), "split": split,
                   "fraction": plan.fraction, "held_out": plan.held_out, "max_documents": limit,
                   "chunk_len": chunk_len, "response_anchor": anchor}
    key = key_of(description)
    name = f"{split}-{key[:16]}"
    folder = _index_parent(corpus, cache, name) / name
    if plan.fraction is not None:
        detail = f"validation_fraction={plan.fraction}; raise it or set data.eval_path"
    else:
        detail = "nothing skipped" if not corpus.info.skipped else f"skipped {sum(corpus.info.skipped.values())}"
    empty = f"{plan.path}: no documents in the {split} split ({detail})"

    def build(temp: Path) -> None:
        started = time.monotonic()
        counts = _build_index(corpus, plan, limit, chunk_len, anchor, temp, empty)
        meta = {**description, **counts, "key": key, "built_s": round(time.monotonic() - started, 3)}
        (temp / "index.json").write_text(json.dumps(meta, indent=1) + "\n")
        say(f"indexed the {split} split of {plan.path} in this process (pid {os.getpid()}; any other waits for it): "
            f"{counts['chunks']} chunks of {chunk_len} tokens from {counts['documents']} documents in "
            f"{meta['built_s']:.1f}s, in {folder}")

    if built_once(folder, build, f"the {split} chunk index of {plan.path}", verbose) and built is not None:
        built.append("indexed")
    return ChunkIndex(folder, key)


# ---------------------------------------------------------------------------------------------
# Chunks read when asked for


class _Column:
    """One of a MappedChunks' tensors, read by rows as a tensor would be indexed: ``column[index]``
    (an int, a slice, a list, an array or a tensor of chunk numbers) is a host tensor."""

    def __init__(self, chunks: "MappedChunks", name: str, shape: tuple, dtype: torch.dtype):
        self._chunks, self._name, self.shape, self.dtype = chunks, name, torch.Size(shape), dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> torch.Tensor:
        rows = _rows(index, len(self))
        values = getattr(self._chunks.batch(rows.reshape(-1)), self._name)
        return values[0] if rows.ndim == 0 else values

    def __iter__(self):
        return (self[row] for row in range(len(self)))


def _rows(index, count: int) -> np.ndarray:
    """Chunk numbers (an int64 array, 0-d for one) from an index as torch takes it."""
    if isinstance(index, slice):
        return np.arange(count, dtype=np.int64)[index]
    if isinstance(index, torch.Tensor):
        index = index.detach().cpu().numpy()
    rows = np.asarray(index)
    if rows.dtype == bool or (rows.size and not np.issubdtype(rows.dtype, np.integer)):
        raise TypeError(f"chunks are indexed by chunk numbers, not {rows.dtype} values")
    rows = rows.astype(np.int64)
    if rows.size and (rows.min() < -count or rows.max() >= count):
        raise IndexError(f"chunk index out of range for {count} chunks")
    return rows  # numpy takes negative numbers from the end, as torch does


class MappedChunks:
    """A split's chunks, read from the memory-mapped corpus when asked for, with ``PackedChunks``'s
    interface: ``tokens``, ``lengths``, ``doc_ids`` and ``response_mask`` (None without
    responses) are indexed like tensors (``chunks.tokens[picked]``), ``select`` takes a subset
    (still unread) and ``batch`` reads chunks into a ``PackedChunks``. The last batch read is
    kept, so reading a micro-batch's columns one after the other reads its chunks once."""

    def __init__(self, corpus: MappedCorpus, index: ChunkIndex, pad_id: int, rows: Optional[np.ndarray] = None,
                 built: tuple = ()):
        self.corpus, self.index, self.pad_id, self.eos_id = corpus, index, pad_id, pad_id
        self._rows = rows  # the chunk numbers of a subset, None: all of them
        self.built = built  # what this process built while opening ("tokenized", "indexed")
        self.num_documents, self.skipped = index.num_documents, dict(corpus.info.skipped)
        count, length = len(self), index.chunk_len
        self.tokens = _Column(self, "tokens", (count, length), torch.long)
        self.lengths = _Column(self, "lengths", (count,), torch.long)
        self.doc_ids = _Column(self, "doc_ids", (count, length), torch.long)
        self.response_mask = _Column(self, "response_mask", (count, length), torch.bool) if corpus.spans is not None \
            else None
        self._last: tuple[bytes, Optional[PackedChunks]] = (b"", None)

    def __len__(self) -> int:
        return self.index.num_chunks if self._rows is None else len(self._rows)

    @property
    def chunk_len(self) -> int:
        return self.index.chunk_len

    def _chunk_numbers(self, indices) -> np.ndarray:
        rows = _rows(indices, len(self)).reshape(-1)
        return rows if self._rows is None else self._rows[rows]

    def select(self, indices) -> "MappedChunks":
        """The chunks at ``indices``, same layout, nothing read yet."""
        return MappedChunks(self.corpus, self.index, self.pad_id, self._chunk_numbers(indices), self.built)

    def batch(self, indices) -> PackedChunks:
        """The chunks at ``indices`` read into host tensors."""
        numbers = self._chunk_numbers(indices)
        if self._last[0] == numbers.tobytes() and self._last[1] is not None:
            return self._last[1]
        count, length = len(numbers), self.chunk_len
        tokens = np.full((count, length), self.pad_id, dtype=np.int64)
        doc_ids = np.full((count, length), -1, dtype=np.int64)
        response = np.zeros((count, length), dtype=bool) if self.response_mask is not None else None
        lengths = np.empty(count, dtype=np.int64)
        for row, number in enumerate(numbers.tolist()):
            lengths[row] = self._read(number, tokens[row], doc_ids[row], None if response is None else response[row])
        # host tensors by design: batches cross to the run's device at runtime.device.to_device
        packed = PackedChunks(torch.as_tensor(tokens, device="cpu"), torch.as_tensor(lengths, device="cpu"),
                              torch.as_tensor(doc_ids, device="cpu"), self.num_documents, dict(self.skipped),
                              None if response is None else torch.as_tensor(response, device="cpu"))
        self._last = (numbers.tobytes(), packed)
        return packed

    def _read(self, number: int, tokens: np.ndarray, doc_ids: np.ndarray, response: Optional[np.ndarray]) -> int:
        """Chunk ``number`` into the rows given: from its first token, walk the split's documents,
        each followed by its EOS (the last one's EOS only in the ring, where it belongs to no
        document); the chunk's real length."""
        index, corpus, length = self.index, self.corpus, len(tokens)
        last = index.num_documents - 1
        document = int(index.chunk_documents[number])
        offset = int(index.chunk_starts[number]) - int(index.starts[document])
        filled = 0
        while filled < length:
            number_in_corpus = int(index.documents[document])
            size = int(corpus.lengths[number_in_corpus])
            if offset < size:
                count = min(size - offset, length - filled)
                tokens[filled:filled + count] = corpus.tokens(number_in_corpus, offset, count)
                doc_ids[filled:filled + count] = document
                if response is not None:
                    for start, end in corpus.response_spans(number_in_corpus).T.tolist():
                        low, high = max(start, offset), min(end, offset + count)
                        if low < high:
                            response[filled + low - offset:filled + high - offset] = True
                filled += count
                if filled == length:
                    break
            if document == last and not index.cyclic:  # the end of the stream
                break
            tokens[filled] = self.eos_id
            doc_ids[filled] = -1 if document == last else document
            filled += 1
            document, offset = (0 if document == last else document + 1), 0
        return filled
