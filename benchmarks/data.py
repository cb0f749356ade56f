#!/usr/bin/env python
"""Data loading at fine-tuning scale: the chunk index's build time, the time from a process's start
to its first micro-batch once the index exists, and each process's peak resident set, for 1 and 2
processes, on synthetic indexed corpora of a large size (default 500M tokens) and of 1% of it, so
that memory's growth with the corpus shows; and today's path before this one (every chunk packed in
memory, ``dataset.load_chunks``) at the sizes it can load.

  python benchmarks/data.py                        # 500M and 5M tokens, and 20M; today's path at 20M and 5M
  python benchmarks/data.py --tokens 100000000 --json out.json

The corpora are made here, in a temporary folder that is removed at the end (--workdir: where it
goes; the 500M-token corpus takes 1 GB there): documents of log-normal lengths (median 600 tokens,
8 to 32768), token ids drawn from a vocabulary of --vocab ids (default SmolLM2's 49152) with the
low ids more frequent, as a BPE vocabulary's are, written by the project's own writer as
``tools/prepare_data.py`` writes them.

Each configuration runs in its own processes, started together, as torchrun starts the ranks of a
node: ``build`` with no chunk index yet (one process builds it, the others wait), then ``first``
with the index in place. A process imports what the trainer has imported before it reads data
(torch, megatron-core), then notes its resident set ("before"), opens the training split as the
trainer does (``training.builder.chunks``: ``data.mapped.open_chunks``) and reads its first
micro-batch of the first step (``dataset.ChunkLoader``, 16 chunks a step, one a micro-batch). Its
peak is the kernel's high-water mark of its resident set (VmHWM, reset after the imports), which
counts the pages of the memory-mapped files it touched. "today" runs ``load_chunks`` in one process.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MB = 1 << 20
CHUNKS_PER_STEP = 16
SMALL_NAME = "1%"


def resident(field: str) -> int:
    """This process's VmRSS or VmHWM in bytes."""
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM back to the current resident set
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# The synthetic corpus


def make_corpus(prefix: Path, tokens: int, vocab: int, seed: int = 0) -> dict:
    """An indexed corpus of ``tokens`` tokens at ``prefix``; its document count and size."""
    import numpy as np

    from ebft_megatron.data.indexed import IndexedCorpusInfo, IndexedCorpusWriter
    from ebft_megatron.data.sources import split_hash

    rng = np.random.default_rng(seed)
    info = IndexedCorpusInfo(tokenizer=f"synthetic vocabulary of {vocab} (benchmarks/data.py)", vocab_size=vocab,
                             eos_id=0, kind="synthetic", source="benchmarks/data.py")
    written = 0
    with IndexedCorpusWriter(prefix, info) as out:
        while written < tokens:
            lengths = np.clip(rng.lognormal(np.log(600), 1.0, 4096).astype(np.int64), 8, 32768)
            ids = (vocab * rng.random(int(lengths.sum())) ** 2.5).astype(np.int64)  # low ids are frequent
            for piece in np.split(ids, np.cumsum(lengths)[:-1]):
                piece = piece[:tokens - written]
                if not len(piece):
                    break
                out.add(piece, split_hash(f"document {info.documents}"))
                written += len(piece)
    size = sum(Path(f"{prefix}{suffix}").stat().st_size for suffix in (".bin", ".idx", ".keys.npy"))
    return {"tokens": info.tokens, "documents": info.documents, "bytes": size}


# ---------------------------------------------------------------------------------------------
# One process of a configuration


class SyntheticTokenizer:
    """What the data path asks of a tokenizer, for the synthetic vocabulary."""

    def __init__(self, vocab: int):
        self.path, self.vocab_size, self.eos_id = "synthetic", vocab, 0


