"""Reading documents: every bad input names its file and line, or is counted with skip_bad."""

from pathlib import Path

import pytest

from ebft_megatron.data.sources import (
    DataError, SkipReport, TranslationFormat, list_code_files, read_code_folder, read_jsonl_pairs,
    read_translation_pairs,
)
from tests.data.helpers import jsonl_line, write_code_tree, write_lines


def read_jsonl(path, skip_bad=False, report=None):
    return list(read_jsonl_pairs(path, "question", "answer", skip_bad, report if report is not None else SkipReport()))


def test_jsonl_pairs_are_prompt_and_response_segments(tmp_path):
    path = write_lines(tmp_path / "qa.jsonl", [
        jsonl_line(question="Q1?", answer="A1."),
        "",  # blank lines are not records
        jsonl_line(question="Q2?", answer="", extra=3),
    ])
    docs = read_jsonl(path)
    assert [d.segments for d in docs] == [("Q1?", "A1."), ("Q2?", "")]
    assert [d.origin for d in docs] == [f"{path}:1", f"{path}:3"]
    assert [d.split_key for d in docs] == ["line 1", "line 3"]


def test_jsonl_nondefault_keys(tmp_path):
    path = write_lines(tmp_path / "qa.jsonl", [jsonl_line(prompt="p", completion="c")])
    docs = list(read_jsonl_pairs(path, "prompt", "completion", False, SkipReport()))
    assert docs[0].segments == ("p", "c")


BAD_JSONL_LINES = [
    ('{"question": "q", "answer": ', "not valid JSON"),
    (jsonl_line(question="q"), "no key 'answer'"),
    (jsonl_line(question="q", answer=42), "key 'answer' holds a int, expected a string"),
    (jsonl_line(question=" ", answer="\n"), "both empty"),
    ('["question", "answer"]', "expected a JSON object"),
    (b'{"question": "caf\xe9", "answer": "x"}', "not valid UTF-8 (byte 0xe9"),
]


@pytest.mark.parametrize("bad_line,problem", BAD_JSONL_LINES)
def test_jsonl_bad_line_names_file_line_and_fix(tmp_path, bad_line, problem):
    path = write_lines(tmp_path / "qa.jsonl", [jsonl_line(question="a", answer="b"), "", bad_line])
    with pytest.raises(DataError) as err:
        read_jsonl(path)
    message = str(err.value)
    assert message.startswith(f"{path}:3: ")
    assert problem in message
    assert "set skip_bad=true" in message


def test_missing_key_message_lists_keys_and_setting(tmp_path):
    path = write_lines(tmp_path / "qa.jsonl", [jsonl_line(prompt="q", answer="a")])
    with pytest.raises(DataError, match=r"qa.jsonl:1: no key 'question' \(keys present: 'answer', 'prompt'\); "
                                        r"fix the line or set data.prompt_key to the right key, or set skip_bad=true"):
        read_jsonl(path)


def test_jsonl_skip_bad_counts_each_reason(tmp_path):
    lines = [jsonl_line(question="q0", answer="a0")]
    lines += [bad for bad, _ in BAD_JSONL_LINES]
    lines += [jsonl_line(question="q1"), jsonl_line(question="q2", answer="a2")]
    path = write_lines(tmp_path / "qa.jsonl", lines)
    report = SkipReport()
    docs = read_jsonl(path, skip_bad=True, report=report)
    assert [d.segments for d in docs] == [("q0", "a0"), ("q2", "a2")]
    assert dict(report.counts) == {"malformed JSON": 2, "missing key": 2, "not a string": 1, "empty document": 1,
                                   "not UTF-8": 1}
    assert report.total == 7
    assert report.first_example["missing key"].startswith(f"{path}:3: no key 'answer'")
    assert "2 missing key" in report.summary()


def test_missing_file_and_folder_instead_of_file(tmp_path):
    with pytest.raises(DataError, match=r"nope.jsonl: does not exist \(data.path\)"):
        read_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="is a folder without .parquet files"):  # a folder is read as Parquet files
        read_jsonl(tmp_path)


def test_code_folder_recursive_sorted_filtered(tmp_path):
    relative = write_code_tree(tmp_path, 6)
    (tmp_path / "notes.txt").write_text("not code")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.py").write_text("x = 1\n")
    (tmp_path / "pkg0" / "__pycache__").mkdir()
    (tmp_path / "pkg0" / "__pycache__" / "y.py").write_text("y = 1\n")
    (tmp_path / "vendor").mkdir()
    (tmp_path / "vendor" / "z.py").write_text("z = 1\n")
    (tmp_path / "stub.pyi").write_text("def f() -> int: ...\n")

    files = list_code_files(tmp_path, [".py"], ["vendor"])
    assert [f.relative_to(tmp_path).as_posix() for f in files] == sorted(relative)
    with_stubs = list_code_files(tmp_path, [".py", ".pyi"], [])
    assert {f.relative_to(tmp_path).as_posix() for f in with_stubs} == set(relative) | {"stub.pyi", "vendor/z.py"}

    docs = list(read_code_folder(tmp_path, [".py"], ["vendor"], False, SkipReport()))
    assert [d.split_key for d in docs] == sorted(relative)
    first = sorted(relative)[0]
    assert docs[0].segments == ((tmp_path / first).read_text(),)


