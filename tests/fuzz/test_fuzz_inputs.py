"""Fuzzing the input readers: whatever a user hands them, they load it or raise one ``UserError`` line
that names the file (and the line, where there is one); a traceback from our code is a bug.

Property-based (hypothesis), deterministic in CI (``derandomize``); ``EBFT_FUZZ_EXAMPLES=N`` runs N
cases per target for a longer search. Inputs that once found a bug are kept below as regression
cases, run through the same checks.
"""

from __future__ import annotations

import base64
import copy
import io
import json
import os
import re
import shutil
import tempfile
import types
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ebft_megatron.checkpoint import store
from ebft_megatron.config import SECTIONS, Config, load_config
from ebft_megatron.data.config import DEFAULT_TRANSLATION_TEMPLATE
from ebft_megatron.data.indexed import IndexedCorpusInfo, IndexedCorpusWriter, corpus_files, read_indexed
from ebft_megatron.data.sources import (
    SkipReport, TranslationFormat, read_code_folder, read_jsonl_pairs, read_translation_pairs,
)
from ebft_megatron.errors import UserError
from ebft_megatron.models.architecture import Llama3RopeScaling, ModelArchitecture
from ebft_megatron.settings import field_types
from ebft_megatron.training import checkpointing

EXAMPLES = int(os.environ.get("EBFT_FUZZ_EXAMPLES", "0"))


def fuzz(examples: int):
    """``examples`` cases in CI (the file stays well under a minute), EBFT_FUZZ_EXAMPLES when set."""
    return settings(max_examples=EXAMPLES or examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


def loads_or_says_where(action, *names, line_of=None, line_when: str = ""):
    """``action()``'s result, or None after a user error: one line that names one of ``names``. With
    ``line_of`` (a file read line by line) the message starts ``FILE:LINE: `` or, for a problem of
    the whole file, ``FILE: ``; a message matching ``line_when`` must say ``line N``. Any other
    exception propagates: that is the bug being looked for."""
    try:
        return action()
    except UserError as err:
        message = str(err)
        assert message.strip() and not re.search(r"[\r\n\x0b\x0c\x1c-\x1e\x85\u2028\u2029]", message), message
        assert any(str(name) in message for name in names), message
        if line_of is not None:
            start = re.match(rf"{re.escape(str(line_of))}(:\d+)?: ", message)
            assert start, message
            assert start.group(1) or re.search(r": (empty file|does not exist|is not a file|cannot be read)", message), \
                message
        if line_when and re.search(line_when, message):
            assert re.search(r"line \d+", message), message
        return None


def workdir(root: Path) -> Path:
    """A fresh folder per example (hypothesis reuses the test's fixtures across its examples)."""
    return Path(tempfile.mkdtemp(dir=root))


# --- byte-level corruption ------------------------------------------------------------------
@st.composite
def corrupted(draw, data: bytes) -> bytes:
    """``data`` with a few byte-level accidents: cut short, bytes flipped, inserted or deleted."""
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["truncate", "flip", "insert", "delete", "replace"]))
        at = draw(st.integers(0, len(data)))
        if op == "truncate":
            data = data[:at]
        elif op == "flip" and data:
            at = min(at, len(data) - 1)
            data = data[:at] + bytes([draw(st.integers(0, 255))]) + data[at + 1:]
        elif op == "insert":
            data = data[:at] + draw(st.binary(min_size=1, max_size=8)) + data[at:]
        elif op == "delete":
            data = data[:at] + data[at + draw(st.integers(1, 8)):]
        elif op == "replace":
            data = draw(st.binary(max_size=64))
    return data


JSON_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-2**70, 2**70), st.sampled_from([0, -1, 1, 2**63, -2**63]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
JSON_VALUES = st.recursive(
    JSON_SCALARS, lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children,
                                                                                      max_size=3), max_leaves=8)


def _paths(value, prefix=()):
    """Every place in a JSON value: tuples of keys and indices."""
    yield prefix
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _paths(child, prefix + (key,))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from _paths(child, prefix + (index,))


