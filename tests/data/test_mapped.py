"""Chunks read from a memory map through a chunk index built once (``data.mapped.open_chunks``, what
training reads) are today's packing (``dataset.load_chunks``, every chunk in memory): every data
kind, both splits, with and without the response anchor, chunks shorter and longer than the
documents. The index and the tokenized copy of raw input are built once, by one process, keyed
so that a changed input or setting builds them again; a resumed chunk order reads the same
chunks; a damaged corpus is one error line."""

import errno
import importlib.util
import multiprocessing
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ebft_megatron.data import cache as data_cache
from ebft_megatron.data import mapped
from ebft_megatron.data.config import DataConfig
from ebft_megatron.data.dataset import ChunkLoader, SplitPlan, load_chunks
from ebft_megatron.data.mapped import open_chunks
from ebft_megatron.data.sources import DataError, held_out_below, is_held_out, split_hash
from ebft_megatron.data.tokenizers import Tokenizer
from tests.data.helpers import documents_of, jsonl_line, write_code_tree, write_lines
from tests.data.test_chat_and_parquet import chat_records, pair_records, write_jsonl, write_parquet

ROOT = Path(__file__).resolve().parents[2]
CHUNK_LENS = (7, 24, 300)  # shorter than most documents, about one, longer than a split
ANCHOR = 5


def prepare_tool():
    spec = importlib.util.spec_from_file_location("prepare_data_tool", ROOT / "tools" / "prepare_data.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def same(expected, packed) -> None:
    assert packed.tokens.equal(expected.tokens)
    assert packed.lengths.equal(expected.lengths)
    assert packed.doc_ids.equal(expected.doc_ids)
    assert (packed.response_mask is None) == (expected.response_mask is None)
    if expected.response_mask is not None:
        assert packed.response_mask.equal(expected.response_mask)
    assert packed.num_documents == expected.num_documents and packed.skipped == expected.skipped


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tokenizer_dir, chat_tokenizer_dirs):
    """{name: (data settings, tokenizer)}: one input of every kind, with empty documents and
    responses, bad lines skipped, and indexed corpora prepared by tools/prepare_data.py."""
    root = tmp_path_factory.mktemp("mapped_inputs")
    plain, chat = Tokenizer(tokenizer_dir), Tokenizer(chat_tokenizer_dirs["chatml"])
    tree = root / "tree"
    write_code_tree(tree, 30)
    (tree / "empty.py").write_text("")
    records = pair_records(20) + [{"question": "only a question", "answer": ""}, {"question": "", "answer": "only"}]
    pairs = write_lines(root / "qa.jsonl", [jsonl_line(**record) for record in records] + ["{broken"])
    translation = write_lines(root / "pairs.tsv", ["de\ten"] + [f"Satz {i} hier\tsentence {i} here" for i in range(25)])
    made = {
        "code": (dict(kind="code", path=str(tree)), plain),
        "jsonl": (dict(kind="jsonl", path=str(pairs), skip_bad=True), plain),
        "parquet": (dict(kind="jsonl", path=str(write_parquet(root / "qa.parquet", pair_records(20)))), plain),
        "chat": (dict(kind="chat", path=str(write_jsonl(root / "chats.jsonl", chat_records()))), chat),
        "chat_all": (dict(kind="chat", chat_train_on="all", path=str(write_parquet(root / "chats.parquet",
                                                                                     chat_records()))), chat),
        "translation": (dict(kind="translation", path=str(translation), source_key="de", target_key="en",
                             source_lang="German", target_lang="English"), plain),
    }
    tool = prepare_tool()
    for name, flags, tokenizer in (
            ("indexed_code", ["--kind", "code", "--input", str(tree)], plain),
            ("indexed_jsonl", ["--kind", "jsonl", "--input", str(pairs), "--skip-bad"], plain),
            ("indexed_chat", ["--kind", "chat", "--chat-train-on", "all", "--input", str(root / "chats.parquet")],
             chat)):
        prefix = root / name
        assert tool.main([*flags, "--tokenizer", str(tokenizer.path), "--output", str(prefix), "--quiet"]) == 0
        made[name] = (dict(kind="indexed", path=str(prefix)), tokenizer)
    return made


@pytest.mark.parametrize("name", ["code", "jsonl", "parquet", "chat", "chat_all", "translation", "indexed_code",
                                  "indexed_jsonl", "indexed_chat"])
