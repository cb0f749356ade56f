"""``train --check``: one process validates settings, checkpoints and data before a launch, and says
what it found or the one thing that is wrong."""

import re

import pytest

from ebft_megatron.train import main
from tests.training.common import make_code_folder, tiny_overrides


@pytest.fixture(scope="module")
def run_setup(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("preflight")
    return tiny_models["llama"][1], make_code_folder(root / "code"), root


def check(capsys, *args):
    """(exit code, stdout, the error line) of a check; the data's progress lines are left out, and
    anything else on stderr fails the test (one line, no traceback)."""
    code = main(["--check", *args])
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip() and not line.lstrip("\r").startswith("[data]")]
    assert len(lines) <= 1 and "Traceback" not in err, err
    return code, out, "".join(f"{line}\n" for line in lines)


def test_a_good_run_is_summarised(run_setup, capsys):
    ckpt, code, root = run_setup
    status, out, err = check(capsys, "--gpus", "4", *tiny_overrides(ckpt, code, root / "run"), "parallel.tp=2")
    assert status == 0, err
    assert "llama, 4 layers, hidden 64" in out
    assert "7 blocks x 3 samples x 4 tokens; policy forward of 116 tokens" in out  # (32 - 4 - 4) / 4 + 1 = 7
    assert "4 processes = TP2 x PP1 x DP2" in out
    assert "60 training chunks (30 steps per epoch), 18 validation chunks" in out
    assert "memory per process: peak" in out and out.rstrip().endswith("check passed")
    # 2 chunks per step over DP2: one chunk per process, in one micro-batch
    assert "micro-batches: 1 micro-batch of 1 chunk per step and process, the largest micro-batch the step allows" in out
    assert not (root / "run").exists()  # nothing written


def test_the_check_says_what_a_larger_micro_batch_would_cost(run_setup, capsys):
    ckpt, code, root = run_setup
    status, out, err = check(capsys, "--gpus", "1", *tiny_overrides(ckpt, code, root / "run"), "train.chunks_per_step=4")
    assert status == 0, err
    # 4 chunks per step on one process: 4 micro-batches of 1; the next micro-batch dividing 4 is 2
    advice = next(line for line in out.splitlines() if line.startswith("micro-batches:"))
    assert advice.startswith("micro-batches: 4 micro-batches of 1 chunk per step and process; "
                             "train.micro_batch=2 would make 2 per step")
    units = {"MiB": 2 ** 20, "GiB": 2 ** 30}
    then, now = (float(value) * units[unit] for value, unit in re.findall(r"([0-9.]+) (MiB|GiB)", advice))
    assert then > now  # two chunks' activations at once


@pytest.mark.parametrize("gpus, overrides, message", [
    ("3", ["parallel.tp=2"], "3 processes cannot hold parallel.tp=2 x parallel.pp=1"),
    ("3", ["parallel.tp=3"], "tensor parallel size 3 does not divide num_attention_heads=4"),
    ("8", ["train.chunks_per_step=4"], "train.chunks_per_step=4 must be a multiple of data-parallel size 8"),
    ("1", ["train.chunks_per_step=64"], "60 training chunks, fewer than train.chunks_per_step=64"),
    ("1", ["rollout.stride=5"], "is not divisible by stride=5"),
])
def test_a_bad_setting_is_one_line(run_setup, capsys, gpus, overrides, message):
    ckpt, code, root = run_setup
    status, out, err = check(capsys, "--gpus", gpus, *tiny_overrides(ckpt, code, root / "run"), *overrides)
    assert status == 2
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_missing_or_truncated_weights_are_named(run_setup, capsys, tmp_path):
    import shutil

    ckpt, code, root = run_setup
    broken = shutil.copytree(ckpt, tmp_path / "ckpt")
    shard = sorted((broken / "model").glob("*.distcp"))[-1]
    shard.write_bytes(shard.read_bytes()[:100])
    status, _, err = check(capsys, *tiny_overrides(broken, code, root / "run"))
    assert status == 2 and f"model/{shard.name} is truncated" in err and err.count("\n") == 1, err
    shard.unlink()
    status, _, err = check(capsys, *tiny_overrides(broken, code, root / "run"))
    assert status == 2 and f"model/{shard.name} is missing" in err, err
    (broken / "model" / ".metadata").write_bytes(b"\x80\x04garbage")
    status, _, err = check(capsys, *tiny_overrides(broken, code, root / "run"))
    assert status == 2 and "model/.metadata cannot be read" in err and err.count("\n") == 1, err


