"""Packing documents into fixed-length chunks, as the reference does (``pack_to_fixed_chunks``).

All documents' tokens form one stream with a single EOS *between* documents (none after the last);
the EOS belongs to the document before it. The stream is cut into chunks of P tokens and only the
last chunk is padded. One chunk is one training example; attention crosses document boundaries
unless document masking is asked for (``doc_ids`` makes that possible).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

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

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def chunk_len(self) -> int:
        return self.tokens.shape[1]

    def select(self, indices) -> "PackedChunks":
        """The chunks at ``indices`` (a ChunkLoader step), same layout."""
        index = torch.as_tensor(indices, dtype=torch.long)
        return PackedChunks(self.tokens[index], self.lengths[index], self.doc_ids[index],
                            self.num_documents, dict(self.skipped))


def pack_documents(documents: Sequence[Sequence[int] | np.ndarray], eos_id: int | None, chunk_len: int,
                   pad_id: int | None = None) -> PackedChunks:
    """Documents' token ids -> chunks of ``chunk_len`` tokens. ``pad_id`` defaults to EOS (the
    reference pads with the pad token, else EOS; padded positions are marked by ``lengths`` and
    ``doc_ids == -1`` either way)."""
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

    num_chunks = -(-total // chunk_len)
    padded = num_chunks * chunk_len
    tokens = np.full(padded, pad_id, dtype=np.int64)
    tokens[:total] = stream
    doc_ids = np.full(padded, -1, dtype=np.int64)
    doc_ids[:total] = stream_doc
    lengths = np.full(num_chunks, chunk_len, dtype=np.int64)
    lengths[-1] = total - (num_chunks - 1) * chunk_len
    return PackedChunks(
        tokens=torch.from_numpy(tokens.reshape(num_chunks, chunk_len)),
        lengths=torch.from_numpy(lengths),
        doc_ids=torch.from_numpy(doc_ids.reshape(num_chunks, chunk_len)),
        num_documents=len(documents),
    )


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
