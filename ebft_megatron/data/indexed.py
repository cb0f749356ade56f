"""Pre-tokenized corpora in megatron-core's indexed dataset format (``PREFIX.bin`` + ``PREFIX.idx``).

One sequence per document: its token ids, without EOS (packing adds those), so packing from an
indexed corpus gives exactly what packing from the raw files gives. Small files go with it:
``PREFIX.keys.npy`` (each document's split hash, so the held-out split is the same as from raw
input), for documents with a response (kinds jsonl, chat, translation) ``PREFIX.spans.npy`` (the
response's token spans: int64 [3, S] rows document, start, end, sorted by document), and
``PREFIX.json`` (tokenizer, vocabulary size, counts). The JSON is written last: a prefix without
it is incomplete. Everything is written under temporary names and renamed at the end, so an
interrupted or failed run leaves nothing that looks like a corpus.

Training reads a corpus in place (:class:`MappedCorpus`): megatron-core's ``IndexedDataset`` over
the memory-mapped ``.bin``, the other arrays memory-mapped too; only the small header checks run
at every start, the full check of the index runs once, when a chunk index is built from it
(:meth:`MappedCorpus.checked_lengths`). ``read_indexed`` copies a whole corpus into memory, for
small corpora and for the in-memory packing the memory-mapped chunks are tested against.
"""

from __future__ import annotations

import json
import os
import struct
import tokenize
from array import array
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from ebft_megatron.cli import quiet_imports
from ebft_megatron.data.config import RESPONSE_KINDS, DataConfig
from ebft_megatron.data.reading import Progress, open_documents, tokenized_documents
from ebft_megatron.data.sources import DataError, SkipReport
from ebft_megatron.runtime import watchdog
from ebft_megatron.settings import unknown_and_missing

FORMAT = "ebft_megatron.indexed/1"
SUFFIXES = (".bin", ".idx", ".keys.npy", ".json")  # in commit order: the JSON marks completion
SPANS_SUFFIX = ".spans.npy"  # only with responses; committed before the JSON
# megatron's .idx header: magic, version 1, token dtype code, sequence count, document count
INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_HEADER = struct.Struct("<9sQBQQ")
AGAIN = "the files are damaged or do not belong together; prepare it again"
CHECK_BLOCK = 1 << 18  # documents checked at a time: the full check holds a few MB whatever the corpus size


@dataclass
class IndexedCorpusInfo:
    tokenizer: str
    vocab_size: int
    eos_id: int | None
    documents: int = 0
    tokens: int = 0
    max_token_id: int = -1
    kind: str = ""
    source: str = ""
    skipped: dict = field(default_factory=dict)
    format: str = FORMAT
    responses: bool = False  # PREFIX.spans.npy holds each document's response spans


def corpus_files(prefix: str | Path) -> list[Path]:
    return [Path(f"{prefix}{suffix}") for suffix in SUFFIXES]


def spans_file(prefix: str | Path) -> Path:
    return Path(f"{prefix}{SPANS_SUFFIX}")


def _all_files(prefix: str | Path) -> list[Path]:
    """Every file a corpus can have, in commit order (the JSON last)."""
    files = corpus_files(prefix)
    return files[:3] + [spans_file(prefix), files[3]]


def _megatron_indexed():
    quiet_imports()  # megatron.core's import-time notices about apex / TE
    from megatron.core.datasets import indexed_dataset

    return indexed_dataset