@st.composite
def mutated_json(draw, base):
    """``base`` with a few values replaced by junk, deleted, or junk keys added."""
    value = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(list(_paths(value))))
        op = draw(st.sampled_from(["replace", "delete", "add"]))
        if not path:
            if op == "replace":
                value = draw(JSON_VALUES)
            continue
        holder = value
        for key in path[:-1]:
            holder = holder[key]
        if op == "replace":
            holder[path[-1]] = draw(JSON_VALUES)
        elif op == "delete":
            del holder[path[-1]]
        elif isinstance(holder, dict):
            holder[draw(st.text(max_size=6))] = draw(JSON_VALUES)
    return value


@st.composite
def json_file_bytes(draw, base) -> bytes:
    """A JSON document near ``base``: as written, with mutated values, or with damaged bytes."""
    how = draw(st.sampled_from(["mutated", "mutated", "corrupted", "special"]))
    if how == "special":
        return draw(st.sampled_from(SPECIAL_JSON))
    text = json.dumps(draw(mutated_json(base)), indent=draw(st.sampled_from([None, 1])))
    data = text.encode("utf-8", "surrogatepass")
    return draw(corrupted(data)) if how == "corrupted" else data


# Inputs that made a JSON reader raise something other than its user error.
SPECIAL_JSON = [
    b"", b"\xff\xfe\x00", b"[]", b"null", b"\"text\"", b"3",
    b'{"a": ' + b"1" * 5000 + b"}",  # Python refuses to convert integers of more than 4300 digits
    b"[" * 5000 + b"]" * 5000,  # the C scanner recurses once per level
    b'{"a": "\\ud800"}',
]


# --- 1. the config: YAML files and section.key=value overrides -----------------------------------
FIELDS = [(section, name, annotation) for section, cls in SECTIONS.items()
          for name, annotation in field_types(cls).items()]
YAMLISH = st.sampled_from(["", "null", "~", "true", "no", "1e400", "-1e400", "nan", ".inf", "0x10", "1_000", "-0",
                           "[1,", "[1, 2]", "{a: 1}", "'", "&a", "*a", "!!python/object:os.system", "2001-02-30",
                           "1" * 5000, "[" * 600, "~/x", "~\x00", "a\x00b", "a\nb", "\t"])


