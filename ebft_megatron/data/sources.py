"""Reading raw documents: prompt/response pairs and chat conversations (JSONL or Parquet), folders
of code files, translation pairs.

A document is one or more text segments whose tokens are concatenated (the reference tokenizes the
question and the answer separately, then joins the token lists); a conversation is one segment, the
text its chat template renders, with the character spans of its responses. Every input problem is
reported with the file and 1-based line (or Parquet row) number and what to do about it. With
``skip_bad`` the problem is counted in a ``SkipReport`` instead, so nothing is ever dropped without a
trace.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import sysconfig
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ebft_megatron.errors import UserError

SKIP_HINT = "set skip_bad=true to skip such inputs"
# Folders never worth reading as a corpus.
ALWAYS_EXCLUDED_DIRS = ("__pycache__",)
# The Python test suites are large and full of deliberately odd code; site-packages is not stdlib.
STDLIB_EXCLUDED_DIRS = ("site-packages", "test", "tests", "idle_test", "__pycache__")


def python_stdlib_dir() -> Path:
    """The Python standard library's source folder, the default code corpus."""
    return Path(sysconfig.get_paths()["stdlib"])


class DataError(UserError, ValueError):
    """Bad data or data settings; the message names the file, the line and the fix."""


class ConversationProblem(Exception):
    """One chat record's problem (``data.chat``): the SkipReport reason, what is wrong, what to do."""

    def __init__(self, reason: str, problem: str, fix: str = "fix the record"):
        super().__init__(problem)
        self.reason, self.problem, self.fix = reason, problem, fix


@dataclass(frozen=True)
class Document:
    segments: tuple[str, ...]  # tokenized one by one, token lists concatenated (no BOS, no template)
    split_key: str  # what the held-out split hashes: a file's relative path, or a line number
    origin: str  # "file:line" or "file", for messages
    # A conversation (one segment): the character spans of its response, the assistant turns trained
    # on, in order; None: the response is the last segment of two or more.
    response_chars: tuple[tuple[int, int], ...] | None = None


@dataclass
class SkipReport:
    """Inputs skipped because of ``skip_bad`` (or empty code files), counted per reason."""

    counts: Counter = field(default_factory=Counter)
    first_example: dict = field(default_factory=dict)  # reason -> first "file:line: problem"

    def add(self, reason: str, message: str) -> None:
        self.counts[reason] += 1
        self.first_example.setdefault(reason, message)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.counts:
            return "nothing skipped"
        parts = [f"{count} {reason} (first: {self.first_example[reason]})" for reason, count in sorted(self.counts.items())]
        return "skipped " + "; ".join(parts)


class _Problems:
    """Raise a located DataError, or count it when skipping bad inputs is allowed."""

    def __init__(self, skip_bad: bool, report: SkipReport):
        self.skip_bad = skip_bad
        self.report = report

    def bad(self, reason: str, where: str, problem: str, fix: str = "") -> None:
        if self.skip_bad:
            self.report.add(reason, f"{where}: {problem}")
            return
        fix = f"{fix}, or {SKIP_HINT}" if fix else SKIP_HINT
        raise DataError(f"{where}: {problem}; {fix}")


def split_hash(split_key: str) -> int:
    """A stable 64-bit hash (not Python's salted ``hash``) so the split is the same on every run."""
    return int.from_bytes(hashlib.blake2b(split_key.encode("utf-8"), digest_size=8).digest(), "little")


def is_held_out(key_hash: int, validation_fraction: float) -> bool:
    return key_hash < validation_fraction * 2.0**64


def held_out_below(validation_fraction: float) -> int:
    """The integer T with ``key_hash < T`` exactly when :func:`is_held_out`, for comparing whole
    arrays of 64-bit hashes without rounding them to floats."""
    return math.ceil(validation_fraction * 2.0**64)


def _is_empty(segments: tuple[str, ...]) -> bool:
    return not any(segment.strip() for segment in segments)


