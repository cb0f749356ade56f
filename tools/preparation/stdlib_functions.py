"""Python function bodies with their docstrings as prompts, from the standard library's source
(the replication data): prompt = the ``def`` line(s) and the docstring, response =
the rest of the function, both as written in the file (indentation kept).

Functions are taken from top-level definitions and class methods; nested functions stay part of
their parent. A function qualifies when it has a docstring and at least ``min_body_lines`` lines
after it. Files that do not parse (the stdlib ships a few test fixtures with bad syntax) are
counted and skipped.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator


@dataclass
class FunctionPair:
    path: str  # relative to the root folder
    name: str  # qualified: Class.method or function
    prompt: str
    response: str


@dataclass
class ExtractionReport:
    files: int = 0
    functions: int = 0
    skipped: dict = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


def _definitions(tree: ast.Module) -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    yield f"{node.name}.{item.name}", item


def function_pairs(source: str, path: str, report: ExtractionReport, min_body_lines: int = 2) -> list[FunctionPair]:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        report.skip("file does not parse")
        return []
    lines = source.splitlines(keepends=True)
    pairs = []
    for name, node in _definitions(tree):
        first = node.body[0]
        has_docstring = (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                         and isinstance(first.value.value, str))
        if not has_docstring:
            report.skip("no docstring")
            continue
        if len(node.body) < 2:
            report.skip("empty body")
            continue
        start = (node.decorator_list[0].lineno if node.decorator_list else node.lineno) - 1
        body_start, end = first.end_lineno, node.end_lineno
        if end - body_start < min_body_lines:
            report.skip("body too short")
            continue
        pairs.append(FunctionPair(path, name, "".join(lines[start:body_start]), "".join(lines[body_start:end])))
    return pairs


def extract(root: str | Path, min_body_lines: int = 2) -> tuple[list[FunctionPair], ExtractionReport]:
    """All qualifying functions under ``root`` (``*.py``, sorted, test suites and site-packages left out)."""
    root = Path(root)
    report = ExtractionReport()
    excluded = {"site-packages", "test", "tests", "idle_test", "__pycache__"}
    pairs = []
    for path in sorted(root.rglob("*.py")):
        if excluded & set(path.relative_to(root).parts[:-1]):
            continue
        try:
            source = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            report.skip("unreadable file")
            continue
        report.files += 1
        pairs.extend(function_pairs(source, str(path.relative_to(root)), report, min_body_lines))
    report.functions = len(pairs)
    return pairs, report
