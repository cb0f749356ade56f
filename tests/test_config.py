"""Config loading: YAML + overrides, typed, validated once, with errors that name the setting."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from ebft_megatron.config import ConfigError, load_config
from ebft_megatron.settings import default_of, unknown_and_missing

ROOT = Path(__file__).resolve().parents[1]


def test_yaml_and_overrides_are_typed(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  load: /ckpt\ntrain:\n  steps: 7\nrollout:\n  chunk_len: 32\n  first_anchor: 4\n"
                    "  stride: 4\n  rollout_len: 4\n")
    config = load_config(path, ["train.steps=9", "objective.whiten=false", "model.feature_layers=[1, 3]",
                                "optimizer.lr=3e-4", "data.kind=code"])
    assert config.train.steps == 9 and config.objective.whiten is False
    assert config.model.feature_layers == [1, 3] and config.optimizer.lr == 3e-4
    assert config.rollout.chunk_len == 32 and config.model.load == "/ckpt"


@pytest.mark.parametrize("overrides,message", [
    (["train.stepz=3"], r"unknown setting\(s\) train.stepz; valid ones: train.steps"),
    (["train.steps=three"], r"train.steps: expected an integer, got 'three'"),
    (["objective.whiten=maybe"], r"objective.whiten: expected true or false"),
    (["objective.mode=dpo"], r"objective.mode: 'dpo' is not one of ebft, sft, rlvr"),
    (["rollout.stride=5"], r"rollout settings: .*not divisible by stride=5"),
    (["rollout.temperature=0"], r"rollout.temperature must be > 0 for mode ebft"),
    (["train.chunks_per_step=3", "train.micro_batch=2"], r"not a multiple of train.micro_batch=2"),
    (["steps=3"], r"write section.key=value"),
    (["data.validation_fraction=1.5"], r"data.validation_fraction: expected a number in \[0, 1\)"),
])
def test_bad_settings_name_the_setting(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["model.load=/ckpt", *overrides])


def test_missing_load_and_bad_files_are_explained(tmp_path):
    with pytest.raises(ConfigError, match="model.load is required"):
        load_config(None, [])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: [1\n")
    with pytest.raises(ConfigError, match=f"{bad}: line 3 is not valid YAML"):
        load_config(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("trian:\n  steps: 1\n")
    with pytest.raises(ConfigError, match=r"unknown section\(s\) \['trian'\]"):
        load_config(unknown)


def test_train_cli_help_lists_every_setting_and_errors_are_one_line(tmp_path):
    from ebft_megatron import config

    out = subprocess.run([sys.executable, "-m", "ebft_megatron.train", "--help"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0
    for section, factory in config.SECTIONS.items():
        import dataclasses

        for f in dataclasses.fields(factory):
            assert f"{section}.{f.name} = " in out.stdout, f"{section}.{f.name} missing from --help"
    assert "alpha: weight of the alignment reward" in out.stdout
    run = subprocess.run([sys.executable, "-m", "ebft_megatron.train", "train.steps=x", "model.load=/c"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == ["error: command line: train.steps: expected an integer, got 'x'"]


def test_fp8_settings_are_checked_and_need_transformer_engine(tiny_models, tmp_path):
    import torch

    from ebft_megatron.models.architecture import ModelConfigError
    from ebft_megatron.models.gpt import fp8_overrides

    with pytest.raises(ConfigError, match="model.fp8=delayed needs model.dtype=bfloat16"):
        load_config(None, ["model.load=/ckpt", "model.fp8=delayed"])
    with pytest.raises(ConfigError, match="model.fp8: 'e5m2' is not one of"):
        load_config(None, ["model.load=/ckpt", "model.fp8=e5m2", "model.dtype=bfloat16"])
    with pytest.raises(ConfigError, match="feature_fp8=true needs an FP8 recipe"):
        load_config(None, ["model.load=/ckpt", "model.feature_fp8=true"])
    assert fp8_overrides("none") == {}
    if not torch.cuda.is_available():  # CPU (CI): the error says what to install
        with pytest.raises(ModelConfigError, match=r"needs Transformer Engine and a GPU.*pip install -e '\.\[gpu\]'"):
            fp8_overrides("tensorwise")


def test_sequence_parallel_needs_tensor_parallelism_and_transformer_engine():
    import torch

    from ebft_megatron.models.architecture import ModelConfigError
    from ebft_megatron.models.gpt import sequence_parallel_overrides

    with pytest.raises(ConfigError, match="parallel.sequence_parallel needs parallel.tp >= 2"):
        load_config(None, ["model.load=/ckpt", "parallel.sequence_parallel=true"])
    assert load_config(None, ["model.load=/ckpt", "parallel.sequence_parallel=true", "parallel.tp=2"]).parallel.tp == 2
    assert sequence_parallel_overrides(False) == {}
    if not torch.cuda.is_available():  # CPU (CI): refused with what to install, before any model is built
        with pytest.raises(ModelConfigError, match="sequence_parallel=true needs a GPU with Transformer Engine"):
            sequence_parallel_overrides(True)


def test_stored_descriptions_are_checked_against_their_declared_fields():
    """A stored JSON description is read only when it has no key its dataclass lacks and every field
    without a default is there; a declared default is read without building the class."""
    @dataclasses.dataclass
    class Described:
        needed: int
        plain: int = 3
        listed: list = dataclasses.field(default_factory=lambda: ["a"])

    assert unknown_and_missing(Described, {"needed": 1, "plain": 2}) == ([], [])
    assert unknown_and_missing(Described, {"zeta": 0, "alpha": 1, "listed": []}) == (["alpha", "zeta"], ["needed"])
    assert (default_of(Described, "plain"), default_of(Described, "listed"), default_of(Described, "needed")) == \
        (3, ["a"], None)
    with pytest.raises(KeyError, match="Described has no field 'absent'"):
        default_of(Described, "absent")
