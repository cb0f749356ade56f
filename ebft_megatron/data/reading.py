"""Reading and tokenizing documents: from a data setting's files to token ids, in input order.

``open_documents`` reads the raw documents of a kind (code files, JSONL/Parquet pairs, chat
conversations, translation pairs); ``tokenized_documents`` tokenizes them in batches (optionally in
worker processes) and shows progress. Packing them into chunks is ``dataset``'s.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np

from ebft_megatron.data.chat import load_chat_template
from ebft_megatron.data.config import DataConfig
from ebft_megatron.data.packing import response_start
from ebft_megatron.data.sources import (
    DataError, Document, SkipReport, count_records, list_code_files, read_chat, read_code_folder, read_jsonl_pairs,
    read_translation_pairs, split_hash,
)

ENCODE_BATCH_DOCUMENTS = 64  # enough texts per call for the fast tokenizer to amortize its overhead


@dataclass
class DocumentSource:
    documents: Iterator[Document]
    total_units: int  # files (code) or lines/rows (jsonl, chat, translation): what the progress line counts
    unit: str


def open_documents(config: DataConfig, path, report: SkipReport, count_units: bool = False,
                   tokenizer=None) -> DocumentSource:
    """The documents at ``path`` (config.path or config.eval_path) for a raw ``config.kind``;
    kind=chat renders with the chat template of ``tokenizer``'s folder."""
    if config.kind == "code":
        units = len(list_code_files(path, config.extensions, config.resolved_exclude_dirs())) if count_units else 0
        documents = read_code_folder(path, config.extensions, config.resolved_exclude_dirs(), config.skip_bad, report)
        return DocumentSource(documents, units, "files")
    if config.kind in ("jsonl", "chat"):
        if config.kind == "jsonl":
            documents = read_jsonl_pairs(path, config.prompt_key, config.response_key, config.skip_bad, report)
        else:
            documents = read_chat(path, chat_template_of(tokenizer), config.chat_train_on, config.skip_bad, report)
        return DocumentSource(documents, count_records(path) if count_units else 0, "records")
    if config.kind == "translation":
        documents = read_translation_pairs(path, config.translation_format(), config.skip_bad, report)
    else:
        raise DataError(f"data.kind={config.kind} has no raw documents; it is read with read_indexed")
    return DocumentSource(documents, _count_lines(path) if count_units else 0, "lines")


def chat_template_of(tokenizer):
    """The chat template in the folder ``tokenizer`` was loaded from."""
    folder = getattr(tokenizer, "folder", None)
    if folder is None:
        path = getattr(tokenizer, "path", None)
        if path is None:
            raise DataError("data.kind=chat needs the tokenizer's folder, where its chat template is")
        folder = Path(path) if Path(path).is_dir() else Path(path).parent
    return load_chat_template(folder)


def _count_lines(path) -> int:
    try:
        with open(path, "rb") as handle:
            return sum(block.count(b"\n") for block in iter(lambda: handle.read(1 << 20), b""))
    except OSError:
        return 0  # the reader reports the problem itself


def batch_encoder(tokenizer) -> Callable[[list[str]], list[list[int]]]:
    """The tokenizer's ``encode_batch`` (many texts per call), or ``encode`` text by text for a
    tokenizer without one."""
    encode_batch = getattr(tokenizer, "encode_batch", None)
    if callable(encode_batch):
        return encode_batch
    return lambda texts: [tokenizer.encode(text) for text in texts]


OffsetEncoder = Callable[[list[str]], list[tuple[list[int], list[tuple[int, int]]]]]


def offset_encoder(tokenizer) -> Optional[OffsetEncoder]:
    """The tokenizer's ``encode_batch_with_offsets`` (ids and each token's character span), if it has one."""
    encode = getattr(tokenizer, "encode_batch_with_offsets", None)
    return encode if callable(encode) else None


Encoded = tuple[np.ndarray, int, Optional[tuple[tuple[int, int], ...]]]


def encode_documents(documents: list[Document], encode: Callable[[list[str]], list[list[int]]],
                     encode_offsets: Optional[OffsetEncoder] = None) -> list[Encoded]:
    """Each document's segments are encoded separately and their ids concatenated (the reference
    tokenizes question and answer apart: tokens(q) + tokens(a), not tokens(q + a)); with each, the
    index where its response (last segment) begins, for response-only metrics. A conversation
    (``response_chars``) is encoded whole, as the model reads it, and also gets the token spans of
    its response, whose last one starts at its response start."""
    plain = [document for document in documents if document.response_chars is None]
    chats = [document for document in documents if document.response_chars is not None]
    encoded = iter(encode([segment for document in plain for segment in document.segments]) if plain else ())
    encoded_chats = iter(_encode_conversations(chats, encode, encode_offsets) if chats else ())
    out = []
    for document in documents:
        if document.response_chars is not None:
            out.append(next(encoded_chats))
            continue
        parts = [next(encoded) for _ in document.segments]
        ids = np.concatenate([np.asarray(part, dtype=np.int64) for part in parts])
        out.append((ids, response_start([len(part) for part in parts]), None))
    return out