class IndexedCorpusWriter:
    """``with IndexedCorpusWriter(prefix, info) as out: out.add(ids, key_hash)``; the files appear
    under their real names only when the block ends without an error. With ``info.responses``
    every document comes with its response spans (``out.add(ids, key_hash, spans)``)."""

    def __init__(self, prefix: str | Path, info: IndexedCorpusInfo):
        self.prefix = Path(prefix)
        existing = [str(path) for path in _all_files(self.prefix) if path.exists()]
        if existing:
            raise DataError(f"{existing[0]} already exists; choose another output prefix or delete "
                            f"{', '.join(existing)}")
        if not self.prefix.parent.is_dir():
            raise DataError(f"{self.prefix.parent}: output folder does not exist; create it first")
        self.info = info
        self._temp_prefix = self.prefix.with_name(f"{self.prefix.name}.partial-{os.getpid()}")
        self._key_hashes = array("Q")
        self._spans = (array("q"), array("q"), array("q"))  # document, start, end
        self._builder = None

    def __enter__(self) -> "IndexedCorpusWriter":
        return self

    def _open_builder(self):
        # Opened at the first document: importing megatron.core takes seconds, and bad input found
        # while reading should not wait for it.
        indexed_dataset = _megatron_indexed()
        dtype = indexed_dataset.DType.optimal_dtype(self.info.vocab_size)
        return indexed_dataset.IndexedDatasetBuilder(f"{self._temp_prefix}.bin", dtype=dtype)

    def add(self, token_ids, key_hash: int, response_spans=None) -> None:
        ids = np.asarray(token_ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.info.vocab_size):
            raise DataError(f"token id {int(ids.max())} does not fit the vocabulary of {self.info.vocab_size}")
        if (response_spans is not None) != self.info.responses:
            raise ValueError("response spans come with every document of a corpus with responses, and only then")
        if self._builder is None:
            self._builder = self._open_builder()
        for start, end in response_spans or ():
            if not 0 <= start <= end <= ids.size:
                raise ValueError(f"response span {start}..{end} is outside the document's {ids.size} tokens")
            for column, value in zip(self._spans, (self.info.documents, start, end)):
                column.append(value)
        self._builder.add_document(ids, [int(ids.size)])
        self._key_hashes.append(key_hash)
        self.info.documents += 1
        self.info.tokens += int(ids.size)
        if ids.size:
            self.info.max_token_id = max(self.info.max_token_id, int(ids.max()))

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._commit()
        finally:
            if self._builder is not None:
                self._builder.data_file.close()
            for path in _all_files(self._temp_prefix):  # nothing half-written stays behind
                path.unlink(missing_ok=True)

    def _commit(self) -> None:
        if self.info.documents == 0:
            raise DataError(f"{self.prefix}: no documents to write")
        temp = _all_files(self._temp_prefix)
        self._builder.finalize(str(temp[1]))
        np.save(temp[2], np.frombuffer(self._key_hashes, dtype=np.uint64))
        if self.info.responses:
            np.save(temp[3], np.stack([np.frombuffer(column, dtype=np.int64) for column in self._spans]))
        temp[4].write_text(json.dumps(asdict(self.info), indent=2) + "\n")
        renamed = []
        try:
            for source, target in zip(temp, _all_files(self.prefix)):
                if source.exists():
                    os.replace(source, target)
                    renamed.append(target)
        except BaseException:
            for target in renamed:  # all the files or none
                target.unlink(missing_ok=True)
            raise


def tokenize_to_corpus(config: DataConfig, path, tokenizer, prefix: str | Path, *, tokenizer_name: str,
                       workers: int = 1, label: str = "[data] tokenizing", verbose: bool = False
                       ) -> tuple[IndexedCorpusInfo, SkipReport]:
    """Tokenize the raw input ``path`` of ``config.kind`` (its first ``config.max_documents``
    documents) into an indexed corpus at ``prefix``, with the response spans of prompt/response
    documents; what ``tools/prepare_data.py`` runs and what training caches raw input as."""
    report = SkipReport()
    responses = config.kind in RESPONSE_KINDS
    info = IndexedCorpusInfo(tokenizer=tokenizer_name, vocab_size=tokenizer.vocab_size, eos_id=tokenizer.eos_id,
                             kind=config.kind, source=str(Path(path).resolve()), responses=responses)
    with IndexedCorpusWriter(prefix, info) as out:
        source = open_documents(config, path, report, count_units=verbose, tokenizer=tokenizer)
        progress = Progress(f"{label} {path}", source.total_units, source.unit, enabled=verbose)
        for document in tokenized_documents(source, tokenizer, report, max_documents=config.max_documents,
                                            workers=workers, progress=progress):
            out.add(document.token_ids, document.key_hash, document.spans() if responses else None)
            if info.documents % 1024 == 0:
                watchdog.progress("data")  # a long tokenization is not a stall
        progress.close()
        if out.info.documents == 0:
            raise DataError(f"{path}: no documents ({report.summary()})")
        info.skipped = dict(report.counts)
    return info, report


