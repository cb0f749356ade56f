"""The data settings, checked once when built: every error names the setting (``data.<name>``)."""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from pathlib import Path

from ebft_megatron.data.sources import STDLIB_EXCLUDED_DIRS, DataError, TranslationFormat

KINDS = ("jsonl", "code", "translation", "indexed")
DEFAULT_TRANSLATION_TEMPLATE = "Translate from {source_lang} to {target_lang}:\n{source}\n"
TEMPLATE_FIELDS = {"source_lang", "target_lang", "source"}


@dataclass
class DataConfig:
    # What to read. "jsonl": prompt/response pairs; "code": a folder of source files (one file = one
    # document); "translation": JSONL or TSV source/target pairs; "indexed": a prefix written by
    # tools/prepare_data.py. With kind="code" and no path, the Python standard library is used.
    kind: str = "code"
    path: str | None = None
    # jsonl: document = tokens(record[prompt_key]) + tokens(record[response_key]).
    prompt_key: str = "question"
    response_key: str = "answer"
    # translation: document = tokens(template filled with the source) + tokens(target).
    source_key: str = "source"
    target_key: str = "target"
    source_lang: str = ""
    target_lang: str = ""
    template: str = DEFAULT_TRANSLATION_TEMPLATE
    # code: which files, and which folder names (at any depth) to leave out. None: the standard
    # library's test suites and site-packages when reading the standard library, nothing otherwise.
    extensions: list[str] = field(default_factory=lambda: [".py"])
    exclude_dirs: list[str] | None = None
    # Held-out documents for validation, chosen by a hash of the file's relative path (code) or of
    # the line number (jsonl, translation); ignored when eval_path is given.
    validation_fraction: float = 0.05
    # Keep only the first N documents of the input (before the split); None keeps all.
    max_documents: int | None = None
    # Skip (and count) malformed inputs instead of stopping at the first one.
    skip_bad: bool = False
    # Restrict attention to the same document inside a chunk (the paper runs without it). Applies to
    # the training forwards (rollouts take the exact dense path, slower); validation CE stays causal.
    document_masking: bool = False
    # A separate validation input of the same kind; the whole of path is then used for training.
    eval_path: str | None = None
    # jsonl/translation: one chunk per document with its response starting at this token index
    # (prompt right before it, neighbouring documents around it) instead of back-to-back packing.
    # Prompt-completion RLVR sets rollout.first_anchor to the same index; null = ordinary packing.
    response_anchor: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise DataError(f"data.kind: {self.kind!r} is not one of {', '.join(KINDS)}")
        for name in ("path", "eval_path"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (str, Path)) and str(value)):
                raise DataError(f"data.{name}: expected a file or folder path, got {value!r}")
        if self.path is None and self.kind != "code":
            raise DataError(f"data.path: required for kind={self.kind} (only kind=code defaults to the Python "
                            "standard library)")
        for name in ("prompt_key", "response_key", "source_key", "target_key", "template"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise DataError(f"data.{name}: expected a non-empty string, got {getattr(self, name)!r}")
        if self.kind == "translation":
            self._validate_translation()
        self._validate_extensions()
        if self.exclude_dirs is not None and (
                not isinstance(self.exclude_dirs, (list, tuple)) or not all(isinstance(d, str) for d in self.exclude_dirs)):
            raise DataError(f"data.exclude_dirs: expected a list of folder names, got {self.exclude_dirs!r}")
        fraction = self.validation_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction < 1.0:
            raise DataError(f"data.validation_fraction: expected a number in [0, 1), got {fraction!r}")
        if self.max_documents is not None and (
                isinstance(self.max_documents, bool) or not isinstance(self.max_documents, int) or self.max_documents < 1):
            raise DataError(f"data.max_documents: expected a positive integer or null, got {self.max_documents!r}")
        if self.response_anchor is not None:
            if isinstance(self.response_anchor, bool) or not isinstance(self.response_anchor, int) or self.response_anchor < 1:
                raise DataError(f"data.response_anchor: expected a positive integer or null, got {self.response_anchor!r}")
            if self.kind not in ("jsonl", "translation"):
                raise DataError(f"data.response_anchor: needs prompt/response documents (kind jsonl or translation), "
                                f"not kind={self.kind}")
        for name in ("skip_bad", "document_masking"):
            if not isinstance(getattr(self, name), bool):
                raise DataError(f"data.{name}: expected true or false, got {getattr(self, name)!r}")

    def _validate_translation(self) -> None:
        for name in ("source_lang", "target_lang"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise DataError(f"data.{name}: required for kind=translation (e.g. German, English)")
        try:
            fields = {name for _, name, _, _ in string.Formatter().parse(self.template) if name is not None}
        except ValueError as err:
            raise DataError(f"data.template: not a valid format string ({err})") from None
        unknown = fields - TEMPLATE_FIELDS
        if unknown:
            raise DataError(f"data.template: unknown placeholder(s) {sorted(unknown)}; use {{source_lang}}, "
                            "{target_lang} and {source}")
        if "source" not in fields:
            raise DataError("data.template: must contain {source}, where the text to translate goes")

    def _validate_extensions(self) -> None:
        if not isinstance(self.extensions, (list, tuple)) or not self.extensions:
            raise DataError(f"data.extensions: expected a list of file suffixes such as ['.py'], got {self.extensions!r}")
        for suffix in self.extensions:
            if not isinstance(suffix, str) or not suffix.startswith(".") or len(suffix) < 2:
                raise DataError(f"data.extensions: {suffix!r} is not a file suffix; write it with its dot, e.g. '.py'")

    def resolved_path(self) -> Path:
        if self.path is None:
            from ebft_megatron.assets import python_stdlib_dir

            return python_stdlib_dir()
        return Path(self.path)

    def resolved_exclude_dirs(self) -> list[str]:
        if self.exclude_dirs is not None:
            return list(self.exclude_dirs)
        return list(STDLIB_EXCLUDED_DIRS) if self.path is None else []

    def translation_format(self) -> TranslationFormat:
        return TranslationFormat(self.source_key, self.target_key, self.source_lang, self.target_lang, self.template)
