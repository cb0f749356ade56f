"""Packing documents into fixed-length chunks, as the reference does (``pack_to_fixed_chunks``).

All documents' tokens form one stream with a single EOS *between* documents (none after the last);
the EOS belongs to the document before it. The stream is cut into chunks of P tokens and only the
last chunk is padded. One chunk is one training example; attention crosses document boundaries
unless document masking is asked for (``doc_ids`` makes that possible).

Optionally packing also marks the response tokens (``response_mask``), which the response-only
validation CE (the reference's ``answer_ce_loss``) is computed on. A document's response is its
last segment when it has two or more (prompt/response pairs, translation pairs; see
``sources.Document.segments``), given as the index where it starts; a conversation's response is
its assistant turns, given as token spans (``response_spans``), since the template's text follows
and separates them; a code file has none. EOS and padding are never response tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from ebft_megatron.data.sources import DataError


@dataclass
class PackedChunks:
    tokens: torch.Tensor  # int64 [N, P]
    lengths: torch.Tensor  # int64 [N]: P for every chunk but possibly the last
    doc_ids: torch.Tensor  # int64 [N, P]: document index of each token (its split's order), -1 on padding
    num_documents: int = 0
    skipped: dict = field(default_factory=dict)  # reason -> count, from SkipReport
    response_mask: Optional[torch.Tensor] = None  # bool [N, P]: response tokens, when packing was told where they start

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def chunk_len(self) -> int:
        return self.tokens.shape[1]

    def select(self, indices) -> "PackedChunks":
        """The chunks at ``indices`` (a ChunkLoader step), same layout."""
        index = torch.as_tensor(indices, dtype=torch.long)
        mask = None if self.response_mask is None else self.response_mask[index]
        return PackedChunks(self.tokens[index], self.lengths[index], self.doc_ids[index],
                            self.num_documents, dict(self.skipped), mask)


def response_start(segment_lengths: Sequence[int]) -> int:
    """Where a document's response begins, from the token counts of its segments: the last segment
    is the response when there are two or more; a one-segment document (a code file) has none, so
    its response starts at its end."""
    lengths = [int(length) for length in segment_lengths]
    return sum(lengths[:-1]) if len(lengths) >= 2 else sum(lengths)


def pack_documents(documents: Sequence[Sequence[int] | np.ndarray], eos_id: int | None, chunk_len: int,
                   pad_id: int | None = None, response_starts: Sequence[int] | None = None,
                   response_spans: Sequence[Sequence[tuple[int, int]]] | None = None) -> PackedChunks:
    """Documents' token ids -> chunks of ``chunk_len`` tokens. ``pad_id`` defaults to EOS (the
    reference pads with the pad token, else EOS; padded positions are marked by ``lengths`` and
    ``doc_ids == -1`` either way). With ``response_starts`` (per document, the index of its first
    response token; its length if it has none, see :func:`response_start`) the chunks also carry
    ``response_mask``; with ``response_spans`` (per document, [start, end) token spans) the mask is
    those spans instead, and ``response_starts`` is not needed."""
    if eos_id is None:
        raise DataError("the tokenizer has no EOS token, which packing puts between documents; use a tokenizer "
                        "whose tokenizer_config.json names an eos_token")
    if isinstance(chunk_len, bool) or not isinstance(chunk_len, int) or chunk_len < 1:
        raise DataError(f"chunk length must be a positive integer, got {chunk_len!r}")
    pad_id = eos_id if pad_id is None else pad_id
    if not documents:
        raise DataError("no documents to pack")
    doc_lengths = np.fromiter((len(doc) for doc in documents), dtype=np.int64, count=len(documents))
    # Each document but the last is followed by its EOS.
    span = doc_lengths + 1
    span[-1] -= 1
    total = int(span.sum())
    if total == 0:
        raise DataError("all documents are empty after tokenization")
    stream = np.empty(total, dtype=np.int64)
    ends = np.cumsum(span)
    starts = ends - span
    for doc, start, length in zip(documents, starts, doc_lengths):
        stream[start:start + length] = doc
    stream[ends[:-1] - 1] = eos_id
    stream_doc = np.repeat(np.arange(len(documents), dtype=np.int64), span)
    stream_response = None
    if response_spans is not None:
        stream_response = _span_stream(response_spans, doc_lengths, starts, total)
    elif response_starts is not None:
        stream_response = _response_stream(response_starts, doc_lengths, starts, stream_doc)

    num_chunks = -(-total // chunk_len)
    padded = num_chunks * chunk_len
    tokens = np.full(padded, pad_id, dtype=np.int64)
    tokens[:total] = stream
    doc_ids = np.full(padded, -1, dtype=np.int64)
    doc_ids[:total] = stream_doc
    lengths = np.full(num_chunks, chunk_len, dtype=np.int64)
    lengths[-1] = total - (num_chunks - 1) * chunk_len
    response_mask = None
    if stream_response is not None:
        response_mask = np.zeros(padded, dtype=bool)
        response_mask[:total] = stream_response
        response_mask = torch.from_numpy(response_mask.reshape(num_chunks, chunk_len))
    return PackedChunks(
        tokens=torch.from_numpy(tokens.reshape(num_chunks, chunk_len)),
        lengths=torch.from_numpy(lengths),
        doc_ids=torch.from_numpy(doc_ids.reshape(num_chunks, chunk_len)),
        num_documents=len(documents),
        response_mask=response_mask,
    )


def pack_aligned(documents: Sequence[Sequence[int] | np.ndarray], eos_id: int | None, chunk_len: int,
                 response_starts: Sequence[int], response_anchor: int,
                 response_spans: Sequence[Sequence[tuple[int, int]]] | None = None) -> PackedChunks:
    """One chunk per document, cut from the same stream as :func:`pack_documents` so that the
    document's response starts at index ``response_anchor`` of its chunk: its prompt just before,
    the end of earlier documents before that, and after the response its EOS and the next
    documents. The stream wraps around, so the first documents' chunks begin with the end of the
    last ones and every chunk is ``chunk_len`` real tokens.

    Prompt-completion training (a verifiable reward on whole completions) puts its single rollout
    anchor at ``response_anchor``; SFT and EBFT can train on the very same chunks. With
    ``response_spans`` (conversations) the mask is those spans; the anchor is still
    ``response_starts`` (the start of the last assistant turn)."""
    if not 0 < response_anchor < chunk_len:
        raise DataError(f"response anchor {response_anchor} must be inside the chunk (1..{chunk_len - 1})")
    packed = pack_documents(documents, eos_id, chunk_len, response_starts=response_starts,
                            response_spans=response_spans)
    lengths = np.fromiter((len(doc) for doc in documents), dtype=np.int64, count=len(documents))
    span = lengths + 1
    span[-1] -= 1
    doc_starts = np.cumsum(span) - span
    total = int(span.sum())
    # the stream before padding, plus the EOS that separates its end from its start when it wraps
    stream = torch.cat([packed.tokens.reshape(-1)[:total], torch.tensor([eos_id])])
    stream_doc = torch.cat([packed.doc_ids.reshape(-1)[:total], torch.tensor([-1])])
    stream_response = torch.cat([packed.response_mask.reshape(-1)[:total], torch.tensor([False])])
    first = doc_starts + np.asarray(response_starts, dtype=np.int64) - response_anchor
    index = torch.from_numpy((first[:, None] + np.arange(chunk_len)[None, :]) % (total + 1))
    return PackedChunks(tokens=stream[index], lengths=torch.full((len(documents),), chunk_len, dtype=torch.long),
                        doc_ids=stream_doc[index], num_documents=len(documents), response_mask=stream_response[index])


def _response_stream(response_starts: Sequence[int], doc_lengths: np.ndarray, starts: np.ndarray,
                     stream_doc: np.ndarray) -> np.ndarray:
    """[stream length] bool: a token is a response token when its offset in its document is at or
    after the document's response start and before its end (which excludes the EOS after it)."""
    first = np.asarray(response_starts, dtype=np.int64).reshape(-1)
    if len(first) != len(doc_lengths):
        raise DataError(f"response_starts has {len(first)} entries for {len(doc_lengths)} documents")
    bad = np.flatnonzero((first < 0) | (first > doc_lengths))
    if len(bad):
        i = int(bad[0])
        raise DataError(f"document {i}: response start {int(first[i])} is outside 0..{int(doc_lengths[i])} "
                        "(its token count)")
    offset = np.arange(len(stream_doc), dtype=np.int64) - starts[stream_doc]
    return (offset >= first[stream_doc]) & (offset < doc_lengths[stream_doc])


