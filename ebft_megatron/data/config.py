"""The data settings, checked when built: every error names the setting (``data.<name>``)."""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from ebft_megatron.data.sources import STDLIB_EXCLUDED_DIRS, DataError, TranslationFormat, python_stdlib_dir
from ebft_megatron.settings import Section, setting

DEFAULT_TRANSLATION_TEMPLATE = "Translate from {source_lang} to {target_lang}:\n{source}\n"
TEMPLATE_FIELDS = {"source_lang", "target_lang", "source"}
RESPONSE_KINDS = ("jsonl", "translation", "chat")  # documents with a response: the response mask, the anchor


@dataclass
class DataConfig(Section):
    section = "data"
    error = DataError
    kind: Literal["jsonl", "chat", "code", "translation", "indexed"] = setting(
        "code", 'What to read. "jsonl": prompt/response pairs; "chat": conversations, records {"messages": [{"role": '
                '"system"|"user"|"assistant", "content": ...}, ...]} rendered with the chat template of the '
                "tokenizer's folder (its response: the assistant turns, see chat_train_on); both from JSONL or "
                'Parquet; "code": a folder of source files (one file = one document); "translation": JSONL or TSV '
                'source/target pairs; "indexed": a prefix written by tools/prepare_data.py. With kind=code and no '
                "path, the Python standard library is used.")
    path: Optional[str] = setting(None, "The file or folder to read (a prefix for kind=indexed). jsonl and chat read "
                                        "a JSONL file, a .parquet file, a folder of .parquet files or a glob "
                                        "(JSONL or Parquet by suffix).", expect="a file or folder path")
    prompt_key: str = setting("question", "jsonl: the key (Parquet: column) of the prompt; document = tokens(prompt) "
                                          "+ tokens(response).", nonempty=True)
    response_key: str = setting("answer", "jsonl: the key (Parquet: column) of the response.", nonempty=True)
    chat_train_on: Literal["last", "all"] = setting(
        "last", 'chat: the assistant turns that are the response (the response-only metrics): "last" the last '
                'assistant message, "all" every one. data.response_anchor aligns the start of the last one either '
                "way.")
    source_key: str = setting("source", "translation: JSONL key or TSV column of the source text (a dotted key such "
                                        "as translation.de reaches into nested objects); document = tokens(template "
                                        "filled with the source) + tokens(target).", nonempty=True)
    target_key: str = setting("target", "translation: JSONL key or TSV column of the target text.", nonempty=True)
    source_lang: str = setting("", "translation: the source language's name, as the template says it (e.g. German).")
    target_lang: str = setting("", "translation: the target language's name (e.g. English).")
    template: str = setting(DEFAULT_TRANSLATION_TEMPLATE, "translation: the prompt template, with {source_lang}, "
                                                          "{target_lang} and {source}; the target follows it.",
                            nonempty=True)
    extensions: list[str] = setting(help="code: the file suffixes to read.", factory=lambda: [".py"],
                                    expect="a list of file suffixes such as ['.py']")
    exclude_dirs: Optional[list[str]] = setting(
        None, "code: folder names (at any depth) to leave out; null: the standard library's test suites and "
              "site-packages when reading the standard library, nothing otherwise.", expect="a list of folder names")
    validation_fraction: float = setting(
        0.05, "Held-out documents for validation, chosen by a hash of the file's relative path (code) or of the line "
              "or row number (jsonl, chat, translation); ignored when eval_path is given.", minimum=0, below=1)
    max_documents: Optional[int] = setting(None, "Keep only the first N documents of the input (before the split); "
                                                 "null keeps all.", minimum=1)
    skip_bad: bool = setting(False, "Skip (and count) malformed inputs instead of stopping at the first one.")
    document_masking: bool = setting(
        False, "Keep attention inside documents, as the reference does it (the paper runs without it): position ids "
               "restart at every document start; a chunk token sees the earlier tokens of its document; a rollout "
               "token belongs to the document of the ground-truth token it is scored against, carries that token's "
               "position and sees only that document's part of the block's prefix and of its own earlier tokens. "
               "Applies to the rollouts, the feature network, the policy forward and the evaluation.")
    eval_path: Optional[str] = setting(None, "A separate validation input of the same kind; the whole of path is "
                                             "then used for training.", expect="a file or folder path")
    response_anchor: Optional[int] = setting(
        None, "jsonl/translation/chat (or an indexed corpus prepared from them): one chunk per document with its "
              "response (chat: its last assistant turn) starting at this token index (prompt right before it, "
              "neighbouring documents around it) instead of back-to-back packing. Prompt-completion RLVR sets "
              "rollout.first_anchor to the same index; null = ordinary packing.", minimum=1)
    cache_dir: Optional[str] = setting(
        None, "Where raw input (every kind but indexed) is kept once tokenized, and the chunk indices, each under a "
              "key of what determines it (input files, tokenizer, settings), so that no restart and no other process "
              "tokenizes or indexes again. null: $EBFT_CACHE_DIR/data (default ~/.cache/ebft_megatron/data). "
              "A corpus prepared by "
              "tools/prepare_data.py keeps its chunk indices next to it (PREFIX.chunk_index/) when its folder is "
              "writable. Put it on a file system every node sees, or each node builds its own.",
        expect="a folder path")

    def check(self) -> None:
        for name in ("path", "eval_path", "cache_dir"):
            if getattr(self, name) == "":
                raise DataError(f"data.{name}: expected a {'folder' if name == 'cache_dir' else 'file or folder'} "
                                "path, got ''")
        if self.path is None and self.kind != "code":
            raise DataError(f"data.path: required for kind={self.kind} (only kind=code defaults to the Python "
                            "standard library)")
        if self.kind == "translation":
            self._check_translation()
        if not self.extensions:
            raise DataError(f"data.extensions: expected a list of file suffixes such as ['.py'], got {self.extensions!r}")
        for suffix in self.extensions:
            if not suffix.startswith(".") or len(suffix) < 2:
                raise DataError(f"data.extensions: {suffix!r} is not a file suffix; write it with its dot, e.g. '.py'")
        if self.response_anchor is not None and self.kind not in RESPONSE_KINDS + ("indexed",):
            raise DataError(f"data.response_anchor: needs prompt/response documents (kind jsonl, translation or "
                            f"chat, or an indexed corpus prepared from them), not kind={self.kind}")

    def _check_translation(self) -> None:
        for name in ("source_lang", "target_lang"):
            if not getattr(self, name).strip():
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

    def resolved_path(self) -> Path:
        if self.path is None:
            return python_stdlib_dir()
        return Path(self.path)

    def resolved_exclude_dirs(self) -> list[str]:
        if self.exclude_dirs is not None:
            return list(self.exclude_dirs)
        return list(STDLIB_EXCLUDED_DIRS) if self.path is None else []

    def translation_format(self) -> TranslationFormat:
        return TranslationFormat(self.source_key, self.target_key, self.source_lang, self.target_lang, self.template)