def test_mapped_chunks_are_todays_packing(name, inputs, tmp_path):
    settings, tokenizer = inputs[name]
    anchors = [None] if name in ("code", "indexed_code") else [None, ANCHOR]
    for anchor in anchors:
        for extra in ({}, {"max_documents": 17}):
            config = DataConfig(**settings, **extra, validation_fraction=0.3, response_anchor=anchor,
                                cache_dir=str(tmp_path / "cache"))
            for chunk_len in CHUNK_LENS:
                for split in ("train", "validation"):
                    expected = load_chunks(config, tokenizer, chunk_len, split)
                    chunks = open_chunks(config, tokenizer, chunk_len, split)
                    assert len(chunks) == len(expected.tokens) and chunks.chunk_len == chunk_len
                    same(expected, chunks.batch(range(len(chunks))))
                    if chunk_len == 24:  # read in another order and in parts: the same rows
                        order = np.random.default_rng(0).permutation(len(chunks))
                        same(expected.select(order[:5]), chunks.select(order).batch(range(min(5, len(order)))))


def test_prepared_corpora_keep_the_responses_of_their_raw_input(inputs):
    for raw, indexed in (("jsonl", "indexed_jsonl"), ("chat_all", "indexed_chat")):
        for anchor in (None, ANCHOR):
            chunks = [load_chunks(DataConfig(**inputs[name][0], validation_fraction=0.3, response_anchor=anchor),
                                  inputs[name][1], 24) for name in (raw, indexed)]
            assert chunks[1].response_mask is not None and chunks[1].response_mask.any()
            same(*chunks)


def test_columns_index_like_tensors(inputs, tmp_path, tokenizer):
    config = DataConfig(**inputs["jsonl"][0], validation_fraction=0.0, cache_dir=str(tmp_path))
    chunks, expected = open_chunks(config, tokenizer, 24), load_chunks(config, tokenizer, 24)
    assert chunks.tokens.shape == expected.tokens.shape and chunks.response_mask.shape == expected.tokens.shape
    assert chunks.tokens[3].equal(expected.tokens[3]) and chunks.lengths[-1].equal(expected.lengths[-1])
    picked = torch.as_tensor([4, 0, 4], dtype=torch.long)
    assert chunks.doc_ids[picked].equal(expected.doc_ids[picked])
    assert chunks.response_mask[1:3].equal(expected.response_mask[1:3])
    subset = chunks.select([5, 2, 7]).select([2, 0])
    assert len(subset) == 2 and subset.tokens[torch.tensor([1, 0])].equal(expected.tokens[[5, 7]])
    assert documents_of(chunks, tokenizer) == documents_of(expected, tokenizer)
    with pytest.raises(IndexError):
        chunks.tokens[[len(chunks)]]


def test_a_split_hash_mask_is_exact_at_the_threshold():
    for fraction in (0.05, 0.3, 1 / 3, 0.5):
        threshold = held_out_below(fraction)
        hashes = [0, 1, threshold - 2, threshold - 1, threshold, threshold + 1, 2**64 - 1]
        hashes += [split_hash(f"line {i}") for i in range(200)]
        array = np.array(hashes, dtype=np.uint64)
        for held_out in (True, False):
            plan = SplitPlan(Path("x"), fraction, held_out)
            assert plan.mask(array).tolist() == [is_held_out(h, fraction) == held_out for h in hashes]


def test_built_once_then_reused_and_built_again_when_what_decides_it_changes(tmp_path, tokenizer):
    path = write_lines(tmp_path / "qa.jsonl", [jsonl_line(question=f"q{i}", answer=f"a{i}") for i in range(30)])
    base = dict(kind="jsonl", path=str(path), validation_fraction=0.2, cache_dir=str(tmp_path / "cache"))
    assert open_chunks(DataConfig(**base), tokenizer, 16).built == ("tokenized", "indexed")
    assert open_chunks(DataConfig(**base), tokenizer, 16).built == ()  # a restart, another rank
    assert open_chunks(DataConfig(**base), tokenizer, 12).built == ("indexed",)
    assert open_chunks(DataConfig(**base), tokenizer, 16, split="validation").built == ("indexed",)
    for setting in ({"validation_fraction": 0.3}, {"response_anchor": 4}):
        assert open_chunks(DataConfig(**{**base, **setting}), tokenizer, 16).built == ("indexed",)
    for setting in ({"response_key": "question"}, {"max_documents": 20}):  # what is read (no more than asked)
        assert open_chunks(DataConfig(**{**base, **setting}), tokenizer, 16).built == ("tokenized", "indexed")
    # the input written again: tokenized again, and the chunks are the new input's
    time.sleep(0.01)
    write_lines(path, [jsonl_line(question=f"Q{i}", answer=f"A{i}") for i in range(30)])
    chunks = open_chunks(DataConfig(**base), tokenizer, 16)
    assert chunks.built == ("tokenized", "indexed")
    same(load_chunks(DataConfig(**base), tokenizer, 16), chunks.batch(range(len(chunks))))