def _decode_line(raw: bytes, line_number: int) -> str:
    if line_number == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark is not text
        raw = raw[3:]
    return raw.decode("utf-8")


def _lookup(record: dict, key: str):
    """``record[key]``; a dotted key reaches into nested objects (ALMA: ``translation.de``)."""
    if key in record:
        return record[key]
    value = record
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(key)
        value = value[part]
    return value


def _open_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    try:
        handle = open(path, "rb")
    except OSError as err:
        raise DataError(f"{path}: cannot be read ({err.strerror})") from None
    with handle:
        for line_number, raw in enumerate(handle, start=1):
            yield line_number, raw.rstrip(b"\r\n")


def _require_file(path: Path, setting: str) -> None:
    if not path.exists():
        raise DataError(f"{path}: does not exist (data.{setting})")
    if not path.is_file():
        raise DataError(f"{path}: is not a file (data.{setting}); this kind of data is read from one file")


def _json_records(path: Path, problems: _Problems) -> Iterator[tuple[int, dict]]:
    for line_number, raw in _open_lines(path):
        where = f"{path}:{line_number}"
        try:
            text = _decode_line(raw, line_number)
        except UnicodeDecodeError as err:
            problems.bad("not UTF-8", where, f"not valid UTF-8 (byte {raw[err.start]:#04x} at column {err.start + 1})",
                         "convert the file to UTF-8")
            continue
        if not text.strip():
            continue  # blank lines separate nothing in JSONL; they are not records
        try:
            record = json.loads(text)
        except json.JSONDecodeError as err:
            problems.bad("malformed JSON", where, f"not valid JSON ({err.msg} at column {err.colno})", "fix the line")
            continue
        except ValueError as err:  # valid JSON that Python will not hold: a number of thousands of digits
            problems.bad("malformed JSON", where, f"not readable JSON ({str(err).split(';')[0]})", "fix the line")
            continue
        except RecursionError:
            problems.bad("malformed JSON", where, "not readable JSON (nested too deeply)", "fix the line")
            continue
        if not isinstance(record, dict):
            problems.bad("malformed JSON", where, f"expected a JSON object, got a JSON {type(record).__name__}",
                         "write one object per line")
            continue
        yield line_number, record


def _string_fields(record: dict, keys: list[tuple[str, str]], where: str, problems: _Problems) -> list[str] | None:
    """The string values of ``keys`` (pairs of key and the setting naming it), or None after a problem."""
    values = []
    for key, setting in keys:
        try:
            value = _lookup(record, key)
        except KeyError:
            present = ", ".join(sorted(map(repr, record))) or "none"
            problems.bad("missing key", where, f"no key {key!r} (keys present: {present})",
                         f"fix the line or set data.{setting} to the right key")
            return None
        if not isinstance(value, str):
            held = "null" if value is None else f"a {type(value).__name__}"
            problems.bad("not a string", where, f"key {key!r} holds {held}, expected a string", "fix the line")
            return None
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:  # a lone surrogate escape ("\ud800"): not text; tokenizers refuse it
            problems.bad("not UTF-8", where, f"key {key!r} holds the lone surrogate escape {value[err.start]!r} at "
                         f"character {err.start + 1}, which is not text", "fix the line")
            return None
        values.append(value)
    return values


GLOB_CHARACTERS = "*?["
PARQUET_SUFFIX = ".parquet"
PARQUET_BATCH_ROWS = 1024  # rows decoded at a time: a large file is streamed, never loaded whole