def read_info(prefix: str | Path) -> IndexedCorpusInfo:
    bin_path, idx_path, keys_path, meta_path = corpus_files(prefix)
    if not meta_path.is_file():
        if bin_path.exists() or idx_path.exists():
            raise DataError(f"{prefix}: incomplete indexed corpus ({meta_path.name} is missing; "
                            "tools/prepare_data.py writes it last). Prepare it again")
        raise DataError(f"{prefix}: no indexed corpus here (expected {meta_path.name}, {bin_path.name} and "
                        f"{idx_path.name}); write one with tools/prepare_data.py")
    try:
        raw = json.loads(meta_path.read_text())
    except ValueError as err:  # also bad UTF-8 and numbers of thousands of digits
        raise DataError(f"{meta_path}: not an ebft_megatron corpus description ({str(err).split(';')[0]})") from None
    except RecursionError:
        raise DataError(f"{meta_path}: not an ebft_megatron corpus description (nested too deeply)") from None
    if not isinstance(raw, dict):
        raise DataError(f"{meta_path}: not an ebft_megatron corpus description (a JSON {type(raw).__name__}, not an "
                        "object); prepare it again")
    unknown, missing = unknown_and_missing(IndexedCorpusInfo, raw)
    if unknown or missing:
        raise DataError(f"{meta_path}: not an ebft_megatron corpus description (unknown keys {unknown}, missing keys "
                        f"{missing}); prepare it again")
    info = IndexedCorpusInfo(**raw)
    if info.format != FORMAT:
        raise DataError(f"{meta_path}: format {info.format!r}, this version reads {FORMAT!r}; prepare it again")
    # the reader and packing trust these: a wrong type would fail far from this file
    text, integer = ((str,), "a string"), ((int,), "an integer")
    kinds = {"tokenizer": text, "vocab_size": integer, "eos_id": ((int, type(None)), "an integer or null"),
             "documents": integer, "tokens": integer, "max_token_id": integer, "kind": text, "source": text,
             "skipped": ((dict,), "an object")}
    for name, (types, expected) in kinds.items():
        value = getattr(info, name)
        if not isinstance(value, types) or isinstance(value, bool):
            raise DataError(f"{meta_path}: {name} is {value!r}, not {expected}; prepare it again")
    if not isinstance(info.responses, bool):
        raise DataError(f"{meta_path}: responses is {info.responses!r}, not true or false; prepare it again")
    if not all(isinstance(count, int) and not isinstance(count, bool) for count in info.skipped.values()):
        raise DataError(f"{meta_path}: skipped must map reasons to counts, got {info.skipped!r}; prepare it again")
    for path in (bin_path, idx_path, keys_path) + ((spans_file(prefix),) if info.responses else ()):
        if not path.is_file():
            raise DataError(f"{path}: missing from the indexed corpus {prefix}; prepare it again")
    return info


@dataclass(frozen=True)
class _IndexLayout:
    dtype: type  # the token dtype megatron wrote
    sequences: int
    path: Path


