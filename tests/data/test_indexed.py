"""megatron indexed corpora: the round trip packs exactly as the raw input; writes are all or nothing."""

import json

import numpy as np
import pytest

from ebft_megatron.data.config import DataConfig
from ebft_megatron.data.dataset import load_chunks
from ebft_megatron.data.reading import open_documents, tokenized_documents
from ebft_megatron.data.indexed import IndexedCorpusInfo, IndexedCorpusWriter, corpus_files, read_indexed
from ebft_megatron.data.sources import DataError, SkipReport
from tests.data.helpers import write_code_tree


def prepare(config, tokenizer, prefix, workers=1):
    report = SkipReport()
    info = IndexedCorpusInfo(tokenizer=str(tokenizer.path), vocab_size=tokenizer.vocab_size, eos_id=tokenizer.eos_id)
    with IndexedCorpusWriter(prefix, info) as out:
        source = open_documents(config, config.resolved_path(), report)
        for doc in tokenized_documents(source, tokenizer, report, workers=workers):
            out.add(doc.token_ids, doc.key_hash)
    return info


def same_chunks(a, b):
    return a.tokens.equal(b.tokens) and a.lengths.equal(b.lengths) and a.doc_ids.equal(b.doc_ids)


def test_round_trip_equals_raw_packing(tmp_path, tokenizer):
    root = tmp_path / "tree"
    write_code_tree(root, 30)
    (root / "empty.py").write_text("")
    raw = DataConfig(kind="code", path=str(root), validation_fraction=0.25)
    info = prepare(raw, tokenizer, tmp_path / "corpus")
    assert info.documents == 30

    corpus = read_indexed(tmp_path / "corpus")
    source = open_documents(raw, root, SkipReport())
    expected = [doc.token_ids for doc in tokenized_documents(source, tokenizer, SkipReport())]
    assert len(corpus.documents) == 30
    assert all(np.array_equal(a, b) for a, b in zip(corpus.documents, expected))
    assert corpus.info.tokens == sum(len(ids) for ids in expected)
    meta = json.loads((tmp_path / "corpus.json").read_text())
    assert meta["vocab_size"] == 300 and meta["eos_id"] == tokenizer.eos_id and meta["documents"] == 30

    indexed = DataConfig(kind="indexed", path=str(tmp_path / "corpus"), validation_fraction=0.25)
    for split in ("train", "validation"):
        assert same_chunks(load_chunks(indexed, tokenizer, 24, split=split), load_chunks(raw, tokenizer, 24, split=split))
    capped_raw = DataConfig(kind="code", path=str(root), validation_fraction=0.25, max_documents=11)
    capped = DataConfig(kind="indexed", path=str(tmp_path / "corpus"), validation_fraction=0.25, max_documents=11)
    assert same_chunks(load_chunks(capped, tokenizer, 24), load_chunks(capped_raw, tokenizer, 24))


def test_workers_do_not_change_the_output(tmp_path, tokenizer):
    root = tmp_path / "tree"
    write_code_tree(root, 150)  # several encode batches
    config = DataConfig(kind="code", path=str(root))
    prepare(config, tokenizer, tmp_path / "one")
    prepare(config, tokenizer, tmp_path / "two", workers=2)
    for one, two in zip(corpus_files(tmp_path / "one"), corpus_files(tmp_path / "two")):
        if one.suffix != ".json":
            assert one.read_bytes() == two.read_bytes()


def test_failed_write_leaves_nothing(tmp_path, tokenizer):
    info = IndexedCorpusInfo(tokenizer="t", vocab_size=300, eos_id=0)
    with pytest.raises(RuntimeError):
        with IndexedCorpusWriter(tmp_path / "corpus", info) as out:
            out.add(np.array([1, 2, 3]), 5)
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(DataError, match="token id 300 does not fit the vocabulary of 300"):
        with IndexedCorpusWriter(tmp_path / "corpus", IndexedCorpusInfo("t", 300, 0)) as out:
            out.add(np.array([1, 300]), 5)
    with pytest.raises(DataError, match="corpus: no documents to write"):
        with IndexedCorpusWriter(tmp_path / "corpus", IndexedCorpusInfo("t", 300, 0)):
            pass
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_never_overwritten(tmp_path):
    (tmp_path / "corpus.idx").write_text("old")
    with pytest.raises(DataError, match=r"corpus.idx already exists; choose another output prefix or delete"):
        IndexedCorpusWriter(tmp_path / "corpus", IndexedCorpusInfo("t", 300, 0))
    assert (tmp_path / "corpus.idx").read_text() == "old"
    with pytest.raises(DataError, match="missing: output folder does not exist"):
        IndexedCorpusWriter(tmp_path / "missing" / "corpus", IndexedCorpusInfo("t", 300, 0))


def test_reading_incomplete_or_foreign_corpora(tmp_path, tokenizer, tokenizer_dir):
    with pytest.raises(DataError, match="no indexed corpus here .* write one with tools/prepare_data.py"):
        read_indexed(tmp_path / "nothing")
    root = tmp_path / "tree"
    write_code_tree(root, 4)
    prepare(DataConfig(kind="code", path=str(root)), tokenizer, tmp_path / "corpus")

    # A run with another tokenizer must not read these ids.
    other = DataConfig(kind="indexed", path=str(tmp_path / "corpus"))

    class Other:
        path, vocab_size, eos_id = "/other/tok", 512, 0

    with pytest.raises(DataError, match=r"corpus: tokenized with .* \(vocabulary 300, EOS 0\) but the tokenizer here "
                                        r"is /other/tok \(vocabulary 512, EOS 0\)"):
        load_chunks(other, Other(), 16)

    (tmp_path / "corpus.json").unlink()
    with pytest.raises(DataError, match=r"incomplete indexed corpus \(corpus.json is missing"):
        read_indexed(tmp_path / "corpus")
