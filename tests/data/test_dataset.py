"""load_chunks: the held-out split, eval_path, max_documents, empty input, reporting of skips."""

import shutil

import pytest

from ebft_megatron.data.config import DataConfig
from ebft_megatron.data.dataset import load_chunks
from ebft_megatron.data.sources import DataError, is_held_out, split_hash
from tests.data.helpers import documents_of, jsonl_line, write_code_tree, write_lines


def code_texts(root, relative):
    return {(root / rel).read_text(): rel for rel in relative}


def test_code_split_by_file_is_deterministic_and_disjoint(tmp_path, tokenizer):
    root = tmp_path / "tree"
    relative = write_code_tree(root, 40)
    by_text = code_texts(root, relative)
    config = DataConfig(kind="code", path=str(root), validation_fraction=0.3)
    train = load_chunks(config, tokenizer, 32)
    validation = load_chunks(config, tokenizer, 32, split="validation")
    train_files = [by_text[text] for text in documents_of(train, tokenizer)]
    validation_files = [by_text[text] for text in documents_of(validation, tokenizer)]

    expected_validation = [rel for rel in sorted(relative) if is_held_out(split_hash(rel), 0.3)]
    assert validation_files == expected_validation
    assert train_files == [rel for rel in sorted(relative) if rel not in expected_validation]
    assert 5 <= len(validation_files) <= 20  # about 30% of 40
    assert train.num_documents + validation.num_documents == 40

    # Same files elsewhere: the split hashes relative paths, so it does not move.
    moved = tmp_path / "elsewhere" / "copy"
    shutil.copytree(root, moved)
    again = load_chunks(DataConfig(kind="code", path=str(moved), validation_fraction=0.3), tokenizer, 32,
                        split="validation")
    assert again.tokens.equal(validation.tokens)


def test_eval_path_gives_validation_and_all_of_path_trains(tmp_path, tokenizer):
    train_path = write_lines(tmp_path / "train.jsonl", [jsonl_line(question=f"q{i}", answer="a") for i in range(30)])
    eval_path = write_lines(tmp_path / "eval.jsonl", [jsonl_line(question="held", answer="out")])
    config = DataConfig(kind="jsonl", path=str(train_path), eval_path=str(eval_path), validation_fraction=0.5)
    assert load_chunks(config, tokenizer, 64).num_documents == 30
    validation = load_chunks(config, tokenizer, 64, split="validation")
    assert documents_of(validation, tokenizer) == ["heldout"]


def test_jsonl_held_out_lines(tmp_path, tokenizer):
    path = write_lines(tmp_path / "qa.jsonl", [jsonl_line(question=f"q{i}", answer=".") for i in range(1, 51)])
    config = DataConfig(kind="jsonl", path=str(path), validation_fraction=0.2)
    validation = documents_of(load_chunks(config, tokenizer, 64, split="validation"), tokenizer)
    train = documents_of(load_chunks(config, tokenizer, 64), tokenizer)
    assert validation == [f"q{i}." for i in range(1, 51) if is_held_out(split_hash(f"line {i}"), 0.2)]
    assert sorted(train + validation) == sorted(f"q{i}." for i in range(1, 51))


def test_max_documents_caps_before_the_split(tmp_path, tokenizer):
    path = write_lines(tmp_path / "qa.jsonl", [jsonl_line(question=f"q{i}", answer=".") for i in range(1, 21)])
    packed = load_chunks(DataConfig(kind="jsonl", path=str(path), validation_fraction=0.0, max_documents=7),
                         tokenizer, 64)
    assert documents_of(packed, tokenizer) == [f"q{i}." for i in range(1, 8)]