def test_bad_data_is_found_before_launch(run_setup, capsys, tmp_path):
    ckpt, _, root = run_setup
    data = tmp_path / "data.jsonl"
    data.write_text('{"question": "a", "answer": "b"}\n{"question": 1\n')
    status, _, err = check(capsys, *tiny_overrides(ckpt, data, root / "run"), "data.kind=jsonl")
    assert status == 2 and f"{data}:2" in err, err


def test_gpus_needs_check(capsys):
    with pytest.raises(SystemExit):
        main(["--gpus", "4"])
    assert "--gpus takes a positive count and goes with --check" in capsys.readouterr().err


def test_a_reward_that_cannot_be_imported_is_found_before_launch(run_setup, capsys):
    ckpt, code, root = run_setup
    status, _, err = check(capsys, *tiny_overrides(ckpt, code, root / "run", mode="rlvr"),
                           "objective.reward=no_such_module:score")
    assert status == 2 and "reward 'no_such_module:score' cannot be imported" in err, err


def test_a_lora_checkpoint_is_checked_with_its_base(run_setup, capsys, tmp_path):
    """As model.load, a LoRA checkpoint's base must be complete, and the lora section must name its
    adapters (or rank 0)."""
    import shutil

    from ebft_megatron.config import load_config
    from ebft_megatron.training.loop import Trainer

    ckpt, code, root = run_setup
    base = shutil.copytree(ckpt, tmp_path / "base")
    Trainer(load_config(None, tiny_overrides(base, code, tmp_path / "lora", steps=1, **{
        "lora.rank": 4, "eval.before_and_after": "false", "train.tensorboard": "false"}))).run()
    adapters = tmp_path / "lora" / "step_000001"
    status, out, err = check(capsys, *tiny_overrides(adapters, code, root / "run"))
    assert status == 0 and f"lora: adapters of rank 4 on qkv, proj, fc1, fc2, base {base}" in out, err
    status, _, err = check(capsys, *tiny_overrides(adapters, code, root / "run"), "lora.rank=8")
    assert status == 2 and "holds LoRA adapters of rank 4" in err, err
    shard = sorted((base / "model").glob("*.distcp"))[-1]
    shard.write_bytes(shard.read_bytes()[:100])
    status, _, err = check(capsys, *tiny_overrides(adapters, code, root / "run"))
    assert status == 2 and f"model/{shard.name} is truncated" in err, err


def test_a_mixture_of_experts_run_is_summarised_and_its_bad_layouts_refused(tiny_models, run_setup, capsys):
    _, code, root = run_setup
    moe = tiny_models["qwen3_moe"][1]
    status, out, err = check(capsys, "--gpus", "4", *tiny_overrides(moe, code, root / "run"), "parallel.tp=2",
                             "parallel.ep=2", "moe.aux_loss_weight=0.01")
    assert status == 0, err
    assert "experts: 4 per layer, 2 per token, dropless; 2 per rank at EP2; load-balancing loss weight 0.01" in out
    assert "4 processes = TP2 x PP1 x DP2 (experts: EP2 x expert-DP1)" in out
    refused = [
        (6, ("parallel.ep=3", "train.chunks_per_step=6"), "expert parallel size 3 does not divide num_experts=4"),
        (4, ("parallel.tp=2", "parallel.ep=4"), "4 processes cannot hold parallel.tp=2 x parallel.ep=4 x parallel.pp=1"),
        (1, ("moe.expert_capacity_factor=1.25",), "routing that drops tokens is not supported"),
        (1, ("lora.rank=4",), "a mixture of experts' MLP"),
    ]
    for gpus, extra, message in refused:
        status, _, err = check(capsys, "--gpus", str(gpus), *tiny_overrides(moe, code, root / "run"), *extra)
        assert status != 0 and message in err, (extra, err)
    dense = tiny_models["llama"][1]
    status, _, err = check(capsys, "--gpus", "2", *tiny_overrides(dense, code, root / "run"), "parallel.ep=2")
    assert status != 0 and "needs a mixture-of-experts model" in err