def _check_index_header(prefix: str | Path, info: IndexedCorpusInfo) -> _IndexLayout:
    """What ``PREFIX.idx``'s header says, once it agrees with the JSON and the files' sizes (a few
    bytes read: every start runs it). megatron's reader trusts its index: a bad header is an
    assert, a short file a numpy error."""
    bin_path, idx_path, _, _ = corpus_files(prefix)
    with open(idx_path, "rb") as handle:
        data = handle.read(INDEX_HEADER.size)
    if len(data) < INDEX_HEADER.size:
        raise DataError(f"{idx_path}: {len(data)} bytes, shorter than an index header; {AGAIN}")
    magic, version, code, sequences, documents = INDEX_HEADER.unpack_from(data)
    if magic != INDEX_MAGIC or version != 1:
        raise DataError(f"{idx_path}: not a megatron indexed-dataset index of version 1; {AGAIN}")
    indexed_dataset = _megatron_indexed()
    dtype = indexed_dataset.DType.optimal_dtype(info.vocab_size)  # what the writer chose
    if code != indexed_dataset.DType.code_from_dtype(dtype):
        raise DataError(f"{idx_path}: token dtype code {code}, but a vocabulary of {info.vocab_size} is written as "
                        f"{np.dtype(dtype).name}; {AGAIN}")
    # One sequence per document: megatron's document index must then be 0, 1, ..., count.
    if sequences != info.documents or documents != sequences + 1:
        raise DataError(f"{prefix}: {sequences} sequences in the index but {info.documents} documents in its JSON; "
                        "the files do not belong together. Prepare it again")
    size = idx_path.stat().st_size
    if size != INDEX_HEADER.size + 12 * sequences + 8 * documents:
        raise DataError(f"{idx_path}: {size} bytes, not the size of an index of {sequences} sequences; {AGAIN}")
    itemsize = np.dtype(dtype).itemsize
    if bin_path.stat().st_size != info.tokens * itemsize:
        raise DataError(f"{bin_path}: {bin_path.stat().st_size} bytes, the JSON counts {info.tokens} tokens "
                        f"({info.tokens * itemsize} bytes); {AGAIN}")
    return _IndexLayout(dtype, sequences, idx_path)


def _index_length_blocks(prefix: str | Path, info: IndexedCorpusInfo, layout: _IndexLayout,
                         block: int = CHECK_BLOCK) -> Iterator[np.ndarray]:
    """The sequence lengths in ``PREFIX.idx`` (int64), ``block`` at a time, each block checked
    against the offsets and the document index before it is given out: a wrong length or offset
    would silently read another document's tokens."""
    count, itemsize = layout.sequences, np.dtype(layout.dtype).itemsize
    lengths_at = INDEX_HEADER.size
    pointers_at, documents_at = lengths_at + 4 * count, lengths_at + 12 * count
    end, total = 0, 0  # the byte offset after the previous block's last sequence; tokens so far
    with open(layout.path, "rb") as handle:
        def read(at: int, dtype, items: int) -> np.ndarray:
            handle.seek(at)
            return np.frombuffer(handle.read(items * np.dtype(dtype).itemsize), dtype=dtype)

        for first in range(0, count + 1, block):  # + 1: the document index has count + 1 entries
            items = min(block, count - first)
            lengths = read(lengths_at + 4 * first, np.int32, items).astype(np.int64)
            pointers = read(pointers_at + 8 * first, np.int64, items)
            document_index = read(documents_at + 8 * first, np.int64, min(block, count + 1 - first))
            ends = end + np.cumsum(lengths) * itemsize
            if ((lengths < 0).any() or not np.array_equal(pointers, ends - lengths * itemsize)
                    or not np.array_equal(document_index, np.arange(first, first + len(document_index)))):
                raise DataError(f"{layout.path}: the sequence lengths, offsets and document index do not fit "
                                f"together; {AGAIN}")
            end = int(ends[-1]) if items else end
            total += int(lengths.sum())
            if items:
                yield lengths
    if total != info.tokens:
        raise DataError(f"{layout.path}: {total} tokens in the index but {info.tokens} in its JSON; {AGAIN}")


def _check_index(prefix: str | Path, info: IndexedCorpusInfo) -> np.ndarray:
    """The sequence lengths in ``PREFIX.idx``, once the index agrees with itself, the ``.bin`` and the
    JSON."""
    layout = _check_index_header(prefix, info)
    blocks = list(_index_length_blocks(prefix, info, layout))
    return np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.int64)


