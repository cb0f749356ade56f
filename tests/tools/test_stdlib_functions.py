"""Docstring -> body pairs from Python source."""

import textwrap

from tools.preparation.stdlib_functions import ExtractionReport, extract, function_pairs

SOURCE = textwrap.dedent('''
    import os

    def add(a, b):
        """Add two numbers."""
        total = a + b
        return total

    def bare(x):
        return x

    class Stack:
        @staticmethod
        def make(items):
            """A stack of ``items``.

            Keeps their order.
            """
            stack = Stack()
            stack.items = list(items)
            return stack

        def tiny(self):
            """Too short."""
            return 1
''')


def test_prompts_are_signature_and_docstring_responses_the_rest():
    report = ExtractionReport()
    pairs = function_pairs(SOURCE, "m.py", report)
    assert [p.name for p in pairs] == ["add", "Stack.make"]
    add, make = pairs
    assert add.prompt == 'def add(a, b):\n    """Add two numbers."""\n'
    assert add.response == "    total = a + b\n    return total\n"
    assert make.prompt.startswith("    @staticmethod\n    def make(items):") and make.prompt.endswith('    """\n')
    assert make.response == "        stack = Stack()\n        stack.items = list(items)\n        return stack\n"
    assert (add.prompt + add.response) in SOURCE and (make.prompt + make.response) in SOURCE
    assert report.skipped == {"no docstring": 1, "body too short": 1}


def test_extract_walks_a_tree_and_counts_what_it_skips(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text(SOURCE)
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "t.py").write_text(SOURCE)  # test suites are left out
    (tmp_path / "broken.py").write_text("def f(:\n")
    pairs, report = extract(tmp_path)
    assert [(p.path, p.name) for p in pairs] == [("pkg/a.py", "add"), ("pkg/a.py", "Stack.make")]
    assert report.files == 2 and report.functions == 2 and report.skipped["file does not parse"] == 1


def test_the_real_standard_library_yields_thousands_of_pairs():
    from ebft_megatron.data.sources import python_stdlib_dir

    pairs, report = extract(python_stdlib_dir())
    assert report.files > 500 and len(pairs) > 2000
    assert all(p.prompt.strip() and p.response.strip() for p in pairs[:200])


def test_the_tool_writes_file_disjoint_splits_and_refuses_to_overwrite(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    source = tmp_path / "src"
    source.mkdir()
    for i in range(40):
        (source / f"m{i}.py").write_text(SOURCE)
    out = tmp_path / "out"
    cmd = [sys.executable, str(root / "tools" / "prepare_stdlib_functions.py"), "--output", str(out),
           "--source", str(source), "--validation-fraction", "0.2", "--test-fraction", "0.2"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    splits = {name: [json.loads(line) for line in (out / f"{name}.jsonl").read_text().splitlines()]
              for name in ("train", "validation", "test")}
    files = {name: {record["path"] for record in records} for name, records in splits.items()}
    assert sum(len(r) for r in splits.values()) == 80 and all(files.values())
    assert not (files["train"] & files["validation"]) and not (files["train"] & files["test"])
    assert splits["train"][0]["question"].startswith("def add(a, b):")
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and again.stderr.startswith("error:") and "already exist" in again.stderr