def test_code_file_not_utf8_names_file_and_line(tmp_path):
    write_code_tree(tmp_path, 2)
    bad = tmp_path / "pkg0" / "latin1.py"
    bad.write_bytes(b"# ok\nx = 1\ns = 'caf\xe9'\n")
    with pytest.raises(DataError) as err:
        list(read_code_folder(tmp_path, [".py"], [], False, SkipReport()))
    assert str(err.value).startswith(f"{bad}:3: not valid UTF-8 (byte 0xe9 at column 9); convert the file to UTF-8")
    assert "set skip_bad=true" in str(err.value)

    report = SkipReport()
    docs = list(read_code_folder(tmp_path, [".py"], [], True, report))
    assert len(docs) == 2 and dict(report.counts) == {"not UTF-8": 1}


def test_unreadable_code_file(tmp_path, monkeypatch):
    write_code_tree(tmp_path, 1)
    locked = tmp_path / "locked.py"
    locked.write_text("x = 1\n")
    real_read_bytes = Path.read_bytes

    def read_bytes(self):  # chmod 0 does not stop root, so refuse the read here
        if self.name == "locked.py":
            raise PermissionError(13, "Permission denied")
        return real_read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    with pytest.raises(DataError, match=r"locked.py: cannot be read \(Permission denied\); fix its permissions"):
        list(read_code_folder(tmp_path, [".py"], [], False, SkipReport()))
    report = SkipReport()
    assert len(list(read_code_folder(tmp_path, [".py"], [], True, report))) == 1
    assert dict(report.counts) == {"unreadable file": 1}


def test_empty_code_files_are_counted_not_errors(tmp_path):
    write_code_tree(tmp_path, 2)
    (tmp_path / "__init__.py").write_text("")
    (tmp_path / "blank.py").write_text("\n\n   \n")
    report = SkipReport()
    docs = list(read_code_folder(tmp_path, [".py"], [], False, report))
    assert len(docs) == 2
    assert dict(report.counts) == {"empty file": 2}


def test_code_folder_without_matching_files(tmp_path):
    (tmp_path / "a.txt").write_text("text")
    with pytest.raises(DataError, match=r"no files ending in .py \(data.extensions\)"):
        list(read_code_folder(tmp_path, [".py"], [], False, SkipReport()))
    with pytest.raises(DataError, match="is not a folder"):
        list(read_code_folder(tmp_path / "a.txt", [".py"], [], False, SkipReport()))


FMT = TranslationFormat("de", "en", "German", "English", "Translate from {source_lang} to {target_lang}:\n{source}\n")


def test_translation_jsonl_uses_template_and_dotted_keys(tmp_path):
    path = write_lines(tmp_path / "pairs.jsonl", [jsonl_line(translation={"de": "Hallo", "en": "Hello"})])
    fmt = TranslationFormat("translation.de", "translation.en", "German", "English", FMT.template)
    docs = list(read_translation_pairs(path, fmt, False, SkipReport()))
    assert docs[0].segments == ("Translate from German to English:\nHallo\n", "Hello")


def test_translation_tsv_header_columns_and_bad_rows(tmp_path):
    path = write_lines(tmp_path / "pairs.tsv", [
        "id\ten\tde", "1\tHello\tHallo", "2\tToo\tmany\tcolumns", "3\tYes\t", "4\tCat\tKatze"])
    with pytest.raises(DataError) as err:
        list(read_translation_pairs(path, FMT, False, SkipReport()))
    assert str(err.value).startswith(f"{path}:3: 4 tab-separated columns, the header has 3")

    report = SkipReport()
    docs = list(read_translation_pairs(path, FMT, True, report))
    assert [d.segments for d in docs] == [(FMT.template.format(source_lang="German", target_lang="English",
                                                               source="Hallo"), "Hello"),
                                          (FMT.template.format(source_lang="German", target_lang="English",
                                                               source="Katze"), "Cat")]
    assert [d.origin for d in docs] == [f"{path}:2", f"{path}:5"]
    assert dict(report.counts) == {"wrong column count": 1, "empty document": 1}
    assert "empty source text" in report.first_example["empty document"]


def test_translation_tsv_header_must_name_columns(tmp_path):
    path = write_lines(tmp_path / "pairs.tsv", ["Hallo\tHello"])
    with pytest.raises(DataError, match=r"pairs.tsv:1: the header row has columns \['Hallo', 'Hello'\], without "
                                        r"\['de', 'en'\]"):
        list(read_translation_pairs(path, FMT, True, SkipReport()))


def test_translation_jsonl_bad_lines(tmp_path):
    path = write_lines(tmp_path / "pairs.jsonl", [jsonl_line(de="Hallo", en="Hello"), jsonl_line(de="Nur")])
    with pytest.raises(DataError, match=r"pairs.jsonl:2: no key 'en'.*data.target_key"):
        list(read_translation_pairs(path, FMT, False, SkipReport()))

