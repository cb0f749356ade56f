"""HumanEval: the 164 problems load from the installed package, canonical solutions pass and
wrong ones fail in the sandbox, completions are cut at the stop sequences, and pass@k is the
unbiased estimator (checked against counting every draw of k samples)."""

import itertools
import math
from fractions import Fraction

import pytest

from ebft_megatron.evaluation.humaneval import (
    STOP_SEQUENCES,
    evaluate_humaneval,
    load_problems,
    pass_at_k,
    program_for,
    truncate_completion,
)
from ebft_megatron.evaluation.sandbox import SandboxLimits

GENEROUS = SandboxLimits(timeout_s=60.0)  # the timeout is not the point here


@pytest.fixture(scope="module")
def problems():
    return load_problems()


def test_the_164_problems_load_from_the_installed_package(problems):
    assert [p.task_id for p in problems] == [f"HumanEval/{i}" for i in range(164)]
    for problem in problems:
        assert f"def {problem.entry_point}(" in problem.prompt
        assert "def check(candidate)" in problem.test
        assert problem.canonical_solution.strip()


# Junk that a model may write after the function; each piece would make the program fail if it
# were not cut off at its stop sequence.
JUNK_AFTER_THE_FUNCTION = [
    "\ndef helper(:\n    pass\n",
    "\nclass Broken(:\n    pass\n",
    "\nif __name__ == '__main__':\n    raise SystemExit(3)\n",
    "\nprint(undefined_name)\n",
    "\n# and now something else\nraise AssertionError('not cut')\n",
]


def test_canonical_solutions_pass_and_wrong_ones_fail(problems):
    # ten problems across the set, among them HumanEval/162 (imports hashlib in its body)
    chosen = [problems[i] for i in (0, 18, 36, 54, 72, 90, 108, 126, 144, 162)]
    by_prompt = {p.prompt: p for p in chosen}
    calls = []

    def generate(prompt, num_samples):
        calls.append(num_samples)
        problem = by_prompt[prompt]
        junk = JUNK_AFTER_THE_FUNCTION[len(calls) % len(JUNK_AFTER_THE_FUNCTION)]
        return [problem.canonical_solution + junk, "    return None\n"]

    report = evaluate_humaneval(generate, chosen, samples_per_problem=2, ks=(1, 2), limits=GENEROUS)
    assert calls == [2] * len(chosen)
    assert [o.task_id for o in report.problems] == [p.task_id for p in chosen]
    for problem, outcome in zip(chosen, report.problems):
        correct, wrong = outcome.results
        assert correct.passed, (problem.task_id, correct.details, correct.output[-2000:])
        assert outcome.completions[0] == problem.canonical_solution  # the junk was cut off
        assert (wrong.passed, wrong.status) == (False, "failed"), problem.task_id
    assert report.pass_at_k == {1: 0.5, 2: 1.0}
    assert report.status_counts() == {"passed": 10, "failed": 10, "timeout": 0, "error": 0}
    assert report.metrics()["humaneval/pass@1"] == 0.5


def test_hostile_and_hanging_completions_count_as_not_passed(problems, tmp_path):
    problem = problems[0]
    sentinel = tmp_path / "sentinel.txt"
    sentinel.write_text("keep me")
    samples = [
        problem.canonical_solution,
        "    while True:\n        pass\n",
        f"    import os\n    os.remove({str(sentinel)!r})\n    return True\n",
    ]
    report = evaluate_humaneval(lambda prompt, n: samples, [problem], samples_per_problem=3,
                                ks=(1, 2, 3), limits=SandboxLimits(timeout_s=3.0), workers=2)
    statuses = [result.status for result in report.problems[0].results]
    assert statuses == ["passed", "timeout", "failed"]
    assert sentinel.read_text() == "keep me"
    assert report.pass_at_k == pytest.approx({1: 1 / 3, 2: 2 / 3, 3: 1.0})


def test_truncation_cuts_at_the_earliest_stop_sequence():
    body = "    x = 1\n    # an indented comment stays\n    def inner():\n        return x\n    return inner()\n"
    assert truncate_completion(body) == body
    assert truncate_completion(body + "\nprint(f(1))\n# done\n") == body
    assert truncate_completion(body + "\n# note\ndef g():\n") == body
    assert truncate_completion("\ndef at_once():\n") == ""
    assert truncate_completion("abc", stop_sequences=()) == "abc"
    assert set(STOP_SEQUENCES) == {"\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#"}


def test_the_program_is_prompt_completion_tests_and_check(problems):
    problem = problems[0]
    program = program_for(problem, problem.canonical_solution)
    assert program.startswith(problem.prompt + problem.canonical_solution)
    assert problem.test in program
    assert program.rstrip().endswith(f"check({problem.entry_point})")


def brute_force_pass_at_k(n, c, k):
    """The fraction of all k-subsets of n samples (the first c correct) holding a correct one."""
    draws = list(itertools.combinations(range(n), k))
    return Fraction(sum(any(i < c for i in draw) for draw in draws), len(draws))


def test_pass_at_k_equals_the_count_over_every_draw():
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert math.isclose(pass_at_k(n, c, k), brute_force_pass_at_k(n, c, k), rel_tol=1e-12,
                                    abs_tol=1e-15), (n, c, k)


def test_pass_at_k_is_exact_and_finite_for_large_n():
    for n, c, k in [(200, 3, 100), (1000, 1, 1), (1000, 999, 10), (500, 0, 250), (300, 7, 299)]:
        exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
        assert math.isclose(pass_at_k(n, c, k), float(exact), rel_tol=1e-9, abs_tol=1e-12), (n, c, k)
    assert pass_at_k(10, 1, 1) == pytest.approx(0.1)  # pass@1 is the fraction correct


@pytest.mark.parametrize("n, c, k", [(3, 4, 1), (3, -1, 1), (3, 1, 0), (3, 1, 4)])
def test_pass_at_k_refuses_impossible_counts(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_evaluate_refuses_bad_requests(problems):
    with pytest.raises(ValueError, match="every k"):
        evaluate_humaneval(lambda prompt, n: ["    pass\n"] * n, problems[:1], samples_per_problem=2, ks=(1, 5))
    with pytest.raises(ValueError, match="returned 1 completions"):
        evaluate_humaneval(lambda prompt, n: ["    pass\n"], problems[:1], samples_per_problem=2, ks=(1,))
