"""Unit tests for generated function bodies: the doctest examples in standard-library docstrings.

The replication's verifiable reward (RLVR) and its in-domain downstream metric. A task
is a standard-library function or method whose docstring holds ``>>>`` examples; the prompt is a
one-line header naming it, then its ``def`` line(s) and docstring, exactly as in the file::

    # statistics:median
    def median(data):
        \"\"\"Return the median (middle value) of numeric data.
        ...
        >>> median([1, 3, 5])
        3
        \"\"\"

The model writes the body. The program run in the sandbox imports the function's module, puts the
generated function in place of the original (for a method: on its class, compiled inside a class
of the same name so that private names mangle the same way) and runs the docstring's examples
with the module's globals. Every example is one unit test; a task passes when all of them do.
Tasks are kept only when the original body passes its own examples in the sandbox.

The header makes a prompt self-describing, so a reward can score a rollout from the token ids
alone (``UnitTestReward``), with no side table from chunks back to tasks.
"""

from __future__ import annotations

import dataclasses
import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

from ebft_megatron.evaluation.humaneval import checked_ks, mean_pass_at_k, pass_at_k
from ebft_megatron.evaluation.sandbox import SandboxLimits, run_python
from ebft_megatron.evaluation.statistics import standard_error

# A stdlib module import can be slow on a loaded machine; the examples themselves are tiny.
UNIT_TEST_LIMITS = SandboxLimits(timeout_s=15.0, memory_mb=1024)
HEADER = re.compile(r"^# ([A-Za-z_][\w.]*):([A-Za-z_][\w.]*)$", re.MULTILINE)
_RESULT_PREFIX = "UNIT-TESTS "


@dataclasses.dataclass(frozen=True)
class Task:
    module: str  # importable name, e.g. importlib.metadata._itertools
    qualname: str  # function or Class.method
    prompt: str  # header + def line(s) + docstring, ending with a newline
    response: str = ""  # the original body (empty when only the prompt is known)


@dataclasses.dataclass(frozen=True)
class TestOutcome:
    attempted: int  # examples run (0: the program never got to them)
    failed: int
    status: str  # sandbox status: passed, failed, timeout, error
    details: str = ""

    @property
    def fraction_passed(self) -> float:
        return (self.attempted - self.failed) / self.attempted if self.attempted else 0.0

    @property
    def passed(self) -> bool:
        return self.attempted > 0 and self.failed == 0


def module_name(path: str) -> str:
    """``importlib/metadata/_itertools.py`` -> ``importlib.metadata._itertools``."""
    parts = path[:-3].split("/") if path.endswith(".py") else path.split("/")
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def header(module: str, qualname: str) -> str:
    return f"# {module}:{qualname}\n"


def task_from_prompt(text: str) -> Optional[Task]:
    """The task whose prompt ends ``text`` (the last header in it and everything after), or None
    when ``text`` holds no header."""
    matches = list(HEADER.finditer(text))
    if not matches:
        return None
    last = matches[-1]
    return Task(last.group(1), last.group(2), text[last.start():])


def _definition_indent(prompt: str) -> int:
    for line in prompt.splitlines()[1:]:
        stripped = line.lstrip()
        if stripped.startswith(("def ", "async def ", "@")):
            return len(line) - len(stripped)
    return 0


def truncate_body(prompt: str, completion: str) -> str:
    """The completion up to where the function ends: the first non-blank line indented no deeper
    than its ``def`` (the model went on to write the next definition or top-level code)."""
    indent = _definition_indent(prompt)
    kept = []
    for line in completion.splitlines(keepends=True):
        stripped = line.strip()
        if stripped and len(line) - len(line.lstrip()) <= indent:
            break
        kept.append(line)
    return "".join(kept)