def test_split_errors(tmp_path, tokenizer):
    path = write_lines(tmp_path / "qa.jsonl", [jsonl_line(question="q", answer="a")])
    with pytest.raises(DataError, match="no validation data: set data.validation_fraction > 0 or data.eval_path"):
        load_chunks(DataConfig(kind="jsonl", path=str(path), validation_fraction=0.0), tokenizer, 8, split="validation")
    # line 1 is not held out at 1%: the validation split is empty
    assert not is_held_out(split_hash("line 1"), 0.01)
    with pytest.raises(DataError, match=r"qa.jsonl: no documents in the validation split \(validation_fraction=0.01; "
                                        r"raise it or set data.eval_path\)"):
        load_chunks(DataConfig(kind="jsonl", path=str(path), validation_fraction=0.01), tokenizer, 8,
                    split="validation")
    with pytest.raises(DataError, match="unknown split 'test'"):
        load_chunks(DataConfig(kind="jsonl", path=str(path)), tokenizer, 8, split="test")


def test_empty_input_names_the_path(tmp_path, tokenizer):
    path = write_lines(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(DataError, match=r"empty.jsonl: no documents in the train split \(nothing skipped\)"):
        load_chunks(DataConfig(kind="jsonl", path=str(path), validation_fraction=0.0), tokenizer, 8)
    all_bad = write_lines(tmp_path / "bad.jsonl", ["{", jsonl_line(question="q")])
    with pytest.raises(DataError, match=r"bad.jsonl: no documents in the train split \(skipped 1 malformed JSON"):
        load_chunks(DataConfig(kind="jsonl", path=str(all_bad), validation_fraction=0.0, skip_bad=True), tokenizer, 8)


def test_skipped_inputs_are_reported(tmp_path, tokenizer, capsys):
    path = write_lines(tmp_path / "qa.jsonl", [jsonl_line(question="q", answer="a"), "{oops", jsonl_line(answer="a")])
    packed = load_chunks(DataConfig(kind="jsonl", path=str(path), validation_fraction=0.0, skip_bad=True), tokenizer, 8)
    assert packed.num_documents == 1
    assert packed.skipped == {"malformed JSON": 1, "missing key": 1}
    err = capsys.readouterr().err
    assert f"[data] {path}: skipped 1 malformed JSON (first: {path}:2: not valid JSON" in err


def test_verbose_progress_goes_to_stderr_only_when_asked(tmp_path, tokenizer, capsys):
    root = tmp_path / "tree"
    write_code_tree(root, 5)
    config = DataConfig(kind="code", path=str(root), validation_fraction=0.0)
    load_chunks(config, tokenizer, 16)
    assert capsys.readouterr() == ("", "")
    load_chunks(config, tokenizer, 16, verbose=True)
    out, err = capsys.readouterr()
    assert out == "" and "tokenizing" in err and "5/5 files" in err and "files/s" in err


def test_tokenizer_without_eos(tmp_path, tokenizer):
    class NoEos:
        eos_id, path, vocab_size = None, "/tok", 300

    with pytest.raises(DataError, match="the tokenizer /tok has no EOS token"):
        load_chunks(DataConfig(kind="jsonl", path=str(tmp_path / "x.jsonl")), NoEos(), 8)


def test_prompt_response_chunks_mark_the_response_tokens(tmp_path, tokenizer):
    records = [("def add(a, b):", " return a + b"), ("class Stack:", " pass")]
    path = write_lines(tmp_path / "qa.jsonl", [jsonl_line(question=q, answer=a) for q, a in records])
    chunks = load_chunks(DataConfig(kind="jsonl", path=str(path), validation_fraction=0.0), tokenizer, 64)
    assert chunks.response_mask is not None
    marked = tokenizer.decode(chunks.tokens[0][chunks.response_mask[0]].tolist())
    assert marked == "".join(answer for _, answer in records)  # responses only: no prompt, EOS or padding
    code = tmp_path / "code"
    write_code_tree(code, 3)
    code_chunks = load_chunks(DataConfig(kind="code", path=str(code), validation_fraction=0.0), tokenizer, 64)
    assert code_chunks.response_mask is None or not code_chunks.response_mask.any()