def record_files(path: str | Path) -> tuple[list[Path], Path | None]:
    """The files of a record input (kind jsonl or chat): the file itself; the ``.parquet`` files under
    a folder; or the files a glob matches (JSONL or Parquet by suffix). Several files come sorted by
    their path relative to the root they are found under, which is returned with them (None for a
    single file) and names them in the split keys."""
    path = Path(path)
    text = str(path)
    if not path.exists() and any(char in text for char in GLOB_CHARACTERS):
        root = _glob_root(text)
        files = [Path(name) for name in glob.glob(text, recursive=True) if Path(name).is_file()]
        if not files:
            raise DataError(f"{path}: no files match this pattern (data.path)")
        return sorted(files, key=lambda file: file.relative_to(root).as_posix()), root
    if not path.exists():
        raise DataError(f"{path}: does not exist (data.path)")
    if path.is_dir():
        files = [file for file in path.rglob(f"*{PARQUET_SUFFIX}") if file.is_file()
                 and not any(part.startswith(".") for part in file.relative_to(path).parts)]
        if not files:
            raise DataError(f"{path}: is a folder without {PARQUET_SUFFIX} files (data.path); a folder is read as "
                            f"Parquet files: name a JSONL file, or a glob such as {path / '*.jsonl'}")
        return sorted(files, key=lambda file: file.relative_to(path).as_posix()), path
    if not path.is_file():
        raise DataError(f"{path}: is not a file (data.path)")
    return [path], None


def _glob_root(pattern: str) -> Path:
    """The folder part of a glob before its first wildcard: what the matches are named relative to, so
    the split does not depend on how the pattern was spelled (relative or absolute)."""
    parts = []
    for part in Path(pattern).parts[:-1]:
        if any(char in part for char in GLOB_CHARACTERS):
            break
        parts.append(part)
    return Path(*parts) if parts else Path(".")