def _encode_conversations(documents: list[Document], encode, encode_offsets: Optional[OffsetEncoder]) -> list[Encoded]:
    if encode_offsets is not None:
        out = []
        for document, (ids, offsets) in zip(documents, encode_offsets([d.segments[0] for d in documents])):
            spans = token_spans(offsets, document.response_chars)
            out.append((np.asarray(ids, dtype=np.int64), spans[-1][0] if spans else len(ids), spans))
        return out
    # A tokenizer that cannot say where its tokens come from: encode the text in pieces cut at the
    # response boundaries, so that each token lies on one side of them (a token across a boundary,
    # rare after a template's newline or special token, comes out split in two).
    pieces, layout = [], []
    for document in documents:
        text = document.segments[0]
        cuts = sorted({0, len(text), *(c for span in document.response_chars for c in span)})
        parts = [text[a:b] for a, b in zip(cuts, cuts[1:])]
        layout.append((cuts, len(parts)))
        pieces.extend(parts)
    encoded = iter(encode(pieces))
    out = []
    for document, (cuts, count) in zip(documents, layout):
        parts = [np.asarray(next(encoded), dtype=np.int64) for _ in range(count)]
        token_at = dict(zip(cuts, np.concatenate([[0], np.cumsum([len(part) for part in parts])]).tolist()))
        spans = tuple((token_at[a], token_at[b]) for a, b in document.response_chars if token_at[a] < token_at[b])
        ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        out.append((ids, spans[-1][0] if spans else len(ids), spans))
    return out


def token_spans(offsets, char_spans) -> tuple[tuple[int, int], ...]:
    """Token index spans of character spans: every token whose characters overlap the span (as
    transformers builds its assistant mask), so a token straddling a boundary counts as response.
    Tokens come in text order, so the overlapping ones are consecutive."""
    if not len(offsets):
        return ()
    bounds = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    spans = []
    for a, b in char_spans:
        inside = np.flatnonzero((bounds[:, 0] < b) & (bounds[:, 1] > a))
        if len(inside):
            spans.append((int(inside[0]), int(inside[-1]) + 1))
    return tuple(spans)


# Worker processes (prepare_data --workers): the encoders are inherited through fork.
_WORKER_ENCODE = None


def _worker_init(encode, encode_offsets=None) -> None:
    global _WORKER_ENCODE
    _WORKER_ENCODE = (encode, encode_offsets)


def _worker_encode(documents: list[Document]) -> list[Encoded]:
    return encode_documents(documents, *_WORKER_ENCODE)


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
    # A conversation's response as [start, end) token spans (the assistant turns trained on; the
    # last starts at response_start); None: the response runs from response_start to the end.
    response_spans: Optional[tuple[tuple[int, int], ...]] = None

    def spans(self) -> tuple[tuple[int, int], ...]:
        """The response as token spans either way: what an indexed corpus keeps of it. The last
        span's start is the response start (the document's length when there is no response)."""
        if self.response_spans is not None:
            return self.response_spans
        end = len(self.token_ids)
        return ((self.response_start, end),) if self.response_start < end else ()


def tokenized_documents(source: DocumentSource, tokenizer, report: SkipReport, *,
                        keep: Callable[[int], bool] | None = None, max_documents: int | None = None,
                        workers: int = 1, progress: Progress | None = None) -> Iterator[TokenizedDocument]:
    """Documents in input order, the first ``max_documents`` of them, those with ``keep(hash)``."""
    encode, encode_offsets = batch_encoder(tokenizer), offset_encoder(tokenizer)

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
            for (ids, start, spans), key_hash in zip(encode_documents(batch, encode, encode_offsets), hashes):
                yield TokenizedDocument(ids, key_hash, start, spans)
        return
    import multiprocessing

    # Batches are read and checked here, encoded in the workers; imap keeps the input order, so the
    # output does not depend on the number of workers.
    pending_hashes: list[list[int]] = []

    def feed() -> Iterator[list[Document]]:
        for batch, hashes in batches():
            pending_hashes.append(hashes)
            yield batch

    with multiprocessing.get_context("fork").Pool(workers, initializer=_worker_init,
                                                  initargs=(encode, encode_offsets)) as pool:
        for encoded in pool.imap(_worker_encode, feed()):
            for (ids, start, spans), key_hash in zip(encoded, pending_hashes.pop(0)):
                yield TokenizedDocument(ids, key_hash, start, spans)