def test_a_prepared_corpus_keeps_its_index_beside_it_or_in_the_cache(inputs, tmp_path, monkeypatch):
    settings, tokenizer = inputs["indexed_code"]
    corpus = tmp_path / "corpus"
    for suffix in (".bin", ".idx", ".keys.npy", ".json"):
        shutil.copyfile(settings["path"] + suffix, f"{corpus}{suffix}")
    config = DataConfig(kind="indexed", path=str(corpus), cache_dir=str(tmp_path / "cache"))
    chunks = open_chunks(config, tokenizer, 24)
    assert chunks.index.folder.parent == Path(f"{corpus}.chunk_index")
    assert open_chunks(config, tokenizer, 24).built == ()
    monkeypatch.setattr(mapped, "writable_folder", lambda folder: False)  # a read-only corpus folder
    assert open_chunks(config, tokenizer, 24).built == ()  # the index beside it is still read
    elsewhere = open_chunks(config, tokenizer, 32)
    assert elsewhere.built == ("indexed",) and (tmp_path / "cache" / "chunk_index") in elsewhere.index.folder.parents
    with pytest.raises(DataError, match=r"data.response_anchor: .*corpus keeps no responses \(prepared from "
                                        r"kind=code"):
        open_chunks(DataConfig(kind="indexed", path=str(corpus), response_anchor=4), tokenizer, 24)


def _open_in_a_process(config, tokenizer, ready, results):
    ready.wait()
    try:
        chunks = open_chunks(config, tokenizer, 16, verbose=True)
        results.put(("ok", chunks.built, chunks.batch(range(len(chunks))).tokens.tolist()))
    except DataError as err:
        results.put(("error", (), str(err)))
    except BaseException as err:  # a bug: said, not waited for
        results.put(("crash", (), repr(err)))


def _start_together(config, tokenizer, count=2):
    context = multiprocessing.get_context("fork")
    ready, results = context.Barrier(count), context.Queue()
    processes = [context.Process(target=_open_in_a_process, args=(config, tokenizer, ready, results))
                 for _ in range(count)]
    for process in processes:
        process.start()
    found = [results.get(timeout=120) for _ in processes]
    for process in processes:
        process.join(timeout=60)
    return found


def test_processes_that_start_together_tokenize_and_index_once(tmp_path, tokenizer, monkeypatch, capfd):
    calls = tmp_path / "tokenized_by"
    original = mapped.tokenize_to_corpus

    def slow(*args, **kwargs):  # long enough for the other process to find the lock taken
        with open(calls, "a") as handle:
            handle.write(f"{os.getpid()}\n")
        time.sleep(1.0)
        return original(*args, **kwargs)

    monkeypatch.setattr(mapped, "tokenize_to_corpus", slow)
    path = write_lines(tmp_path / "qa.jsonl", [jsonl_line(question=f"q{i}", answer=f"a{i}") for i in range(40)])
    config = DataConfig(kind="jsonl", path=str(path), validation_fraction=0.1, cache_dir=str(tmp_path / "cache"))
    found = _start_together(config, tokenizer)
    assert sorted(built for _, built, _ in found) == [(), ("tokenized", "indexed")]
    assert found[0][2] == found[1][2] == load_chunks(config, tokenizer, 16).tokens.tolist()
    assert len(calls.read_text().split()) == 1
    assert "[data] waiting for " in capfd.readouterr().err

    # bad input: one process meets it, the one waiting stops with the same line
    bad = write_lines(tmp_path / "bad.jsonl", [jsonl_line(question="q", answer="a"), "{broken"])
    calls.unlink()
    found = _start_together(DataConfig(kind="jsonl", path=str(bad), validation_fraction=0.1, cache_dir=str(tmp_path / "cache")), tokenizer)
    assert [kind for kind, _, _ in found] == ["error", "error"] and found[0][2] == found[1][2]
    assert "bad.jsonl:2: not valid JSON" in found[0][2]
    assert len(calls.read_text().split()) == 1