def plausible(annotation):
    """Values a user might write for a field of this type, near and past its limits."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        inner = next(a for a in typing.get_args(annotation) if a is not type(None))
        return st.none() | plausible(inner)
    if typing.get_origin(annotation) is typing.Literal:
        return st.sampled_from(typing.get_args(annotation)) | st.text(max_size=8)
    if annotation is bool:
        return st.booleans() | st.sampled_from(["yes", "1", "maybe"])
    if annotation is int:
        return st.integers(-3, 70) | st.sampled_from([0, 1, 8, 16, 32, 1024, 2**63, 10**30])
    if annotation is float:
        return st.floats(-1, 2) | st.sampled_from([0.0, 1.0, 1e-8, float("inf"), float("nan")])
    if annotation is str:
        return st.text(max_size=10) | st.sampled_from(["", "~", "~/ckpt", "ckpt", "a\x00"])
    if typing.get_origin(annotation) is list:
        return st.lists(st.integers(-2, 40) | st.text(max_size=4), max_size=4)
    return JSON_VALUES


YAML_VALUES = st.recursive(
    JSON_SCALARS | YAMLISH | st.dates(),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6) | st.integers(), children,
                                                                       max_size=3), max_leaves=6)


@st.composite
def config_documents(draw):
    """A mapping of sections, valid at first, with a few settings set to plausible values or junk."""
    document = {"model": {"load": "ckpt"}, "data": {"kind": "code"}}
    for _ in range(draw(st.integers(0, 4))):
        choice = draw(st.sampled_from(["field", "field", "field", "junk key", "junk section", "section value"]))
        if choice == "field":
            section, name, annotation = draw(st.sampled_from(FIELDS))
            value = draw(plausible(annotation) | YAML_VALUES) if draw(st.booleans()) else draw(plausible(annotation))
            holder = document.setdefault(section, {})
            if isinstance(holder, dict):
                holder[name] = value
        elif choice == "junk key":
            holder = document.setdefault(draw(st.sampled_from(list(SECTIONS))), {})
            if isinstance(holder, dict):
                holder[draw(st.text(max_size=6) | st.integers())] = draw(YAML_VALUES)
        elif choice == "junk section":
            document[draw(st.text(max_size=6) | st.integers() | st.none())] = draw(YAML_VALUES)
        else:
            document[draw(st.sampled_from(list(SECTIONS)))] = draw(YAML_VALUES)
    return document


@st.composite
def config_files(draw) -> bytes:
    """The bytes of a config file: a dumped document, damaged or not, or YAML-ish text."""
    how = draw(st.sampled_from(["document", "document", "document", "corrupted", "text"]))
    if how == "text":
        yamlish = st.text(alphabet=st.sampled_from(list(":-[]{}#&*!|>'\"%@`,?\n\t .~0123456789abz\x00\x85é")),
                          max_size=60)
        return draw(yamlish | st.text(max_size=60)).encode("utf-8", "surrogatepass")
    text = yaml.safe_dump(draw(config_documents()), allow_unicode=True, sort_keys=False,
                          default_flow_style=draw(st.sampled_from([None, True, False])))
    data = text.encode("utf-8")
    return draw(corrupted(data)) if how == "corrupted" else data


@st.composite
def overrides(draw) -> str:
    how = draw(st.sampled_from(["field", "field", "field", "junk"]))
    if how == "junk":
        return draw(st.text(max_size=20) | st.sampled_from(["=", ".=", "train.=1", "train.steps", ".steps=1",
                                                             " train . steps = 3 ", "train.steps==3"]))
    section, name, annotation = draw(st.sampled_from(FIELDS))
    value = draw(plausible(annotation) | YAMLISH | st.text(max_size=8))
    if isinstance(value, bool):
        value = str(value).lower()
    elif isinstance(value, list):
        value = draw(st.sampled_from([str(value), ", ".join(map(str, value))]))
    return f"{section}.{name}={value}"


def check_config(root: Path, content: bytes | None, extra: list[str]) -> None:
    path = None
    if content is not None:
        path = workdir(root) / "run.yaml"
        path.write_bytes(content)
    names = [path] if path is not None else []
    names += [repr(o) for o in extra] + ["command line"]
    config = loads_or_says_where(lambda: load_config(path, extra), *names, line_when=r"not valid (YAML|UTF-8)")
    if config is not None:
        assert isinstance(config, Config) and config.model.load
        assert "\x00" not in config.model.load


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@given(content=config_files(), extra=st.lists(overrides(), max_size=3))
@fuzz(250)
def test_config_files_and_overrides(root, content, extra):
    check_config(root, content, extra)


@given(extra=st.lists(overrides(), min_size=1, max_size=4))
@fuzz(150)
def test_config_overrides_alone(root, extra):
    check_config(root, None, ["model.load=ckpt", *extra])


CONFIG_REGRESSIONS = [
    (b"\xff\xfe", []),  # not UTF-8: UnicodeDecodeError
    (b"model: abc", []),  # a section that is not a mapping: ValueError from dict()
    (b"model: [1, 2]", []),  # TypeError from dict()
    (b"model: 3", []),  # TypeError from dict()
    (b"1: 2\nmodel: {}\nfoo: 1", []),  # mixed key types: TypeError from sorted()
    (b"model: {1: 2, foo: 3}", []),  # the same among the settings
    (b'model: {load: x, "a\\nb": 3}', []),  # a key with a line break: a two-line message
    (b"model:\n  load: a\x00", []),  # YAML's reader error: a two-line message without a line number
    (b"model: {load: x}", ["train.steps=1e400"]),  # OverflowError: int(inf)
    (b"model: {load: x}", ["train.steps=nan"]),  # ValueError: int(nan)
    (b"model: {load: x}", ["train.steps=" + "1" * 5000]),  # float() gives inf: OverflowError
    (b"model: {load: x}", ["model.feature_layers=[1,"]),  # the list's YAML error leaked
    (b'model: {load: "~a\\0"}', []),  # os.path.expanduser: ValueError (embedded null byte)
    (b'model: {load: "a\\0"}', []),  # loads, then every use of the path fails
    (b"model: {load: x, feature_layers: " + b"[" * 600 + b"]" * 600 + b"}", []),  # RecursionError
    (b"model: {load: 2001-02-30}", []),  # YAML's date constructor: ValueError
    (b"train: {steps: " + b"1" * 5000 + b"}\nmodel: {load: x}", []),  # int(): ValueError (digit limit)
    (b"model: {load: x}", ["train.a\nb=1"]),  # an override key with a line break: a two-line message
]


@pytest.mark.parametrize("content,extra", CONFIG_REGRESSIONS)
def test_config_regressions(root, content, extra):
    check_config(root, content, extra)


# --- 2. the raw document readers: JSONL, translation (JSONL or TSV), code folders -------------------
TEXT = st.text(max_size=12)
RECORD_KEYS = st.sampled_from(["question", "answer", "source", "target", "translation", "de", "en"]) | st.text(max_size=5)
RECORDS = st.dictionaries(RECORD_KEYS, TEXT | JSON_VALUES | st.fixed_dictionaries({"de": TEXT, "en": TEXT}),
                          max_size=4)
SPECIAL_LINES = [b"", b"   ", b"\r", b"\xef\xbb\xbf" + b'{"question": "q", "answer": "a"}', b"\xff\xfe",
                 b"null", b"[]", b'"s"', b"{", b"}", b'{"question": "q"', *SPECIAL_JSON,
                 b'{"question": "\\ud800", "answer": "a"}', b'{"source": "\\udfff", "target": "x"}',
                 b'{"question": ' + b"9" * 5000 + b', "answer": "a"}', b'{"question": "' + b"x" * 3000 + b'"}']


@st.composite
def json_lines(draw) -> bytes:
    lines = []
    for _ in range(draw(st.integers(0, 6))):
        how = draw(st.sampled_from(["record", "record", "record", "corrupted", "special", "bytes"]))
        if how == "special":
            lines.append(draw(st.sampled_from(SPECIAL_LINES)))
        elif how == "bytes":
            lines.append(draw(st.binary(max_size=24)))
        else:
            line = json.dumps(draw(RECORDS), ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
            lines.append(draw(corrupted(line)) if how == "corrupted" else line)
    ending = draw(st.sampled_from([b"\n", b"\r\n"]))
    return ending.join(lines) + draw(st.sampled_from([b"", ending]))


@st.composite
def tsv_lines(draw) -> bytes:
    header = draw(st.sampled_from([b"source\ttarget", b"target\tsource\tnote", b"source", b"", b"\xff",
                                   b"\xef\xbb\xbfsource\ttarget"]) | st.binary(max_size=12))
    rows = []
    for _ in range(draw(st.integers(0, 6))):
        cells = draw(st.lists(TEXT.map(lambda t: t.encode("utf-8", "surrogatepass")) | st.binary(max_size=8),
                              max_size=4))
        rows.append(b"\t".join(cells))
    return b"\n".join([header, *rows]) + draw(st.sampled_from([b"", b"\n"]))


def check_documents(documents) -> None:
    """What the tokenizer is handed next must be text."""
    for document in documents:
        assert document.segments and all(isinstance(s, str) for s in document.segments)
        for segment in document.segments:
            segment.encode("utf-8")  # a lone surrogate here makes the tokenizer fail with a TypeError


def check_jsonl(root: Path, content: bytes, skip_bad: bool, tokenizer=None) -> None:
    path = workdir(root) / "pairs.jsonl"
    path.write_bytes(content)
    documents = loads_or_says_where(
        lambda: list(read_jsonl_pairs(path, "question", "answer", skip_bad, SkipReport())), path, line_of=path)
    if skip_bad:
        assert documents is not None  # skipping bad lines leaves nothing to refuse in a file that exists
    if documents:
        check_documents(documents)
        if tokenizer is not None:
            tokenizer.encode_batch([s for d in documents for s in d.segments])


def check_translation(root: Path, content: bytes, suffix: str, skip_bad: bool, nested: bool) -> None:
    path = workdir(root) / f"pairs{suffix}"
    path.write_bytes(content)
    keys = ("translation.de", "translation.en") if nested else ("source", "target")
    fmt = TranslationFormat(*keys, "German", "English", DEFAULT_TRANSLATION_TEMPLATE)
    documents = loads_or_says_where(lambda: list(read_translation_pairs(path, fmt, skip_bad, SkipReport())), path,
                                    line_of=path)
    if skip_bad and suffix.lower() != ".tsv":  # a TSV file without a usable header cannot be read at all
        assert documents is not None
    if documents:
        check_documents(documents)


@given(content=json_lines(), skip_bad=st.booleans())
@fuzz(200)
def test_jsonl_pairs(root, tokenizer, content, skip_bad):
    check_jsonl(root, content, skip_bad, tokenizer)


@given(content=json_lines() | tsv_lines(), suffix=st.sampled_from([".jsonl", ".tsv", ".TSV"]), skip_bad=st.booleans(),
       nested=st.booleans())
@fuzz(200)
def test_translation_pairs(root, content, suffix, skip_bad, nested):
    check_translation(root, content, suffix, skip_bad, nested)


CODE_DIRS = st.sampled_from(["pkg", "tests", "__pycache__", ".hidden", "sub dir", "ü"])
CODE_NAMES = st.sampled_from(["a.py", "b.py", "__init__.py", ".hidden.py", "notes.txt", "c.PY", "d.py.bak", "ü.py"])
CODE_CONTENTS = st.one_of(
    TEXT.map(lambda t: t.encode("utf-8", "surrogatepass")), st.binary(max_size=24),
    st.sampled_from([b"", b"\n\n", b"\xef\xbb\xbf", b"\xef\xbb\xbfx = 1\n", b"x = 1\n\xff\n", b"\x00" * 8]))


@given(files=st.dictionaries(st.tuples(st.lists(CODE_DIRS, max_size=2).map(tuple), CODE_NAMES), CODE_CONTENTS,
                             max_size=5),
       exclude=st.lists(CODE_DIRS, max_size=2), skip_bad=st.booleans())
@fuzz(120)
def test_code_folder(root, files, exclude, skip_bad):
    folder = workdir(root) / "tree"
    folder.mkdir()
    for (dirs, name), content in files.items():
        path = folder.joinpath(*dirs, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    documents = loads_or_says_where(
        lambda: list(read_code_folder(folder, [".py"], exclude, skip_bad, SkipReport())), folder)
    if documents:
        check_documents(documents)


READER_REGRESSIONS = [
    ("jsonl", b'{"question": ' + b"1" * 5000 + b', "answer": "x"}'),  # ValueError: Python's integer digit limit
    ("jsonl", b"[" * 100000 + b"]" * 100000),  # RecursionError from the JSON scanner
    ("jsonl", b'{"question": "\\ud800", "answer": "x"}'),  # loaded; then the tokenizer's TypeError
    ("translation", b'{"source": ' + b"9" * 5000 + b"}"),  # the same digit limit through the translation reader
    ("translation", b'{"source": "a", "target": "\\udc80"}'),
]


@pytest.mark.parametrize("kind,content", READER_REGRESSIONS)
@pytest.mark.parametrize("skip_bad", [False, True])
def test_reader_regressions(root, tokenizer, kind, content, skip_bad):
    if kind == "jsonl":
        check_jsonl(root, content, skip_bad, tokenizer)
    else:
        check_translation(root, content, ".jsonl", skip_bad, nested=False)


# --- 3. indexed corpora: .bin/.idx/.keys.npy/.json written by our writer, then damaged ----------------
def write_corpus(prefix: Path, documents: list[list[int]], vocab_size: int) -> None:
    with IndexedCorpusWriter(prefix, IndexedCorpusInfo("tok", vocab_size, 0)) as out:
        for i, ids in enumerate(documents):
            out.add(ids, i * 2654435761 % 2**64)


@pytest.fixture(scope="module")
def corpora(root):
    """Small valid corpora: one of uint16 tokens, one of int32 (a vocabulary past 65500)."""
    made = {}
    for name, vocab, documents in (("u16", 300, [[1, 2, 3], [], [299, 0], [7] * 9]),
                                   ("i32", 70000, [[69999, 5], [1], [], [65536, 2, 3]])):
        prefix = root / "corpora" / name
        prefix.parent.mkdir(exist_ok=True)
        write_corpus(prefix, documents, vocab)
        made[name] = prefix
    return made


def json_of(path: Path):
    return json.loads(path.read_text())


@st.composite
def corpus_damage(draw, corpora):
    """(base corpus, [(file index, new bytes)]) with one to three of its four files changed."""
    name = draw(st.sampled_from(sorted(corpora)))
    files = corpus_files(corpora[name])
    changes = []
    for index in draw(st.lists(st.integers(0, 3), min_size=1, max_size=3, unique=True)):
        data = files[index].read_bytes()
        if index == 3:
            changes.append((index, draw(json_file_bytes(json_of(files[3])))))
        elif index == 2 and draw(st.booleans()):  # another array in a valid .npy file
            array = draw(st.sampled_from([np.zeros(3), np.zeros((4, 1), np.uint64), np.uint64(3),
                                          np.arange(4, dtype=np.uint64), np.array(["a"] * 4)]))
            buffer = io.BytesIO()
            np.save(buffer, array)
            changes.append((index, buffer.getvalue()))
        else:
            changes.append((index, draw(corrupted(data))))
    return name, changes


def check_corpus(root: Path, base: Path, changes) -> None:
    prefix = workdir(root) / "corpus"
    for source, target in zip(corpus_files(base), corpus_files(prefix)):
        shutil.copyfile(source, target)
    for index, data in changes:
        corpus_files(prefix)[index].write_bytes(data)
    corpus = loads_or_says_where(lambda: read_indexed(prefix), prefix)
    if corpus is not None:  # whatever loads must hold together
        count = corpus.info.documents
        assert len(corpus.documents) == count and corpus.key_hashes.shape == (count,)
        assert corpus.key_hashes.dtype == np.uint64
        tokens = np.concatenate(corpus.documents) if count else np.zeros(0, np.int64)
        assert tokens.size == corpus.info.tokens
        assert tokens.size == 0 or (tokens.min() >= 0 and tokens.max() == corpus.info.max_token_id)


@given(data=st.data())
@fuzz(250)
def test_indexed_corpus_damaged(root, corpora, data):
    name, changes = data.draw(corpus_damage(corpora))
    check_corpus(root, corpora[name], changes)


@given(documents=st.lists(st.lists(st.integers(0, 299), max_size=6), min_size=1, max_size=5))
@fuzz(40)
def test_indexed_corpus_round_trip(root, documents):
    prefix = workdir(root) / "corpus"
    write_corpus(prefix, documents, 300)
    corpus = read_indexed(prefix)
    assert [d.tolist() for d in corpus.documents] == documents


def _idx_with(base: Path, offset: int, value: bytes) -> tuple[int, bytes]:
    data = bytearray(corpus_files(base)[1].read_bytes())
    data[offset:offset + len(value)] = value
    return 1, bytes(data)


def _file_cut(base: Path, index: int, size: int) -> tuple[int, bytes]:
    return index, corpus_files(base)[index].read_bytes()[:size]


def _npy(array) -> tuple[int, bytes]:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return 2, buffer.getvalue()


# (corpus, changes); idx layout: 9-byte magic, u64 version, u8 dtype code (offset 17), u64 sequences (18),
# u64 documents (26), then int32 lengths (34), int64 pointers, int64 document index
INDEXED_REGRESSIONS = [
    lambda base: [_file_cut(base, 0, 0)],  # empty .bin: ValueError (cannot mmap an empty file)
    lambda base: [_file_cut(base, 0, 9)],  # short .bin: numpy "buffer is smaller than requested size"
    lambda base: [_file_cut(base, 1, 0)],  # empty .idx: megatron's AssertionError (bad header)
    lambda base: [_file_cut(base, 1, 9)],  # struct.error
    lambda base: [_file_cut(base, 1, 40)],  # numpy ValueError
    lambda base: [_idx_with(base, 17, b"\x63")],  # dtype code 99: ValueError (not a valid DType)
    lambda base: [_idx_with(base, 17, b"\x01")],  # uint8 instead of uint16: loaded other tokens
    lambda base: [_idx_with(base, 25, b"\xc8")],  # 2**63-scale sequence count: OverflowError
    lambda base: [_idx_with(base, 38, b"\xc8")],  # a sequence length past the .bin: numpy ValueError
    lambda base: [_idx_with(base, 34, b"\xff\xff\xff\xff")],  # length -1: numpy reads "the rest"
    lambda base: [_idx_with(base, 34 + 4 * 4 + 8, b"\x02")],  # a pointer moved: loaded the wrong tokens
    lambda base: [(0, b"\xff" * len(corpus_files(base)[0].read_bytes()))],  # token ids past the vocabulary
    lambda base: [_file_cut(base, 2, 0)],  # .keys.npy empty: EOFError
    lambda base: [_file_cut(base, 2, 20)],  # ValueError from np.load
    lambda base: [_npy(np.uint64(3))],  # a 0-d array: IndexError building the message
    lambda base: [_npy(np.zeros(4))],  # float keys: loaded
    lambda base: [_npy(np.array([{}] * 4, dtype=object))],  # pickled objects: ValueError
    lambda base: [(2, b"PK\x03\x04" + b"\x00" * 30)],  # a zip archive: np.load opens it as .npz
    # a NUL byte in the .npy header: numpy's header parser raised SyntaxError, then tokenize.TokenError
    lambda base: [(2, corpus_files(base)[2].read_bytes().replace(b"{'descr'", b"\x00'descr'"))],
    lambda base: [(3, json.dumps({**json_of(corpus_files(base)[3]), "skipped": 3}).encode())],  # TypeError later
    lambda base: [(3, json.dumps({**json_of(corpus_files(base)[3]), "vocab_size": "300"}).encode())],
    lambda base: [(3, b'{"documents": ' + b"1" * 5000 + b"}")],  # the digit limit
    lambda base: [(3, json.dumps({**json_of(corpus_files(base)[3]), "\x85": 1}).encode())],  # NEL in the message
    lambda base: [(3, b"[" * 100000)],  # RecursionError
]


@pytest.mark.parametrize("case", range(len(INDEXED_REGRESSIONS)))
def test_indexed_regressions(root, corpora, case):
    check_corpus(root, corpora["u16"], INDEXED_REGRESSIONS[case](corpora["u16"]))


def test_indexed_all_documents_empty(root):
    """A corpus of empty documents has an empty .bin, which megatron cannot map (a ValueError)."""
    prefix = root / "empty-documents"
    write_corpus(prefix, [[], []], 300)
    assert [d.tolist() for d in read_indexed(prefix).documents] == [[], []]


# --- 4. checkpoint metadata: ebft_checkpoint.json and trainer_state.json -------------------------------
ARCHITECTURE = ModelArchitecture(
    family="llama", hf_architecture="LlamaForCausalLM", num_layers=2, hidden_size=64, ffn_hidden_size=128,
    num_attention_heads=4, num_query_groups=2, head_dim=16, vocab_size=300, max_position_embeddings=128,
    norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, qkv_bias=False,
    rope_scaling=Llama3RopeScaling(8.0, 1.0, 4.0, 8192), eos_token_id=2)
META = {"format": store.FORMAT, "version": store.VERSION, "complete": True, "architecture": ARCHITECTURE.to_json(),
        "source": "hf", "dtype": "bfloat16", "step": 4, "kind": "training"}
RNG_STATE = base64.b64encode(torch.Generator().manual_seed(5).get_state().numpy().tobytes()).decode()
TRAINER_STATE = {
    "loader": {"epoch": 0, "position": 4, "seed": 43, "num_chunks": 10, "chunks_per_step": 2},
    "scheduler": {"max_lr": 1e-3, "lr_warmup_steps": 0, "num_steps": 4, "lr_decay_style": "constant",
                  "lr_decay_steps": 5, "min_lr": 1e-3, "start_wd": 0.0, "end_wd": 0.0, "wd_incr_style": "constant",
                  "wd_incr_steps": 4},
    "skipped_steps": 0, "seed": 43, "config": {"train": {"steps": 4}}, "step": 4, "rng_by_dp": {"0": RNG_STATE}}


def write_checkpoint(folder: Path, meta: bytes, state: bytes | None = None) -> Path:
    (folder / "model").mkdir(parents=True)
    (folder / "model" / ".metadata").write_bytes(b"")
    (folder / store.META_FILE).write_bytes(meta)
    if state is not None:
        (folder / "optimizer").mkdir()
        (folder / checkpointing.TRAINER_STATE).write_bytes(state)
    return folder


def check_meta(root: Path, meta: bytes) -> None:
    ckpt = write_checkpoint(workdir(root) / "ckpt", meta)
    read = loads_or_says_where(lambda: store.read_meta(ckpt), ckpt)
    if read is not None:
        assert store.stored_dtype(read) and isinstance(store.stored_dtype(read), str)
    arch = loads_or_says_where(lambda: store.architecture_of(ckpt), ckpt)
    if arch is not None:
        assert isinstance(arch.num_layers, int) and arch.num_layers > 0 and isinstance(arch.norm_eps, (int, float))
        assert arch.rope_scaling is None or isinstance(arch.rope_scaling.factor, (int, float))


def check_trainer_state(root: Path, state: bytes) -> None:
    save = workdir(root)
    good = write_checkpoint(save / "step_000002", json.dumps(META).encode(), json.dumps(TRAINER_STATE).encode())
    ckpt = write_checkpoint(save / "step_000004", json.dumps(META).encode(), state)
    checked = loads_or_says_where(lambda: checkpointing.check_resumable(ckpt), ckpt)
    assert checkpointing.latest_good_checkpoint(save, log=lambda _: None) == (good if checked is None else ckpt)
    if checked is None:
        return
    loaded = checkpointing.read_trainer_state(ckpt)
    for dp_rank in (0, 1):  # 1: a rank that did not exist when saved derives its own stream
        loads_or_says_where(lambda rank=dp_rank: checkpointing.restore_generator(loaded, torch.Generator(), rank, ckpt),
                            ckpt)


@given(meta=json_file_bytes(META))
@fuzz(250)
def test_checkpoint_metadata(root, meta):
    check_meta(root, meta)


@given(state=json_file_bytes(TRAINER_STATE))
@fuzz(200)
def test_trainer_state(root, state):
    check_trainer_state(root, state)


def _meta(**changes) -> bytes:
    return json.dumps({**META, **changes}).encode()


def _arch(**changes) -> bytes:
    return _meta(architecture={**ARCHITECTURE.to_json(), **changes})


def _state(**changes) -> bytes:
    return json.dumps({**TRAINER_STATE, **changes}).encode()


META_REGRESSIONS = [
    b"[]",  # AttributeError: 'list' object has no attribute 'get'
    b'"x"',
    _meta(version="2"),  # TypeError comparing a string with VERSION
    b'{"a": ' + b"1" * 5000 + b"}",  # ValueError: the digit limit
    b"[" * 100000,  # RecursionError
    _meta(dtype=[]),  # TypeError: unhashable list in stored_dtype
    json.dumps({k: v for k, v in META.items() if k != "architecture"}).encode(),  # KeyError in architecture_of
    _meta(architecture=[1]),  # TypeError from dict()
    _meta(architecture={}),  # TypeError: missing arguments
    _arch(num_layers="2"),  # loaded, the model builder fails later
    _arch(num_layers=0),
    _arch(rope_scaling={"factor": 8.0}),  # TypeError: missing arguments of Llama3RopeScaling
    _arch(rope_scaling=5),
    _arch(**{"\x85": None}),  # the dataclass's TypeError quoted the key raw: a line break (NEL) in the message
]

STATE_REGRESSIONS = [
    b"[]",  # not checked before: TypeError/KeyError in load_training_checkpoint and the trainer
    b'{"a": ' + b"1" * 5000 + b"}",  # ValueError: the digit limit
    _state(step="4"),
    _state(rng_by_dp=[]),  # AttributeError: list.get
    _state(rng_by_dp={"0": "not base64!"}),  # binascii.Error
    _state(rng_by_dp={"0": "AAAA"}),  # RuntimeError: a generator state of the wrong size
    _state(rng_by_dp={"0": 5}),  # TypeError in base64
    _state(rng_by_dp={"\r": None}),  # the key printed raw: a line break in the message
    _state(loader={"epoch": 0}),  # KeyError in the trainer
    _state(scheduler={"max_lr": 1}),  # KeyError in megatron's scheduler
    _state(seed="x"),  # ValueError: int("x")
    _state(seed=2**70, rng_by_dp={}),  # ValueError from torch: a seed past 64 bits
    json.dumps({k: v for k, v in TRAINER_STATE.items() if k != "step"}).encode(),  # KeyError
]


@pytest.mark.parametrize("meta", META_REGRESSIONS)
def test_checkpoint_metadata_regressions(root, meta):
    check_meta(root, meta)


@pytest.mark.parametrize("state", STATE_REGRESSIONS)
def test_trainer_state_regressions(root, state):
    check_trainer_state(root, state)


def test_a_valid_trainer_state_loads(root):
    """The baseline the fuzzing mutates is itself accepted (so the properties above test something)."""
    save = workdir(root)
    ckpt = write_checkpoint(save / "step_000004", json.dumps(META).encode(), json.dumps(TRAINER_STATE).encode())
    assert checkpointing.check_resumable(ckpt) == ckpt and store.architecture_of(ckpt) == ARCHITECTURE
    generator = torch.Generator()
    checkpointing.restore_generator(checkpointing.read_trainer_state(ckpt), generator, 0, ckpt)
    assert torch.equal(generator.get_state(), torch.Generator().manual_seed(5).get_state())