def _span_stream(response_spans: Sequence[Sequence[tuple[int, int]]], doc_lengths: np.ndarray, starts: np.ndarray,
                 total: int) -> np.ndarray:
    """[stream length] bool: True inside any of a document's [start, end) token spans, which lie
    within the document (so never on the EOS after it)."""
    if len(response_spans) != len(doc_lengths):
        raise DataError(f"response_spans has {len(response_spans)} entries for {len(doc_lengths)} documents")
    doc, first, end = [], [], []
    for i, spans in enumerate(response_spans):
        for a, b in spans:
            if not 0 <= a <= b <= doc_lengths[i]:
                raise DataError(f"document {i}: response span {a}..{b} is outside 0..{int(doc_lengths[i])} "
                                "(its token count)")
            doc.append(i)
            first.append(a)
            end.append(b)
    # +1 where a span begins, -1 where it ends: a token is inside a span while the running sum is positive
    change = np.zeros(total + 1, dtype=np.int64)
    at = starts[np.asarray(doc, dtype=np.int64)]
    np.add.at(change, at + np.asarray(first, dtype=np.int64), 1)
    np.add.at(change, at + np.asarray(end, dtype=np.int64), -1)
    return np.cumsum(change[:total]) > 0


def check_tokenizer_matches(tokenizer, model_vocab_size: int, where: str) -> None:
    """Every id the tokenizer can produce must be a row of the model's (unpadded) vocabulary;
    otherwise the embedding lookup would fail or, worse, read the padded rows."""
    path = getattr(tokenizer, "path", "?")
    if tokenizer.vocab_size > model_vocab_size:
        raise DataError(
            f"{where}: the tokenizer {path} has {tokenizer.vocab_size} tokens but the model's vocabulary has "
            f"{model_vocab_size}; its ids would be out of range. Use the tokenizer saved with the model")
    eos_id = getattr(tokenizer, "eos_id", None)
    if eos_id is not None and not 0 <= eos_id < model_vocab_size:
        raise DataError(f"{where}: the tokenizer {path} has EOS id {eos_id}, outside the model's vocabulary of "
                        f"{model_vocab_size} tokens. Use the tokenizer saved with the model")


def check_token_range(max_token_id: int, vocab_size: int, where: str) -> None:
    """For token ids read back from disk (an indexed dataset)."""
    if max_token_id >= vocab_size:
        raise DataError(f"{where}: holds token id {max_token_id}, outside a vocabulary of {vocab_size} tokens; "
                        "it was tokenized with another tokenizer. Prepare it again with this one")
