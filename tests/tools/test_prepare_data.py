"""tools/prepare_data.py end to end, in a subprocess as a user runs it."""

import os
import subprocess
import sys
from pathlib import Path

from ebft_megatron.data.config import DataConfig
from ebft_megatron.data.dataset import load_chunks
from tests.data.helpers import write_code_tree

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "prepare_data.py"


def run_tool(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=120)


def test_prepare_code_folder_then_train_from_it(tmp_path, tokenizer, tokenizer_dir):
    tree = tmp_path / "tree"
    write_code_tree(tree, 12)
    (tree / "__init__.py").write_text("")
    out = tmp_path / "out"
    out.mkdir()
    result = run_tool("--kind", "code", "--input", tree, "--tokenizer", tokenizer_dir, "--output", out / "corpus",
                      "--workers", "2")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["corpus.bin", "corpus.idx", "corpus.json", "corpus.keys.npy"]
    assert "wrote" in result.stderr and "12 documents" in result.stderr and "1 empty file" in result.stderr
    assert "files/s" in result.stderr  # the progress line

    raw = DataConfig(kind="code", path=str(tree), validation_fraction=0.2)
    indexed = DataConfig(kind="indexed", path=str(out / "corpus"), validation_fraction=0.2)
    for split in ("train", "validation"):
        a, b = load_chunks(raw, tokenizer, 20, split=split), load_chunks(indexed, tokenizer, 20, split=split)
        assert a.tokens.equal(b.tokens) and a.doc_ids.equal(b.doc_ids) and a.lengths.equal(b.lengths)



def test_bad_input_is_one_error_line_exit_2_and_no_files(tmp_path, tokenizer_dir):
    data = tmp_path / "qa.jsonl"
    data.write_text('{"question": "q", "answer": "a"}\n{"question": "q2"}\n')
    out = tmp_path / "out"
    out.mkdir()
    result = run_tool("--kind", "jsonl", "--input", data, "--tokenizer", tokenizer_dir, "--output", out / "corpus",
                      "--quiet")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0] == (f"error: {data}:2: no key 'answer' (keys present: 'question'); fix the line or set "
                        "--response-key to the right key, or pass --skip-bad to skip such inputs")
    assert list(out.iterdir()) == []  # no output, no temporary files


def test_help_explains_every_flag():
    result = run_tool("--help")
    assert result.returncode == 0
    for flag in ("--kind", "--input", "--tokenizer", "--output", "--workers", "--extensions", "--exclude-dirs",
                 "--prompt-key", "--response-key", "--source-key", "--target-key", "--source-lang", "--target-lang",
                 "--template", "--skip-bad", "--max-documents", "--quiet"):
        assert flag in result.stdout
    assert result.stdout.count("default") >= 8
