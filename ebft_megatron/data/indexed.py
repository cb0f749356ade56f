"""Pre-tokenized corpora in megatron-core's indexed dataset format (``PREFIX.bin`` + ``PREFIX.idx``).

One sequence per document: its token ids, without EOS (packing adds those), so packing from an
indexed corpus gives exactly what packing from the raw files gives. Two small files go with it:
``PREFIX.keys.npy`` (each document's split hash, so the held-out split is the same as from raw
input) and ``PREFIX.json`` (tokenizer, vocabulary size, counts). The JSON is written last: a
prefix without it is incomplete. Everything is written under temporary names and renamed at the
end, so an interrupted or failed run leaves nothing that looks like a corpus.
"""

from __future__ import annotations

import json
import os
import struct
import tokenize
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from ebft_megatron.data.sources import DataError

FORMAT = "ebft_megatron.indexed/1"
SUFFIXES = (".bin", ".idx", ".keys.npy", ".json")  # in commit order: the JSON marks completion
# megatron's .idx header: magic, version 1, token dtype code, sequence count, document count
INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_HEADER = struct.Struct("<9sQBQQ")
AGAIN = "the files are damaged or do not belong together; prepare it again"


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


def corpus_files(prefix: str | Path) -> list[Path]:
    return [Path(f"{prefix}{suffix}") for suffix in SUFFIXES]


def _megatron_indexed():
    from ebft_megatron.cli import quiet_imports

    quiet_imports()  # megatron.core's import-time notices about apex / TE
    from megatron.core.datasets import indexed_dataset

    return indexed_dataset


class IndexedCorpusWriter:
    """``with IndexedCorpusWriter(prefix, info) as out: out.add(ids, key_hash)``; the files appear
    under their real names only when the block ends without an error."""

    def __init__(self, prefix: str | Path, info: IndexedCorpusInfo):
        self.prefix = Path(prefix)
        existing = [str(path) for path in corpus_files(self.prefix) if path.exists()]
        if existing:
            raise DataError(f"{existing[0]} already exists; choose another output prefix or delete "
                            f"{', '.join(existing)}")
        if not self.prefix.parent.is_dir():
            raise DataError(f"{self.prefix.parent}: output folder does not exist; create it first")
        self.info = info
        self._temp_prefix = self.prefix.with_name(f"{self.prefix.name}.partial-{os.getpid()}")
        self._key_hashes: list[int] = []
        self._builder = None

    def __enter__(self) -> "IndexedCorpusWriter":
        return self

    def _open_builder(self):
        # Opened at the first document: importing megatron.core takes seconds, and bad input found
        # while reading should not wait for it.
        indexed_dataset = _megatron_indexed()
        dtype = indexed_dataset.DType.optimal_dtype(self.info.vocab_size)
        return indexed_dataset.IndexedDatasetBuilder(f"{self._temp_prefix}.bin", dtype=dtype)

    def add(self, token_ids, key_hash: int) -> None:
        ids = np.asarray(token_ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.info.vocab_size):
            raise DataError(f"token id {int(ids.max())} does not fit the vocabulary of {self.info.vocab_size}")
        if self._builder is None:
            self._builder = self._open_builder()
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
            for path in corpus_files(self._temp_prefix):  # nothing half-written stays behind
                path.unlink(missing_ok=True)

    def _commit(self) -> None:
        if self.info.documents == 0:
            raise DataError(f"{self.prefix}: no documents to write")
        temp = corpus_files(self._temp_prefix)
        self._builder.finalize(str(temp[1]))
        np.save(temp[2], np.asarray(self._key_hashes, dtype=np.uint64))
        temp[3].write_text(json.dumps(asdict(self.info), indent=2) + "\n")
        renamed = []
        try:
            for source, target in zip(temp, corpus_files(self.prefix)):
                os.replace(source, target)
                renamed.append(target)
        except BaseException:
            for target in renamed:  # all four files or none
                target.unlink(missing_ok=True)
            raise


@dataclass
class IndexedCorpus:
    documents: list[np.ndarray]  # int64 token ids per document, in input order
    key_hashes: np.ndarray  # uint64 per document, for the held-out split
    info: IndexedCorpusInfo


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
    declared = fields(IndexedCorpusInfo)
    unknown = sorted(set(raw) - {f.name for f in declared})
    missing = [f.name for f in declared if f.name not in raw and f.default is MISSING and f.default_factory is MISSING]
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
    if not all(isinstance(count, int) and not isinstance(count, bool) for count in info.skipped.values()):
        raise DataError(f"{meta_path}: skipped must map reasons to counts, got {info.skipped!r}; prepare it again")
    for path in (bin_path, idx_path, keys_path):
        if not path.is_file():
            raise DataError(f"{path}: missing from the indexed corpus {prefix}; prepare it again")
    return info


def _check_index(prefix: str | Path, info: IndexedCorpusInfo) -> np.ndarray:
    """The sequence lengths in ``PREFIX.idx``, once the index agrees with itself, the ``.bin`` and the
    JSON. megatron's reader trusts its index: a bad header is an assert, a short file a numpy error,
    a wrong length or offset silently reads another document's tokens."""
    bin_path, idx_path, _, _ = corpus_files(prefix)
    data = idx_path.read_bytes()
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
    if len(data) != INDEX_HEADER.size + 12 * sequences + 8 * documents:
        raise DataError(f"{idx_path}: {len(data)} bytes, not the size of an index of {sequences} sequences; {AGAIN}")
    offset = INDEX_HEADER.size
    lengths = np.frombuffer(data, np.int32, sequences, offset).astype(np.int64)
    pointers = np.frombuffer(data, np.int64, sequences, offset + 4 * sequences)
    document_index = np.frombuffer(data, np.int64, documents, offset + 12 * sequences)
    itemsize = np.dtype(dtype).itemsize
    ends = np.cumsum(lengths) * itemsize
    if ((lengths < 0).any() or not np.array_equal(pointers, ends - lengths * itemsize)
            or not np.array_equal(document_index, np.arange(documents))):
        raise DataError(f"{idx_path}: the sequence lengths, offsets and document index do not fit together; {AGAIN}")
    total = int(lengths.sum())
    if total != info.tokens:
        raise DataError(f"{idx_path}: {total} tokens in the index but {info.tokens} in its JSON; {AGAIN}")
    if bin_path.stat().st_size != total * itemsize:
        raise DataError(f"{bin_path}: {bin_path.stat().st_size} bytes, the index describes {total * itemsize}; "
                        f"{AGAIN}")
    return lengths


def _read_key_hashes(keys_path: Path, count: int) -> np.ndarray:
    try:
        with open(keys_path, "rb") as handle:  # .npy only: np.load would also open zip archives and pickles
            key_hashes = np.lib.format.read_array(handle, allow_pickle=False)
    # besides its own ValueErrors, numpy's header parser lets SyntaxError and tokenize's errors through
    except (ValueError, OSError, EOFError, SyntaxError, tokenize.TokenError) as err:
        problem = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DataError(f"{keys_path}: not a NumPy array file ({problem}); prepare it again") from None
    if key_hashes.dtype != np.uint64 or key_hashes.ndim != 1:
        raise DataError(f"{keys_path}: a {key_hashes.dtype} array of shape {key_hashes.shape}, expected {count} "
                        "uint64 split hashes; prepare it again")
    if key_hashes.shape != (count,):
        raise DataError(f"{keys_path}: {key_hashes.shape[0]} entries for {count} documents; prepare it again")
    return key_hashes


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
    key_hashes = _read_key_hashes(keys_path, count)
    return IndexedCorpus(documents, key_hashes, info)