def _parquet_records(path: Path, columns: list[tuple[str, str]]) -> Iterator[tuple[int, dict]]:
    """(1-based row number, {column: value}) of a Parquet file, one batch of rows decoded at a time.
    ``columns``: the keys to read, each with what to do when the file has no such column (a dotted
    key reads the struct column of its first part). Nested values come as Python dicts and lists,
    so rows are checked as JSON records are."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as err:
        raise DataError(f"{path}: cannot be read as Parquet ({err}); a .parquet file must be a Parquet file") from None
    names = parquet.schema_arrow.names
    wanted = []
    for key, fix in columns:
        column = key if key in names else key.split(".")[0]
        if column not in names:
            # every row of the file lacks it: a setting or file problem, not a bad row to skip
            raise DataError(f"{path}: no column {key!r} (columns: {', '.join(map(repr, names)) or 'none'}); {fix}")
        wanted.append(column)
    row = 0
    try:
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=list(dict.fromkeys(wanted))):
            for record in batch.to_pylist():
                row += 1
                yield row, record
    except (OSError, pa.ArrowException, UnicodeDecodeError) as err:
        raise DataError(f"{path}:row {row + 1}: cannot be read as Parquet ({err}); the file is damaged: write it "
                        "again") from None


def _records(path: str | Path, problems: _Problems,
             columns: list[tuple[str, str]]) -> Iterator[tuple[str, str, dict]]:
    """(where, split key, record) of every record of a JSONL/Parquet input (see ``record_files``).

    The split key of a record of a single file is "line N" for the N-th line of a JSONL file and for
    the N-th row of a Parquet file alike, so a JSONL file written as Parquet (one record a line)
    holds out the same records; the records of several files are told apart by the file's path
    without its suffix (so again Parquet and JSONL copies agree)."""
    files, root = record_files(path)
    for file in files:
        prefix = "" if root is None else f"{file.relative_to(root).with_suffix('').as_posix()} "
        if file.suffix.lower() == PARQUET_SUFFIX:
            for row, record in _parquet_records(file, columns):
                yield f"{file}:row {row}", f"{prefix}line {row}", record
        else:
            for line_number, record in _json_records(file, problems):
                yield f"{file}:{line_number}", f"{prefix}line {line_number}", record


def count_records(path: str | Path) -> int:
    """Lines of the JSONL files plus rows of the Parquet files: the progress line's total (0 when
    unknown; the reader reports the problem itself)."""
    try:
        files, _ = record_files(path)
    except DataError:
        return 0
    total = 0
    for file in files:
        try:
            if file.suffix.lower() == PARQUET_SUFFIX:
                import pyarrow.parquet as pq

                total += pq.ParquetFile(file).metadata.num_rows
            else:
                with open(file, "rb") as handle:
                    total += sum(block.count(b"\n") for block in iter(lambda: handle.read(1 << 20), b""))
        except Exception:  # noqa: BLE001 - only a progress estimate; reading reports the problem
            continue
    return total


def read_jsonl_pairs(path: str | Path, prompt_key: str, response_key: str, skip_bad: bool,
                     report: SkipReport) -> Iterator[Document]:
    """One document per JSONL line or Parquet row: tokens(record[prompt_key]) + tokens(record[response_key])."""
    problems = _Problems(skip_bad, report)
    keys = [(prompt_key, "prompt_key"), (response_key, "response_key")]
    columns = [(key, f"set data.{setting} to the right column") for key, setting in keys]
    for where, split_key, record in _records(path, problems, columns):
        values = _string_fields(record, keys, where, problems)
        if values is None:
            continue
        if _is_empty(tuple(values)):
            problems.bad("empty document", where, f"{prompt_key!r} and {response_key!r} are both empty", "fix the line")
            continue
        yield Document(tuple(values), split_key=split_key, origin=where)


def read_chat(path: str | Path, template, train_on: str, skip_bad: bool, report: SkipReport) -> Iterator[Document]:
    """One document per conversation (a JSONL line or Parquet row with "messages"): the text the chat
    template (``chat.ChatTemplate``) renders, with the character spans of the assistant turns
    trained on (``train_on``: "last" or "all")."""

    problems = _Problems(skip_bad, report)
    columns = [("messages", "a chat file holds each conversation in a 'messages' column: a list of "
                            "{role, content} structs")]
    for where, split_key, record in _records(path, problems, columns):
        try:
            conversation = template.conversation(record, train_on)
        except ConversationProblem as problem:
            problems.bad(problem.reason, where, problem.problem, problem.fix)
            continue
        yield Document((conversation.text,), split_key=split_key, origin=where,
                       response_chars=conversation.response_chars)


@dataclass(frozen=True)
class TranslationFormat:
    source_key: str
    target_key: str
    source_lang: str
    target_lang: str
    template: str  # has {source_lang}, {target_lang} and {source}

    def document(self, source: str, target: str, split_key: str, origin: str) -> Document:
        prompt = self.template.format(source_lang=self.source_lang, target_lang=self.target_lang, source=source)
        return Document((prompt, target), split_key=split_key, origin=origin)


def _tsv_rows(path: Path, fmt: TranslationFormat, problems: _Problems) -> Iterator[tuple[int, str, str]]:
    """TSV with a header row naming the columns: no quoting, one pair per line."""
    columns = None
    for line_number, raw in _open_lines(path):
        where = f"{path}:{line_number}"
        try:
            text = _decode_line(raw, line_number)
        except UnicodeDecodeError as err:
            if columns is None:  # without a header nothing else in the file can be read
                raise DataError(f"{where}: the header row is not valid UTF-8; convert the file to UTF-8") from None
            problems.bad("not UTF-8", where, f"not valid UTF-8 (byte {raw[err.start]:#04x} at column {err.start + 1})",
                         "convert the file to UTF-8")
            continue
        if columns is None:
            columns = text.split("\t")
            missing = [key for key in (fmt.source_key, fmt.target_key) if key not in columns]
            if missing:
                raise DataError(
                    f"{where}: the header row has columns {columns}, without {missing}; a TSV file needs a header "
                    f"row naming its columns (set data.source_key / data.target_key to the column names)")
            source_column, target_column = columns.index(fmt.source_key), columns.index(fmt.target_key)
            continue
        if not text.strip():
            continue
        cells = text.split("\t")
        if len(cells) != len(columns):
            problems.bad("wrong column count", where,
                         f"{len(cells)} tab-separated columns, the header has {len(columns)}",
                         "fix the row (tabs inside a text are not allowed in TSV)")
            continue
        yield line_number, cells[source_column], cells[target_column]
    if columns is None:
        raise DataError(f"{path}: empty file, expected a TSV header row and translation pairs")


def read_translation_pairs(path: str | Path, fmt: TranslationFormat, skip_bad: bool,
                           report: SkipReport) -> Iterator[Document]:
    """Pairs from JSONL (keys) or TSV (``.tsv``, header columns); the prompt is the template, the
    target is the response."""
    path = Path(path)
    _require_file(path, "path")
    problems = _Problems(skip_bad, report)
    if path.suffix.lower() == ".tsv":
        rows = _tsv_rows(path, fmt, problems)
    else:
        keys = [(fmt.source_key, "source_key"), (fmt.target_key, "target_key")]
        rows = ((line_number, *values) for line_number, record in _json_records(path, problems)
                if (values := _string_fields(record, keys, f"{path}:{line_number}", problems)) is not None)
    for line_number, source, target in rows:
        where = f"{path}:{line_number}"
        empty = [name for name, text in (("source", source), ("target", target)) if not text.strip()]
        if empty:
            problems.bad("empty document", where, f"empty {' and '.join(empty)} text", "fix the line")
            continue
        yield fmt.document(source, target, split_key=f"line {line_number}", origin=where)


def list_code_files(folder: str | Path, extensions: list[str], exclude_dirs: list[str]) -> list[Path]:
    """Files under ``folder`` (recursive) with one of ``extensions``, sorted by relative path so the
    order is the same on every machine. Hidden entries and ``exclude_dirs`` (folder names, at any
    depth) are left out."""
    folder = Path(folder)
    if not folder.exists():
        raise DataError(f"{folder}: does not exist (data.path)")
    if not folder.is_dir():
        raise DataError(f"{folder}: is not a folder (data.path); kind=code reads a folder of source files")
    excluded = set(exclude_dirs) | set(ALWAYS_EXCLUDED_DIRS)
    suffixes = tuple(extensions)
    found = []
    # os.walk rather than rglob: excluded folders are pruned before they are entered (the standard
    # library's site-packages and test suites are most of its tree).
    for directory, subdirs, names in os.walk(folder):
        subdirs[:] = [name for name in subdirs if not name.startswith(".") and name not in excluded]
        for name in names:
            if name.endswith(suffixes) and not name.startswith("."):
                path = Path(directory, name)
                if path.is_file():
                    found.append(path)
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def read_code_file(path: Path, root: Path, skip_bad: bool, report: SkipReport) -> Document | None:
    """One file = one document. Empty files (an empty ``__init__.py`` is normal in a code tree) are
    counted as skipped, never an error."""
    problems = _Problems(skip_bad, report)
    try:
        data = path.read_bytes()
    except OSError as err:
        problems.bad("unreadable file", str(path), f"cannot be read ({err.strerror})", "fix its permissions")
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        problems.bad("not UTF-8", f"{path}:{line}",
                     f"not valid UTF-8 (byte {data[err.start]:#04x} at column {column})",
                     "convert the file to UTF-8 or leave its extension out of data.extensions")
        return None
    text = text.removeprefix("\ufeff")
    if not text.strip():
        report.add("empty file", str(path))
        return None
    return Document((text,), split_key=path.relative_to(root).as_posix(), origin=str(path))


def read_code_folder(folder: str | Path, extensions: list[str], exclude_dirs: list[str], skip_bad: bool,
                     report: SkipReport) -> Iterator[Document]:
    folder = Path(folder)
    files = list_code_files(folder, extensions, exclude_dirs)
    if not files:
        raise DataError(f"{folder}: no files ending in {', '.join(extensions)} (data.extensions)")
    for path in files:
        document = read_code_file(path, folder, skip_bad, report)
        if document is not None:
            yield document
