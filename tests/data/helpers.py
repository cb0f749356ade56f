"""Small input writers for the data tests."""

from __future__ import annotations

import json
from pathlib import Path

EOS_TEXT = "<|endoftext|>"


def write_lines(path: Path, lines: list[str | bytes]) -> Path:
    data = b"".join((line if isinstance(line, bytes) else line.encode("utf-8")) + b"\n" for line in lines)
    path.write_bytes(data)
    return path


def jsonl_line(**record) -> str:
    return json.dumps(record)


def write_code_tree(root: Path, count: int, prefix: str = "mod") -> list[str]:
    """``count`` small Python files spread over nested folders; returns their relative paths."""
    relative = []
    for i in range(count):
        rel = Path(f"pkg{i % 3}") / (f"sub{i % 2}" if i % 4 else "") / f"{prefix}{i}.py"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(f"def f{i}(a):\n    return a + {i}\n")
        relative.append(rel.as_posix())
    return relative


def documents_of(chunks, tokenizer) -> list[str]:
    """The documents' texts back from packed chunks (split on the EOS between documents)."""
    ids = [int(t) for row, length in zip(chunks.tokens, chunks.lengths) for t in row[: int(length)]]
    return tokenizer.decode(ids).split(EOS_TEXT)
