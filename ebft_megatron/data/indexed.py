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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ebft_megatron.data.sources import DataError

FORMAT = "ebft_megatron.indexed/1"
SUFFIXES = (".bin", ".idx", ".keys.npy", ".json")  # in commit order: the JSON marks completion


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
        info = IndexedCorpusInfo(**raw)
    except (ValueError, TypeError) as err:
        raise DataError(f"{meta_path}: not an ebft_megatron corpus description ({err})") from None
    if info.format != FORMAT:
        raise DataError(f"{meta_path}: format {info.format!r}, this version reads {FORMAT!r}; prepare it again")
    for path in (bin_path, idx_path, keys_path):
        if not path.is_file():
            raise DataError(f"{path}: missing from the indexed corpus {prefix}; prepare it again")
    return info


def read_indexed(prefix: str | Path) -> IndexedCorpus:
    info = read_info(prefix)
    _, _, keys_path, _ = corpus_files(prefix)
    dataset = _megatron_indexed().IndexedDataset(str(prefix), mmap=True)
    count = len(dataset)
    # One sequence per document: megatron's document index must then be 0, 1, ..., count.
    if count != info.documents or not np.array_equal(dataset.document_indices, np.arange(count + 1)):
        raise DataError(f"{prefix}: {count} sequences in the index but {info.documents} documents in its JSON; "
                        "the files do not belong together. Prepare it again")
    # Copy out of the memory map so the arrays outlive the dataset object.
    documents = [np.array(seq, dtype=np.int64) for seq in dataset[0:count]]
    del dataset
    key_hashes = np.load(keys_path)
    if key_hashes.shape != (count,):
        raise DataError(f"{keys_path}: {key_hashes.shape[0]} entries for {count} documents; prepare it again")
    return IndexedCorpus(documents, key_hashes, info)
