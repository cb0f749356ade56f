"""The training loop in one process: exact resume, non-finite steps, checkpoint refusal,
atomic saves under a kill, and config errors."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ebft_megatron.checkpoint.store import CheckpointError
from ebft_megatron.config import load_config
from tests.training.common import make_code_folder, tiny_overrides

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def setup(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer")
    return tiny_models["llama"][1], make_code_folder(root / "code"), root


def params_of(trainer):
    return {name: p.detach().clone() for name, p in trainer.policy.named_parameters()}


def run_steps(trainer, count):
    return [trainer.train_step()["loss"] for _ in range(count)]


def test_resumed_run_is_bit_identical_to_an_uninterrupted_one(setup):
    from ebft_megatron.training.loop import Trainer

    ckpt, code, root = setup
    straight = Trainer(load_config(None, tiny_overrides(ckpt, code, root / "straight", steps=4)))
    straight_losses = run_steps(straight, 4)
    straight_params = params_of(straight)

    first = Trainer(load_config(None, tiny_overrides(ckpt, code, root / "resumed", steps=4)))
    losses = run_steps(first, 2)
    first.save()
    del first
    second = Trainer(load_config(None, tiny_overrides(ckpt, code, root / "resumed", steps=4)))
    assert second.step == 2
    losses += run_steps(second, 2)
    assert losses == straight_losses  # bit-identical, not approximately equal
    assert len(set(losses)) == 4
    resumed_params = params_of(second)
    assert all(torch.equal(resumed_params[k], v) for k, v in straight_params.items())


def test_non_finite_steps_are_skipped_then_the_run_stops(setup, monkeypatch):
    from ebft_megatron.objective import loss as objective_loss
    from ebft_megatron.training.loop import Trainer, TrainingAborted

    ckpt, code, root = setup
    trainer = Trainer(load_config(None, tiny_overrides(ckpt, code, "", steps=4, **{"train.max_nonfinite_steps": 2})))
    before = params_of(trainer)
    original = objective_loss.ebft_loss

    def poisoned(*args, **kwargs):
        loss, terms = original(*args, **kwargs)
        return loss * float("nan"), dict(terms, loss=terms["loss"] * float("nan"))

    class NonFiniteGradient(torch.autograd.Function):  # a finite loss whose gradient is not
        @staticmethod
        def forward(ctx, loss):
            return loss.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad * float("inf")

    def poisoned_gradient(*args, **kwargs):
        loss, terms = original(*args, **kwargs)
        return NonFiniteGradient.apply(loss), terms

    monkeypatch.setattr(objective_loss, "ebft_loss", poisoned)
    metrics = trainer.train_step()
    assert metrics["skipped_steps"] == 1 and math.isnan(metrics["loss"])
    assert all(torch.equal(p, before[k]) for k, p in params_of(trainer).items())  # nothing applied
    monkeypatch.setattr(objective_loss, "ebft_loss", poisoned_gradient)
    with pytest.raises(TrainingAborted, match="2 consecutive steps"):
        trainer.train_step()
    assert all(torch.equal(p, before[k]) for k, p in params_of(trainer).items())
    monkeypatch.setattr(objective_loss, "ebft_loss", original)


def test_a_corrupt_checkpoint_is_refused_naming_the_last_good_one(setup):
    from ebft_megatron.training.checkpointing import check_resumable, latest_good_checkpoint, load_training_checkpoint
    from ebft_megatron.training.loop import Trainer

    ckpt, code, root = setup
    save = root / "corrupt"
    trainer = Trainer(load_config(None, tiny_overrides(ckpt, code, save, steps=4)))
    run_steps(trainer, 2)
    good = trainer.save()
    run_steps(trainer, 2)
    bad = trainer.save()
    # a shard cut short: the folder looks complete, the load finds out
    shard = sorted((bad / "model").glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=f"{bad.name}.*latest good checkpoint before it is {good}"):
        load_training_checkpoint(bad, trainer.policy, trainer.optimizer, trainer.generator)
    # the seal file missing (a save that died before the rename would not even have this name)
    (bad / "ebft_checkpoint.json").unlink()
    with pytest.raises(CheckpointError, match=f"cannot resume from {bad}.*{good}"):
        check_resumable(bad)
    notes = []
    assert latest_good_checkpoint(save, log=notes.append) == good
    assert notes and bad.name in notes[0]


KILL_SCRIPT = """
import sys, time
sys.path.insert(0, {root!r})
from ebft_megatron.cli import quiet_imports; quiet_imports()
from ebft_megatron.checkpoint import store
from ebft_megatron.config import load_config
from ebft_megatron.training.loop import Trainer
original = store.save_checkpoint
def slow_save(ckpt_dir, *args, extra_writer=None, **kwargs):
    def writer(partial):
        extra_writer(partial)
        if "000004" in str(ckpt_dir):
            open({marker!r}, "w").write("in save")
            time.sleep(120)
    return original(ckpt_dir, *args, extra_writer=writer, **kwargs)
store.save_checkpoint = slow_save
trainer = Trainer(load_config(None, {overrides!r}))
for _ in range(4):
    trainer.train_step()
    if trainer.step % 2 == 0:
        trainer.save()
"""


def test_a_kill_during_a_save_keeps_the_previous_checkpoint(setup):
    from ebft_megatron.training.checkpointing import latest_good_checkpoint
    from ebft_megatron.training.loop import Trainer

    ckpt, code, root = setup
    save, marker = root / "killed", root / "marker"
    overrides = tiny_overrides(ckpt, code, save, steps=6)
    script = KILL_SCRIPT.format(root=str(ROOT), marker=str(marker), overrides=overrides)
    proc = subprocess.Popen([sys.executable, "-c", script], env=dict(os.environ, OMP_NUM_THREADS="1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (save / "step_000004.partial").is_dir() and not (save / "step_000004").exists()
    assert latest_good_checkpoint(save) == save / "step_000002"
    resumed = Trainer(load_config(None, overrides))
    assert resumed.step == 2
    resumed.train_step()
    assert resumed.save() == save / "step_000003"


def test_the_run_says_whether_the_cfm_change_is_beyond_noise(setup, tmp_path):
    from ebft_megatron.config import load_config
    from ebft_megatron.training.loop import Trainer

    ckpt, code, root = setup
    lines = []
    trainer = Trainer(load_config(None, tiny_overrides(ckpt, code, tmp_path / "run", steps=2,
                                                      **{"eval.cfm_chunks": 2})),
                      log=lines.append)
    history = trainer.run()
    change = [line for line in lines if line.startswith("eval change: CFM")]
    assert len(change) == 1, lines
    before, after = history["eval_before"]["eval/cfm"], history["eval_after"]["eval/cfm"]
    assert f"CFM {before:.4f} -> {after:.4f}, {after - before:+.4f} +- " in change[0]
    assert "blocks, paired): " in change[0] and ("beyond noise" in change[0] or "within noise" in change[0])
    ce_before, ce_after = history["eval_before"]["eval/ce"], history["eval_after"]["eval/ce"]
    assert f"; CE {ce_before:.4f} -> {ce_after:.4f}, {ce_after - ce_before:+.4f} +- " in change[0]
    assert "chunks, paired): " in change[0] and change[0].endswith("noise (noise: 2 standard errors)")
    saved = json.loads((Path(trainer.config.train.save) / "eval" / "change.json").read_text())
    assert saved["cfm"]["before"] == pytest.approx(before) and saved["ce"]["after"] == pytest.approx(ce_after)