NPY_ERRORS = (ValueError, OSError, EOFError, SyntaxError, tokenize.TokenError)  # what numpy's header parser raises


def _map_npy(path: Path, what: str, dtype, shape_ok, again: str = "prepare it again") -> np.ndarray:
    """The array of a ``.npy`` file, memory-mapped (nothing is read but its header), once its header
    says ``dtype`` and a shape ``shape_ok`` accepts and the file is as long as the header says. Only
    ``.npy``: np.load would also open zip archives and pickles."""
    try:
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran_order, found = reader(handle)
            offset = handle.tell()
    # besides its own ValueErrors, numpy's header parser lets SyntaxError and tokenize's errors through
    except NPY_ERRORS as err:
        problem = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DataError(f"{path}: not a NumPy array file ({problem}); {again}") from None
    if found != np.dtype(dtype) or not shape_ok(shape) or (fortran_order and len(shape) > 1):
        raise DataError(f"{path}: a {found} array of shape {shape}, expected {what}; {again}")
    size = int(np.prod(shape, dtype=np.int64)) * found.itemsize
    if path.stat().st_size != offset + size:
        raise DataError(f"{path}: {path.stat().st_size} bytes, its header describes {offset + size}; {again}")
    if size == 0:
        return np.zeros(shape, dtype=found)
    return np.memmap(path, dtype=found, mode="r", offset=offset, shape=shape)


def _map_key_hashes(keys_path: Path, count: int) -> np.ndarray:
    key_hashes = _map_npy(keys_path, f"{count} uint64 split hashes", np.uint64, lambda shape: len(shape) == 1)
    if key_hashes.shape != (count,):
        raise DataError(f"{keys_path}: {key_hashes.shape[0]} entries for {count} documents; prepare it again")
    return key_hashes


def _map_spans(path: Path) -> np.ndarray:
    return _map_npy(path, "int64 response spans of shape (3, S)", np.int64,
                    lambda shape: len(shape) == 2 and shape[0] == 3)


def _check_span_block(path: Path, spans: np.ndarray, previous_document: int, lengths_of) -> int:
    """Spans [3, k] sorted by document, each inside its document (``lengths_of(documents)``); the
    last document seen."""
    documents, starts, ends = spans
    if len(documents) and (documents[0] < previous_document or (np.diff(documents) < 0).any()
                           or documents[-1] >= len(lengths_of)):
        raise DataError(f"{path}: response spans not sorted by document or of a document the corpus does not have; "
                        f"{AGAIN}")
    if ((starts < 0) | (starts > ends) | (ends > lengths_of[documents])).any():
        raise DataError(f"{path}: a response span lies outside its document; {AGAIN}")
    return int(documents[-1]) if len(documents) else previous_document


@dataclass
class IndexedCorpus:
    documents: list[np.ndarray]  # int64 token ids per document, in input order
    key_hashes: np.ndarray  # uint64 per document, for the held-out split
    info: IndexedCorpusInfo
    # per document its response's [start, end) token spans (a corpus with responses), else None
    response_spans: Optional[list[tuple[tuple[int, int], ...]]] = None