def test_a_failed_or_interrupted_build_leaves_nothing_and_a_later_start_tries_again(tmp_path):
    target = tmp_path / "thing"

    def failing(folder):
        (folder / "half").write_text("written")
        raise DataError("bad input: line 3")

    with pytest.raises(DataError, match="bad input: line 3"):
        data_cache.built_once(target, failing, "a thing")
    assert not target.exists() and not list(tmp_path.glob("thing.partial-*"))
    (tmp_path / "thing.partial-otherhost-12345").mkdir()  # left by a process killed while building
    assert data_cache.built_once(target, lambda folder: (folder / "done").write_text("yes"), "a thing")
    assert (target / "done").read_text() == "yes" and not list(tmp_path.glob("thing.partial-*"))
    assert not (tmp_path / "thing.error").exists()
    assert not data_cache.built_once(target, lambda folder: 1 / 0, "a thing")  # there: never built again


def test_without_file_locks_a_build_still_ends_in_one_whole_folder(tmp_path, monkeypatch, capsys):
    def no_locks(*args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(data_cache.fcntl, "flock", no_locks)
    assert data_cache.built_once(tmp_path / "thing", lambda folder: (folder / "x").write_text("1"), "a thing")
    assert "has no file locks; each process may build a thing itself" in capsys.readouterr().err

    def beaten(folder):  # another process renames its build into place first
        (folder / "x").write_text("2")
        (tmp_path / "other").mkdir()
        (tmp_path / "other" / "x").write_text("1")

    assert not data_cache.built_once(tmp_path / "other", beaten, "a thing")
    assert (tmp_path / "other" / "x").read_text() == "1" and not list(tmp_path.glob("other.partial-*"))


def test_resuming_mid_epoch_reads_the_same_chunks(tmp_path, tokenizer):
    tree = tmp_path / "tree"
    write_code_tree(tree, 40)
    config = DataConfig(kind="code", path=str(tree), validation_fraction=0.1, cache_dir=str(tmp_path / "cache"))
    in_memory = load_chunks(config, tokenizer, 16)

    def batches(chunks, loader, steps):
        return [chunks.batch(loader.next_indices()).tokens.tolist() for _ in range(steps)]

    for rank in range(2):
        chunks = open_chunks(config, tokenizer, 16)
        loader = ChunkLoader(len(chunks), 8, rank, 2, seed=5)
        assert loader.steps_per_epoch >= 3
        straight = batches(chunks, ChunkLoader(len(chunks), 8, rank, 2, seed=5), loader.steps_per_epoch + 3)
        first = batches(chunks, loader, loader.steps_per_epoch + 1)  # into the second epoch
        state = loader.state_dict()
        again = open_chunks(config, tokenizer, 16)  # a restarted process: the index is read, not built
        assert again.built == ()
        resumed = ChunkLoader(len(again), 8, rank, 2, seed=5)
        resumed.load_state_dict(state)
        assert first + batches(again, resumed, 2) == straight
        memory_loader = ChunkLoader(len(in_memory.tokens), 8, rank, 2, seed=5)
        assert straight == [in_memory.select(memory_loader.next_indices()).tokens.tolist() for _ in straight]


def test_a_damaged_corpus_is_one_line_naming_it(tmp_path):
    """The fuzz tests' damaged corpora, read the memory-mapped way: each is refused with a line
    naming the corpus, or reads as the whole in-memory reader reads it."""
    from tests.fuzz.test_fuzz_inputs import INDEXED_REGRESSIONS, loads_or_says_where, write_corpus
    from ebft_megatron.data.indexed import corpus_files

    class Tok:
        path, vocab_size, eos_id = "tok", 300, 0

    base = tmp_path / "base" / "corpus"
    base.parent.mkdir()
    write_corpus(base, [[1, 2, 3], [], [299, 0], [7] * 9], 300)
    # also the third document's offset moved by a token, which reads other tokens (.idx: 34 header bytes,
    # 4 int32 lengths, then int64 offsets)
    moved = lambda base: [(1, corpus_files(base)[1].read_bytes()[:34 + 16 + 16] + (2).to_bytes(8, "little")
                           + corpus_files(base)[1].read_bytes()[34 + 16 + 24:])]
    for case, damage in enumerate(INDEXED_REGRESSIONS + [moved]):
        prefix = tmp_path / f"case{case}" / "corpus"
        prefix.parent.mkdir()
        for source, target in zip(corpus_files(base), corpus_files(prefix)):
            shutil.copyfile(source, target)
        for index, data in damage(base):
            corpus_files(prefix)[index].write_bytes(data)
        config = DataConfig(kind="indexed", path=str(prefix), validation_fraction=0.0, cache_dir=str(tmp_path))

        def read_all():
            chunks = open_chunks(config, Tok(), 4)
            return chunks.batch(range(len(chunks)))

        packed = loads_or_says_where(read_all, prefix)
        if packed is not None:
            same(load_chunks(config, Tok(), 4), packed)