def program_for(task: Task, body: str) -> str:
    """A program that runs the task's examples against prompt + body and prints the counts."""
    source = task.prompt.split("\n", 1)[1] + body  # without the header line
    return f"""\
import doctest, importlib, json, textwrap
module = importlib.import_module({task.module!r})
names = {task.qualname!r}.split(".")
source = textwrap.dedent({source!r})
if len(names) == 1:
    exec(compile(source, "<generated>", "exec"), module.__dict__)
    function = module.__dict__[names[0]]
else:
    owner = getattr(module, names[0])
    wrapper = "class " + names[0] + ":\\n" + textwrap.indent(source, "    ")
    exec(compile(wrapper, "<generated>", "exec"), module.__dict__)
    function = module.__dict__[names[0]].__dict__[names[1]]
    setattr(module, names[0], owner)
    setattr(owner, names[1], function)
docstring = getattr(function, "__func__", function).__doc__ or ""
test = doctest.DocTestParser().get_doctest(docstring, dict(module.__dict__), {task.qualname!r}, None, 0)
runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
result = runner.run(test, out=lambda text: None)
print({_RESULT_PREFIX!r} + json.dumps([result.attempted, result.failed]))
assert result.attempted and not result.failed
"""


def run_unit_tests(task: Task, body: str, limits: SandboxLimits = UNIT_TEST_LIMITS) -> TestOutcome:
    result = run_python(program_for(task, body), limits)
    for line in reversed(result.output.splitlines()):
        if line.startswith(_RESULT_PREFIX):
            attempted, failed = json.loads(line[len(_RESULT_PREFIX):])
            return TestOutcome(attempted, failed, result.status, result.details)
    return TestOutcome(0, 0, result.status, result.details)


def run_many(pairs: Sequence[tuple[Task, str]], workers: int = 2,
             limits: SandboxLimits = UNIT_TEST_LIMITS) -> list[TestOutcome]:
    """(task, body) pairs in sandboxes, ``workers`` at a time, results in input order."""
    if not pairs:
        return []
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="unit-tests") as pool:
        return list(pool.map(lambda pair: run_unit_tests(pair[0], pair[1], limits), pairs))


def candidate_tasks(pairs) -> list[Task]:
    """Tasks from ``tools.preparation.stdlib_functions.FunctionPair``s whose docstring holds examples."""
    tasks = []
    for pair in pairs:
        if ">>>" in pair.prompt:
            module = module_name(pair.path)
            tasks.append(Task(module, pair.name, header(module, pair.name) + pair.prompt, pair.response))
    return tasks


def verified_tasks(tasks: Sequence[Task], workers: int = 2, limits: SandboxLimits = UNIT_TEST_LIMITS) -> list[Task]:
    """The tasks whose original body passes all of its examples in the sandbox (an example that
    needs the network, a subprocess or a file outside the work folder fails there) and an empty
    body (the docstring alone) does not, so that a reward cannot be earned by writing nothing."""
    outcomes = run_many([(task, task.response) for task in tasks], workers, limits)
    passing = [task for task, outcome in zip(tasks, outcomes) if outcome.passed]
    empty = run_many([(task, "") for task in passing], workers, limits)
    return [task for task, outcome in zip(passing, empty) if not outcome.passed]


def read_tasks(path) -> list[Task]:
    """Tasks from a JSONL file written by ``tools/prepare_stdlib_functions.py --unit-tests``."""
    tasks = []
    with open(path) as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                tasks.append(Task(record["module"], record["qualname"], record["question"], record["answer"]))
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(f"{path}:{number}: not a unit-test task record ({err}); write the file with "
                                 "tools/prepare_stdlib_functions.py --unit-tests") from None
    return tasks


