"""benchmarks/data.py at a tiny size, so that a broken benchmark fails here: it makes its corpora,
runs every configuration in its own processes (two started together: one builds the chunk index,
the other waits and reads it), runs today's in-memory path, removes its folder, and writes its
figures. No timing or memory figure is judged here."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_data_benchmark_runs_at_a_tiny_size(tmp_path):
    out = tmp_path / "data.json"
    work = tmp_path / "work"
    work.mkdir()
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "data.py"), "--tokens", "60000",
                             "--small-fraction", "0.1", "--today-tokens", "0", "--processes", "2", "--chunk-len", "64",
                             "--workdir", str(work), "--json", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    figures = json.loads(out.read_text())
    assert list(work.iterdir()) == []  # the corpora are gone
    large, small = figures["corpora"]["large"], figures["corpora"]["1%"]
    assert large["tokens"] == 60000 and small["tokens"] == 6000 and large["documents"] > small["documents"] > 1
    for corpus in (large, small):
        runs = corpus["mapped"]["2"]
        assert [len(runs["build"]), len(runs["first"])] == [2, 2]
        assert sorted(tuple(run["built"]) for run in runs["build"]) == [(), ("indexed",)]  # one built, one waited
        assert all(run["built"] == [] for run in runs["first"])  # then every process read it
        for run in runs["build"] + runs["first"]:
            assert run["peak_rss"] >= run["before_rss"] > 0 and run["first_batch_s"] > run["import_s"] > 0
            assert 0 < run["batch_tokens"] <= 64
    assert small["today"]["built"] == ["in memory"] and small["today"]["chunks"] == small["mapped"]["2"]["first"][0][
        "chunks"]
    assert "| large: 0.1M tokens" in result.stdout and "today (in memory)" in result.stdout
    assert len(figures["verdict"]) == 2