def worker(args) -> None:
    from ebft_megatron.cli import quiet_imports

    quiet_imports()
    import megatron.core.datasets.indexed_dataset  # noqa: F401  (imported by the trainer before its data)
    import torch

    from ebft_megatron.data.config import DataConfig
    from ebft_megatron.data.dataset import ChunkLoader, load_chunks
    from ebft_megatron.data.mapped import open_chunks

    imported, processes = time.time(), args.processes[0]
    reset = reset_peak()
    before = resident("VmRSS")
    config = DataConfig(kind="indexed", path=args.prefix, validation_fraction=0.01, cache_dir=args.cache)
    tokenizer = SyntheticTokenizer(args.vocab)
    started = time.perf_counter()
    if args.worker == "today":
        chunks, built = load_chunks(config, tokenizer, args.chunk_len), ["in memory"]
    else:
        chunks = open_chunks(config, tokenizer, args.chunk_len)
        built = list(chunks.built)
    opened = time.perf_counter()
    per_step = min(CHUNKS_PER_STEP, len(chunks.tokens) // processes * processes)  # a tiny corpus: fewer
    loader = ChunkLoader(len(chunks.tokens), per_step, args.rank, processes, seed=1)
    picked = torch.as_tensor(loader.next_indices()[:1], dtype=torch.long)  # the first micro-batch, as
    batch = (chunks.tokens[picked], chunks.lengths[picked], chunks.doc_ids[picked])  # Trainer._micro_batches
    first = time.time()
    peak = resident("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = {"mode": args.worker, "rank": args.rank, "processes": processes, "built": built,
              "chunks": len(chunks.tokens), "batch_tokens": int(batch[1].sum()), "import_s": imported - args.launched,
              "open_s": opened - started, "first_batch_s": first - args.launched, "before_rss": before,
              "peak_rss": peak, "growth": peak - before}
    Path(args.out).write_text(json.dumps(result))


def run_configuration(mode: str, prefix: Path, cache: Path, processes: int, args, folder: Path) -> list[dict]:
    """``processes`` worker processes of ``mode`` started together; their figures."""
    outs = [folder / f"{mode}-{processes}-{rank}.json" for rank in range(processes)]
    launched = time.time()
    running = [subprocess.Popen([sys.executable, __file__, "--worker", mode, "--prefix", str(prefix),
                                 "--cache", str(cache), "--rank", str(rank), "--processes", str(processes),
                                 "--chunk-len", str(args.chunk_len), "--vocab", str(args.vocab),
                                 "--launched", repr(launched), "--out", str(out)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for rank, out in enumerate(outs)]
    for process in running:
        output = process.communicate()[0]
        if process.returncode != 0:
            raise SystemExit(f"{mode} worker failed (exit {process.returncode}):\n{output[-3000:]}")
    return [json.loads(out.read_text()) for out in outs]


def measure(name: str, prefix: Path, args, folder: Path) -> dict:
    """Build with no index and first batch with it, for each process count, in fresh processes."""
    found = {}
    for processes in args.processes:
        shutil.rmtree(f"{prefix}.chunk_index", ignore_errors=True)
        shutil.rmtree(folder / "cache", ignore_errors=True)
        build = run_configuration("build", prefix, folder / "cache", processes, args, folder)
        builders = [figures for figures in build if "indexed" in figures["built"]]
        if len(builders) != 1:
            raise SystemExit(f"{name}, {processes} processes: {len(builders)} processes built the index, not 1")
        first = run_configuration("first", prefix, folder / "cache", processes, args, folder)
        if any(figures["built"] for figures in first):
            raise SystemExit(f"{name}, {processes} processes: the index was built again")
        found[processes] = {"index_build_s": builders[0]["open_s"], "build": build, "first": first}
        say(f"{name}: {processes} process(es): index built in {builders[0]['open_s']:.2f}s; first batch after "
            f"{max(f['first_batch_s'] for f in first):.2f}s; peak {max(f['peak_rss'] for f in build + first) / MB:.0f}"
            f" MB, {max(f['growth'] for f in build + first) / MB:.0f} MB over the size before data")
    return found


def say(message: str) -> None:
    print(f"[data benchmark] {message}", file=sys.stderr, flush=True)


def table(results: dict) -> str:
    rows = ["| corpus | path | processes | index build | first batch from start (after the imports) | peak RSS per "
            "process | over its size before data |", "|---|---|---|---|---|---|---|"]

    def first_batch(runs: list) -> str:
        slowest = max(runs, key=lambda run: run["first_batch_s"])
        return f"{slowest['first_batch_s']:.2f} s ({slowest['first_batch_s'] - slowest['import_s']:.3f} s)"

    for name, entry in results["corpora"].items():
        size = f"{name}: {entry['tokens'] / 1e6:.1f}M tokens, {entry['documents']} documents"
        for processes, figures in entry.get("mapped", {}).items():
            every = figures["build"] + figures["first"]
            rows.append(f"| {size} | memory map | {processes} | {figures['index_build_s']:.2f} s | "
                        f"{first_batch(figures['first'])} | {max(f['peak_rss'] for f in every) / MB:.0f} MB | "
                        f"{max(f['growth'] for f in every) / MB:.0f} MB |")
        if "today" in entry:
            today = entry["today"]
            rows.append(f"| {size} | today (in memory) | 1 | - | {first_batch([today])} | "
                        f"{today['peak_rss'] / MB:.0f} MB | {today['growth'] / MB:.0f} MB |")
    return "\n".join(rows)


def verdict(results: dict) -> list[str]:
    """The issue's targets, checked on the large corpus and the 1% one."""
    corpora = results["corpora"]
    large, small = corpora.get("large"), corpora.get(SMALL_NAME)
    lines = []
    if not large or "mapped" not in large:
        return lines
    for processes, figures in large["mapped"].items():
        every = figures["build"] + figures["first"]
        first = max(f["first_batch_s"] for f in figures["first"])
        growth = max(f["growth"] for f in every)
        lines.append(f"{processes} process(es): first batch {first:.2f}s (target <= 10), index build "
                     f"{figures['index_build_s']:.2f}s (target <= 180), {growth / MB:.0f} MB over the size before data "
                     "(target <= 300)")
        if small and processes in small.get("mapped", {}):
            other = small["mapped"][processes]
            difference = (max(f["peak_rss"] for f in every)
                          - max(f["peak_rss"] for f in other["build"] + other["first"]))
            lines.append(f"{processes} process(es): peak {difference / MB:+.0f} MB against the 1% corpus (target "
                         "within 50)")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=500_000_000, help="the large corpus (default 500M tokens)")
    parser.add_argument("--small-fraction", type=float, default=0.01,
                        help="the small corpus, as a fraction of the large one (default 0.01)")
    parser.add_argument("--today-tokens", type=int, default=20_000_000,
                        help="also a corpus of this size, measured both ways (default 20M, a size today's path can "
                             "load; 0: none). Today's path runs on it and on the small corpus")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="process counts (default 1 2)")
    parser.add_argument("--chunk-len", type=int, default=1024, help="P (default 1024)")
    parser.add_argument("--vocab", type=int, default=49152, help="vocabulary size (default 49152, SmolLM2's)")
    parser.add_argument("--workdir", default=None, help="where the temporary folder goes (default: the system's)")
    parser.add_argument("--json", help="also write the figures here")
    for name in ("worker", "prefix", "cache", "out"):  # one worker process
        parser.add_argument(f"--{name}", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--launched", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    folder = Path(tempfile.mkdtemp(prefix="ebft_data_benchmark_", dir=args.workdir))
    results = {"settings": {key: getattr(args, key) for key in ("tokens", "small_fraction", "today_tokens",
                                                                 "processes", "chunk_len", "vocab")},
               "corpora": {}}
    try:
        sizes = {"large": args.tokens, SMALL_NAME: max(int(args.tokens * args.small_fraction), 1)}
        if args.today_tokens:
            sizes["today's size"] = args.today_tokens
        for name, tokens in sizes.items():
            prefix = folder / name.replace("%", "pct").replace("'", "").replace(" ", "_") / "corpus"
            prefix.parent.mkdir()
            started = time.perf_counter()
            entry = results["corpora"][name] = make_corpus(prefix, tokens, args.vocab)
            say(f"{name}: made {entry['tokens']} tokens in {entry['documents']} documents "
                f"({entry['bytes'] / MB:.0f} MB) in {time.perf_counter() - started:.0f}s")
            entry["mapped"] = measure(name, prefix, args, folder)
            if name != "large":
                entry["today"] = run_configuration("today", prefix, folder / "cache", 1, args, folder)[0]
                say(f"{name}: today's path: first batch after {entry['today']['first_batch_s']:.2f}s, peak "
                    f"{entry['today']['peak_rss'] / MB:.0f} MB")
            shutil.rmtree(prefix.parent)  # keep at most one large corpus on disk
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    results["table"] = table(results)
    results["verdict"] = verdict(results)
    print(results["table"])
    for line in results["verdict"]:
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
