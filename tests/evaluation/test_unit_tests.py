"""Unit-test tasks: doctest examples of standard-library functions run against generated bodies
in the sandbox, the RLVR reward built on them and pass@k."""

import sysconfig
from pathlib import Path

import pytest
import torch

from tools.preparation.stdlib_functions import ExtractionReport, function_pairs
from ebft_megatron.evaluation import unit_tests as ut
from ebft_megatron.block_layout import BlockLayout

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def _task(path: str, qualname: str) -> ut.Task:
    pairs = function_pairs((STDLIB / path).read_text(), path, ExtractionReport())
    (task,) = [t for t in ut.candidate_tasks(pairs) if t.qualname == qualname]
    return task


@pytest.fixture(scope="module")
def median_low():
    return _task("statistics.py", "median_low")


@pytest.fixture(scope="module")
def most_common():
    return _task("collections/__init__.py", "Counter.most_common")


def test_names_and_headers():
    assert ut.module_name("importlib/metadata/_itertools.py") == "importlib.metadata._itertools"
    assert ut.module_name("collections/__init__.py") == "collections"
    text = "x = 1\n# a:f\ndef f():\n    pass\n# pkg.mod:Cls.meth\n    def meth(self):\n        '''doc'''\n"
    task = ut.task_from_prompt(text)
    assert (task.module, task.qualname) == ("pkg.mod", "Cls.meth")
    assert task.prompt.startswith("# pkg.mod:Cls.meth\n    def meth")
    assert ut.task_from_prompt("no header here\n") is None


def test_truncate_body_stops_where_the_function_ends(median_low, most_common):
    body = "    return 1\n\n    # still inside\n    x = 2\ndef next_one():\n    pass\n"
    assert ut.truncate_body(median_low.prompt, body) == "    return 1\n\n    # still inside\n    x = 2\n"
    method_body = "        return []\n\n    def other(self):\n        pass\n"
    assert ut.truncate_body(most_common.prompt, method_body) == "        return []\n\n"


@pytest.mark.parametrize("name", ["median_low", "most_common"])
def test_original_passes_and_empty_or_wrong_bodies_fail(name, request):
    task = request.getfixturevalue(name)
    indent = "    " if "." not in task.qualname else "        "
    original, empty, wrong = ut.run_many([(task, task.response), (task, ""), (task, f"{indent}return None\n")])
    assert original.passed and original.attempted >= 1 and original.fraction_passed == 1.0
    assert not empty.passed and not wrong.passed
    assert wrong.attempted == original.attempted and wrong.failed >= 1


def test_a_crashing_or_hostile_body_scores_zero(median_low):
    crash = ut.run_unit_tests(median_low, "    raise SystemExit(0)\n")
    assert not crash.passed
    loop = ut.run_unit_tests(median_low, "    while True:\n        pass\n",
                             ut.SandboxLimits(timeout_s=3.0, memory_mb=1024))
    assert not loop.passed and loop.status == "timeout"


class CharTokenizer:
    """One token per character (ids = code points), enough to carry a prompt through a chunk; id 0
    is EOS and decodes to text, as byte-level BPE tokenizers render their special tokens."""

    eos_id = 0

    def decode(self, ids):
        return "".join("<|endoftext|>" if i == self.eos_id else chr(i) for i in ids)

    def encode(self, text):
        return [ord(c) for c in text]


def test_reward_scores_each_rollout_from_the_chunk_alone(median_low):
    tokenizer = CharTokenizer()
    prompt = tokenizer.encode("filler text") + [tokenizer.eos_id] + tokenizer.encode(median_low.prompt)
    good = tokenizer.encode(median_low.response)
    bad = tokenizer.encode("    return 0\n")
    half = tokenizer.encode("    return len(data)\n")  # passes one of the two examples: still 0
    G = max(len(good), len(bad), len(half)) + 1
    pad = lambda ids: ids + tokenizer.encode("\n") * (G - len(ids))  # noqa: E731
    layout = BlockLayout(chunk_len=len(prompt) + G, first_anchor=len(prompt), stride=1, rollout_len=G, num_samples=3)
    chunk = torch.tensor([prompt + pad(good), tokenizer.encode("#" * len(prompt)) + pad(good)])
    rollouts = torch.tensor([[[pad(good), pad(bad), pad(half)]], [[pad(good), pad(good), pad(good)]]])
    rewards = ut.UnitTestReward(tokenizer)(chunk, rollouts, layout)
    assert rewards.shape == (2, 1, 3)
    assert rewards[0, 0].tolist() == [1.0, 0.0, 0.0]
    assert rewards[1].abs().sum() == 0  # no header before the anchor: nothing to test against


def test_pass_at_k_from_completions(median_low):
    metrics = ut.evaluate_tasks([median_low], [[median_low.response, "    return 0\n"]], ks=(1, 2))
    assert metrics["unit_tests/pass@1"] == pytest.approx(0.5)
    assert metrics["unit_tests/pass@2"] == pytest.approx(1.0)
    assert metrics["unit_tests/tasks"] == 1
    items = {}
    two = ut.evaluate_tasks([median_low, median_low], [[median_low.response] * 2, ["    return 0\n"] * 2], ks=(1,),
                            items=items)
    assert two["unit_tests/pass@1"] == pytest.approx(0.5)
    # each task's own value, named so that another checkpoint's evaluation pairs with it
    assert items == {"unit_tests/pass@1": {"statistics:median_low": 1.0, "statistics:median_low#2": 0.0}}
    assert two["unit_tests/pass@1_se"] == pytest.approx(0.5)  # per task 1 and 0: sd 0.71 over sqrt(2)
    with pytest.raises(ValueError, match="every k"):
        ut.evaluate_tasks([median_low], [[median_low.response]], ks=(2,))


def test_read_tasks_names_the_bad_line(tmp_path, median_low):
    path = tmp_path / "tasks.jsonl"
    import json

    record = {"question": median_low.prompt, "answer": median_low.response, "module": "statistics",
              "qualname": "median_low"}
    path.write_text(json.dumps(record) + "\n" + '{"question": "x"}\n')
    with pytest.raises(ValueError, match=r"tasks.jsonl:2: not a unit-test task record"):
        ut.read_tasks(path)
    path.write_text(json.dumps(record) + "\n")
    assert ut.read_tasks(path) == [median_low]


def test_verified_tasks_drop_failing_originals_and_tasks_an_empty_body_passes(median_low):
    prompt = ut.header("textwrap", "indent") + 'def indent(text, prefix):\n    """\n    >>> x = 1\n    """\n'
    trivial = ut.Task("textwrap", "indent", prompt, "    return text\n")  # no example checks any output
    broken = ut.Task(median_low.module, median_low.qualname, median_low.prompt, "    return 0\n")
    assert ut.verified_tasks([median_low, trivial, broken]) == [median_low]
