"""Packing as the reference: one EOS between documents, fixed chunks, only the last one padded."""

import pytest
import torch

from ebft_megatron.data.sources import python_stdlib_dir
from ebft_megatron.data.config import DataConfig
from ebft_megatron.data.dataset import load_chunks
from ebft_megatron.data.reading import batch_encoder
from ebft_megatron.data.packing import check_tokenizer_matches, pack_documents
from ebft_megatron.data.sources import DataError
from tests.data.helpers import jsonl_line, write_lines

EOS = 0


def test_eos_between_documents_and_exact_chunks():
    packed = pack_documents([[11, 12, 13], [14, 15], [16]], eos_id=EOS, chunk_len=4)
    # stream: 11 12 13 EOS 14 15 EOS 16 -> two full chunks, no padding, no EOS after the last document
    assert packed.tokens.tolist() == [[11, 12, 13, EOS], [14, 15, EOS, 16]]
    assert packed.lengths.tolist() == [4, 4]
    assert packed.doc_ids.tolist() == [[0, 0, 0, 0], [1, 1, 1, 2]]  # an EOS belongs to the document before it
    assert packed.tokens.dtype == torch.long and packed.doc_ids.dtype == torch.long
    assert packed.num_documents == 3 and len(packed) == 2 and packed.chunk_len == 4


def test_only_last_chunk_is_padded():
    packed = pack_documents([[11, 12, 13], [14, 15], [16]], eos_id=EOS, chunk_len=3, pad_id=99)
    assert packed.tokens.tolist() == [[11, 12, 13], [EOS, 14, 15], [EOS, 16, 99]]
    assert packed.lengths.tolist() == [3, 3, 2]
    assert packed.doc_ids.tolist() == [[0, 0, 0], [0, 1, 1], [1, 2, -1]]
    default_pad = pack_documents([[11, 12, 13], [14, 15], [16]], eos_id=EOS, chunk_len=3)
    assert default_pad.tokens[-1].tolist() == [EOS, 16, EOS]  # pad defaults to EOS, as the reference


def test_document_longer_than_several_chunks():
    packed = pack_documents([list(range(1, 11)), [20]], eos_id=EOS, chunk_len=4)
    assert packed.tokens.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, EOS, 20]]
    assert packed.doc_ids.tolist() == [[0] * 4, [0] * 4, [0, 0, 0, 1]]
    one = pack_documents([[5, 6]], eos_id=EOS, chunk_len=4)
    assert one.tokens.tolist() == [[5, 6, EOS, EOS]] and one.lengths.tolist() == [2]
    assert one.doc_ids.tolist() == [[0, 0, -1, -1]]


def test_select_keeps_layout():
    packed = pack_documents([[1, 2, 3], [4, 5], [6]], eos_id=EOS, chunk_len=3)
    picked = packed.select([2, 0])
    assert picked.tokens.tolist() == [packed.tokens[2].tolist(), packed.tokens[0].tolist()]
    assert picked.lengths.tolist() == [2, 3]


def test_packing_errors():
    with pytest.raises(DataError, match="the tokenizer has no EOS token"):
        pack_documents([[1]], eos_id=None, chunk_len=4)
    with pytest.raises(DataError, match="chunk length must be a positive integer, got 0"):
        pack_documents([[1]], eos_id=EOS, chunk_len=0)
    with pytest.raises(DataError, match="no documents to pack"):
        pack_documents([], eos_id=EOS, chunk_len=4)


def test_load_chunks_is_question_tokens_then_answer_tokens(tmp_path, tokenizer):
    pairs = [("def add(a, b):", "\n    return a + b\n"), ("class Stack:", " pass"), ("x = 1", "")]
    path = write_lines(tmp_path / "qa.jsonl", [jsonl_line(question=q, answer=a) for q, a in pairs])
    config = DataConfig(kind="jsonl", path=str(path), validation_fraction=0.0)
    packed = load_chunks(config, tokenizer, chunk_len=16)
    # tokens(q) + tokens(a), not tokens(q + a); no BOS; one EOS between documents
    expected = []
    for i, (q, a) in enumerate(pairs):
        expected += tokenizer.encode(q) + tokenizer.encode(a) + ([tokenizer.eos_id] if i < len(pairs) - 1 else [])
    flat = [t for row, n in zip(packed.tokens.tolist(), packed.lengths.tolist()) for t in row[:n]]
    assert flat == expected
    assert packed.lengths[:-1].eq(16).all() and int(packed.lengths[-1]) == len(expected) - 16 * (len(packed) - 1)
    assert packed.num_documents == 3 and packed.skipped == {}


def test_batch_encoder_matches_single_encode(tokenizer):
    texts = [(python_stdlib_dir() / "textwrap.py").read_text()[:3000], "", "  é\ttabs\n", "<|endoftext|> inside"]
    assert batch_encoder(tokenizer)(texts) == [tokenizer.encode(text) for text in texts]


class FakeTokenizer:
    def __init__(self, vocab_size, eos_id):
        self.vocab_size, self.eos_id, self.path = vocab_size, eos_id, "/tok/folder"


def test_tokenizer_must_fit_the_model_vocabulary(tokenizer, tokenizer_dir):
    check_tokenizer_matches(tokenizer, 300, "checkpoint ckpt")
    check_tokenizer_matches(tokenizer, 320, "checkpoint ckpt")  # a larger (padded) model vocabulary is fine
    with pytest.raises(DataError) as err:
        check_tokenizer_matches(tokenizer, 256, "checkpoint ckpt")
    assert str(err.value).startswith(f"checkpoint ckpt: the tokenizer {tokenizer_dir} has 300 tokens but the model's "
                                     "vocabulary has 256")
    with pytest.raises(DataError, match="EOS id 500, outside the model's vocabulary of 400 tokens"):
        check_tokenizer_matches(FakeTokenizer(300, 500), 400, "model")


def test_aligned_chunks_put_every_response_at_the_anchor():
    from ebft_megatron.data.packing import pack_aligned

    EOS = 0
    documents = [[11, 12, 13, 14], [21, 22, 23], [31, 32, 33, 34, 35]]
    starts = [2, 1, 3]  # first response token: 13, 22, 34
    packed = pack_aligned(documents, EOS, chunk_len=6, response_starts=starts, response_anchor=3)
    assert packed.tokens[:, 3].tolist() == [13, 22, 34]
    # the same stream as ordinary packing, wrapping around through one EOS
    assert packed.tokens.tolist() == [[EOS, 11, 12, 13, 14, EOS], [14, EOS, 21, 22, 23, EOS],
                                      [31, 32, 33, 34, 35, EOS]]
    assert packed.lengths.tolist() == [6, 6, 6]
    assert packed.doc_ids[:, 3].tolist() == [0, 1, 2] and packed.doc_ids[0, 0] == -1
    assert packed.response_mask.tolist() == [[False, False, False, True, True, False],
                                             [True, False, False, True, True, False],
                                             [False, False, False, True, True, False]]
    with pytest.raises(DataError, match="response anchor 6 must be inside the chunk"):
        pack_aligned(documents, EOS, 6, starts, 6)
