"""Packing's response mask: True on response tokens of prompt/response documents, never on code
files, EOS or padding; and packing without it is unchanged."""

import pytest

from ebft_megatron.data.packing import pack_documents, response_start
from ebft_megatron.data.sources import DataError

EOS, PAD = 0, 99


def test_response_start_from_segments():
    assert response_start([3, 4]) == 3  # prompt 3 tokens, response 4
    assert response_start([2, 3, 4]) == 5  # the last segment is the response
    assert response_start([6]) == 6  # a code file: no response


def test_mask_marks_response_tokens_across_chunks():
    documents = [[11, 12, 13, 14], [21, 22], [31, 32, 33]]
    # doc 0: prompt 11 12, response 13 14; doc 1: a code file; doc 2: prompt 31, response 32 33
    packed = pack_documents(documents, EOS, chunk_len=4, pad_id=PAD, response_starts=[2, 2, 1])
    assert packed.tokens.tolist() == [[11, 12, 13, 14], [EOS, 21, 22, EOS], [31, 32, 33, PAD]]
    assert packed.response_mask.tolist() == [
        [False, False, True, True],
        [False, False, False, False],  # EOS, code, code, EOS
        [False, True, True, False],  # padding is never a response token
    ]
    assert packed.select([2, 0]).response_mask.tolist() == [packed.response_mask[2].tolist(),
                                                           packed.response_mask[0].tolist()]


def test_without_response_starts_nothing_changes():
    documents = [[11, 12, 13], [14, 15], [16]]
    plain = pack_documents(documents, EOS, chunk_len=3, pad_id=PAD)
    masked = pack_documents(documents, EOS, chunk_len=3, pad_id=PAD, response_starts=[0, 0, 0])
    assert plain.response_mask is None and plain.select([0]).response_mask is None
    for name in ("tokens", "lengths", "doc_ids"):
        assert getattr(plain, name).tolist() == getattr(masked, name).tolist()
    assert masked.response_mask.tolist() == [[True, True, True], [False, True, True], [False, True, False]]


def test_bad_response_starts():
    with pytest.raises(DataError, match="2 entries for 3 documents"):
        pack_documents([[1], [2], [3]], EOS, 4, response_starts=[0, 0])
    with pytest.raises(DataError, match="document 1: response start 3 is outside 0..2"):
        pack_documents([[1], [2, 3]], EOS, 4, response_starts=[0, 3])