def read_indexed(prefix: str | Path) -> IndexedCorpus:
    info = read_info(prefix)
    bin_path, _, keys_path, _ = corpus_files(prefix)
    lengths = _check_index(prefix, info)
    count = len(lengths)
    if lengths.sum() == 0:  # megatron cannot map an empty .bin; there is nothing to read in it
        documents = [np.zeros(0, dtype=np.int64) for _ in range(count)]
    else:
        dataset = _megatron_indexed().IndexedDataset(str(prefix), mmap=True)
        # Copy out of the memory map so the arrays outlive the dataset object.
        documents = [np.array(seq, dtype=np.int64) for seq in dataset[0:count]]
        del dataset
    tokens = np.concatenate(documents) if documents else np.zeros(0, dtype=np.int64)
    highest = int(tokens.max()) if tokens.size else -1
    if highest != info.max_token_id or (tokens.size and int(tokens.min()) < 0):
        raise DataError(f"{bin_path}: token ids {int(tokens.min()) if tokens.size else '-'}..{highest}, but its JSON "
                        f"says the highest is {info.max_token_id}; {AGAIN}")
    key_hashes = np.array(_map_key_hashes(keys_path, count))
    response_spans = None
    if info.responses:
        spans = np.array(_map_spans(spans_file(prefix)))
        _check_span_block(spans_file(prefix), spans, 0, lengths)
        response_spans = [() for _ in range(count)]
        for document, start, end in spans.T.tolist():
            response_spans[document] += ((start, end),)
    return IndexedCorpus(documents, key_hashes, info, response_spans)


class MappedCorpus:
    """An indexed corpus read in place: megatron-core's ``IndexedDataset`` over the memory-mapped
    ``.bin`` (no copy), the key hashes and response spans memory-mapped too. Opening reads the
    headers only; :meth:`checked_lengths` checks the whole index, once, for whoever builds a chunk
    index from it; :meth:`tokens` checks each piece it reads against the JSON's highest id."""

    def __init__(self, prefix: str | Path):
        self.prefix = Path(prefix)
        self.info = info = read_info(prefix)
        self._layout = _check_index_header(prefix, info)
        self.bin_path, _, keys_path, _ = corpus_files(prefix)
        self.key_hashes = _map_key_hashes(keys_path, info.documents)
        self.spans = _map_spans(spans_file(prefix)) if info.responses else None
        if info.tokens:
            self._dataset = _megatron_indexed().IndexedDataset(str(prefix), mmap=True)
            self.lengths = self._dataset.sequence_lengths  # int32, memory-mapped
        else:  # megatron cannot map an empty .bin; every document is empty
            self._dataset, self.lengths = None, np.zeros(info.documents, dtype=np.int32)

    def __len__(self) -> int:
        return self.info.documents

    def identity(self) -> dict:
        """What a chunk index built from this corpus depends on: where it is, what its JSON says, and
        each file's size and modification time (a corpus written again is another corpus)."""
        files = {}
        for path in _all_files(self.prefix):
            if path.exists():
                stat = path.stat()
                files[path.name] = [stat.st_size, stat.st_mtime_ns]
        return {"prefix": str(self.prefix.resolve()), "info": asdict(self.info), "files": files}

    def checked_lengths(self, block: int = CHECK_BLOCK) -> Iterator[np.ndarray]:
        """Every document's length, ``block`` documents at a time, after checking the index and the
        response spans: run once per chunk index built, in memory of the order of a block."""
        yield from _index_length_blocks(self.prefix, self.info, self._layout, block)
        if self.spans is not None:
            last, path = 0, spans_file(self.prefix)
            for first in range(0, self.spans.shape[1], block):
                last = _check_span_block(path, np.array(self.spans[:, first:first + block]), last, self.lengths)

    def tokens(self, document: int, offset: int, count: int) -> np.ndarray:
        """``count`` token ids of ``document`` from ``offset`` (a view of the memory map)."""
        if count == 0 or self._dataset is None:
            return np.zeros(0, dtype=np.int64)
        ids = self._dataset.get(document, offset, count)
        if int(ids.max()) > self.info.max_token_id or int(ids.min()) < 0:
            raise DataError(f"{self.bin_path}: token ids {int(ids.min())}..{int(ids.max())} in document {document}, "
                            f"but its JSON says the highest is {self.info.max_token_id}; {AGAIN}")
        return ids

    def response_spans(self, document: int) -> np.ndarray:
        """[2, k] the [start, end) response spans of ``document``."""
        documents = self.spans[0]
        first, last = np.searchsorted(documents, [document, document + 1])
        return np.asarray(self.spans[1:, first:last])