class UnitTestReward:
    """RLVR reward: 1 when the rollout's body passes all of its task's examples, else 0.

    Built by the trainer with the run's tokenizer (``objective.reward:
    ebft_megatron.evaluation.unit_tests:UnitTestReward``). For block b the prompt is the decoded
    prefix x[:a_b] after its last EOS (its last header onwards) and the body is the decoded rollout,
    cut where the function ends. A prefix with no header (a prompt longer than the window before
    the anchor) scores 0."""

    def __init__(self, tokenizer, workers: int = 2, limits: SandboxLimits = UNIT_TEST_LIMITS,
                 prompt_tokens: int = 2048):
        self.tokenizer, self.workers, self.limits, self.prompt_tokens = tokenizer, workers, limits, prompt_tokens
        # Decoding the EOS before a document may render it as text on the header's line
        # ("<|endoftext|># module:name"), so the prompt is decoded from after the last EOS.
        self.eos_id = getattr(tokenizer, "eos_id", None)

    def __call__(self, chunk, rollout_tokens, layout):
        import torch

        B, NB, n, _ = rollout_tokens.shape
        jobs, where = [], []
        for row in range(B):
            for block, anchor in enumerate(layout.anchors):
                prefix = chunk[row, max(0, anchor - self.prompt_tokens):anchor].tolist()
                if self.eos_id in prefix:  # the prompt is the document after the last EOS (its header first)
                    prefix = prefix[len(prefix) - prefix[::-1].index(self.eos_id):]
                task = task_from_prompt(self.tokenizer.decode(prefix))
                if task is None:
                    continue
                for sample in range(n):
                    text = self.tokenizer.decode(rollout_tokens[row, block, sample].tolist())
                    jobs.append((task, truncate_body(task.prompt, text)))
                    where.append((row, block, sample))
        rewards = torch.zeros(B, NB, n, dtype=torch.float64)
        for (row, block, sample), outcome in zip(where, run_many(jobs, self.workers, self.limits)):
            rewards[row, block, sample] = float(outcome.passed)
        return rewards


def _task_names(tasks: Sequence[Task]) -> list[str]:
    """"module:qualname" of each task, the same in every evaluation of one task file (a name that
    repeats gets "#2", "#3", ... in order)."""
    seen: dict[str, int] = {}
    names = []
    for task in tasks:
        name = f"{task.module}:{task.qualname}"
        seen[name] = seen.get(name, 0) + 1
        names.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return names


def evaluate_tasks(tasks: Sequence[Task], completions: Sequence[Sequence[str]], ks: Sequence[int] = (1,),
                   workers: int = 2, limits: SandboxLimits = UNIT_TEST_LIMITS, items: Optional[dict] = None) -> dict:
    """pass@k (unbiased) and the mean fraction of examples passed, from ``completions[i]``: the
    samples (text after the prompt) for ``tasks[i]``, each cut where its function ends. An ``items``
    dict gets each task's pass@k under ``unit_tests/pass@k``, keyed "module:qualname"."""
    if len(completions) != len(tasks):
        raise ValueError(f"{len(completions)} completion lists for {len(tasks)} tasks")
    samples = {len(group) for group in completions}
    if len(samples) != 1:
        raise ValueError(f"every task needs the same number of samples, got {sorted(samples)}")
    samples_per_task = samples.pop()
    ks = checked_ks(ks, samples_per_task)  # before any sandbox runs
    jobs = [(task, truncate_body(task.prompt, text)) for task, group in zip(tasks, completions) for text in group]
    outcomes = run_many(jobs, workers, limits)
    correct = [sum(o.passed for o in outcomes[i * samples_per_task:(i + 1) * samples_per_task])
               for i in range(len(tasks))]
    metrics = {f"unit_tests/pass@{k}": value for k, value in mean_pass_at_k(samples_per_task, correct, ks).items()}
    for k in ks:  # what another draw of as many tasks would move the mean by
        per_task = [pass_at_k(samples_per_task, count, k) for count in correct]
        metrics[f"unit_tests/pass@{k}_se"] = standard_error(per_task)
        if items is not None:
            items[f"unit_tests/pass@{k}"] = dict(zip(_task_names(tasks), per_task))
    metrics["unit_tests/fraction_passed"] = sum(o.fraction_passed for o in outcomes) / max(1, len(outcomes))
    metrics["unit_tests/tasks"] = len(tasks)
    return metrics
