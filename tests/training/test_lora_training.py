"""LoRA training in one process: the policy with its adapters off is the feature network (features
equal a separate frozen copy's exactly), and EBFT, SFT and RLVR train the adapters alone."""

import math

import pytest
import torch

from ebft_megatron.config import load_config
from tests.fixtures import load_megatron_model
from tests.training.common import make_code_folder, tiny_overrides


@pytest.fixture(scope="module")
def setup(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_training")
    return tiny_models["qwen3"][1], make_code_folder(root / "code"), root


def test_the_policy_with_adapters_off_gives_the_base_models_features(setup):
    from ebft_megatron.features.network import embed, load_feature_network, share_policy
    from ebft_megatron.models.lora import adapters, attach_adapters
    from ebft_megatron.block_layout import BlockLayout
    from ebft_megatron.models import gpt

    ckpt = setup[0]
    policy, arch = load_megatron_model(ckpt)
    attach_adapters(policy, rank=4, alpha=8.0)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, adapter in adapters(policy):
            adapter.lora_b.copy_(torch.randn(adapter.lora_b.shape, generator=gen) * 0.2)
    layout = BlockLayout(24, 4, 4, 4, 3)
    chunk = torch.randint(0, arch.vocab_size, (2, 24), generator=gen)
    rollouts = torch.randint(0, arch.vocab_size, (2, layout.num_blocks, 3, 4), generator=gen)
    packed = layout.pack(chunk, rollouts)
    tokens = chunk[:, :16]

    def logits():
        positions = torch.arange(16).expand_as(tokens)
        return gpt.forward(policy, tokens, positions, reduce=lambda o: o[..., :arch.vocab_size].clone())

    before = logits()
    separate = load_feature_network(ckpt, (1, 3))
    shared = share_policy(policy, (1, 3))
    assert shared is policy
    for pooling in ("last_token", "mean"):
        expected = embed(separate, layout, packed, pooling).coordinates_by_length
        got = embed(shared, layout, packed, pooling).coordinates_by_length
        assert torch.equal(got, expected)
    # the feature forward put everything back: all layers, the output layer, the adapters on
    assert len(policy.decoder.layers) == arch.num_layers and policy.post_process
    assert policy.decoder.final_layernorm is not None and policy.lora.enabled
    assert torch.equal(logits(), before)


@pytest.mark.parametrize("mode", ["ebft", "sft", "rlvr"])
def test_lora_training_changes_only_the_adapters(setup, mode):
    from ebft_megatron.training.loop import Trainer

    ckpt, code, root = setup
    # each mode under another recompute setting: megatron's recompute needs the first layer's input
    # to require gradients, which a frozen embedding's output does not by itself
    recompute = {"ebft": "selective", "sft": "none", "rlvr": "full"}[mode]
    trainer = Trainer(load_config(None, tiny_overrides(ckpt, code, "", steps=3, mode=mode, **{
        "lora.rank": 4, "lora.alpha": 8, "model.recompute": recompute})))
    policy = trainer.policy
    if mode == "ebft":  # the policy is its own feature network: no second copy
        assert trainer.feature_model is policy
    before = {name: p.detach().clone() for name, p in policy.named_parameters()}
    losses = [trainer.train_step()["loss"] for _ in range(3)]
    assert all(math.isfinite(loss) for loss in losses)
    changed = {name for name, p in policy.named_parameters() if not torch.equal(p, before[name])}
    adapter_params = {name for name, p in policy.named_parameters() if p.requires_grad}
    assert adapter_params and all("_lora." in name for name in adapter_params)
    assert changed and changed <= adapter_params  # base weights bit-identical
    assert any(name.endswith("lora_b") for name in changed)
    if mode == "ebft":  # evaluation: CE with the adapters, the CFM curve's features without
        metrics = trainer.evaluate("lora")
        assert metrics and all(math.isfinite(value) for value in metrics.values())
        assert policy.lora.enabled and len(policy.decoder.layers) == trainer.arch.num_layers


def _params(policy):
    return {name: p.detach().clone() for name, p in policy.named_parameters()}


def test_lora_checkpoints_hold_the_adapters_and_resume_bit_identically(setup):
    from torch.distributed.checkpoint import FileSystemReader

    from ebft_megatron.checkpoint.store import CheckpointError, read_meta
    from ebft_megatron.checkpoint.lora import base_fingerprint, base_of
    from ebft_megatron.training.loop import Trainer

    ckpt, code, root = setup
    lora = {"lora.rank": 4, "lora.alpha": 8}
    straight = Trainer(load_config(None, tiny_overrides(ckpt, code, root / "straight", steps=4, **lora)))
    straight_losses = [straight.train_step()["loss"] for _ in range(4)]
    straight_params = _params(straight.policy)

    first = Trainer(load_config(None, tiny_overrides(ckpt, code, root / "resumed", steps=4, **lora)))
    losses = [first.train_step()["loss"] for _ in range(2)]
    saved = first.save()
    del first
    # the adapters alone, with the base's path and fingerprint
    stored = FileSystemReader(str(saved / "model")).read_metadata().state_dict_metadata
    assert stored and all("_lora." in key for key in stored)
    meta = read_meta(saved)["lora"]
    assert meta["rank"] == 4 and meta["alpha"] == 8.0 and meta["targets"] == ["qkv", "proj", "fc1", "fc2"]
    assert meta["base_fingerprint"] == base_fingerprint(ckpt) and base_of(saved) == ckpt.resolve()
    second = Trainer(load_config(None, tiny_overrides(ckpt, code, root / "resumed", steps=4, **lora)))
    assert second.step == 2
    losses += [second.train_step()["loss"] for _ in range(2)]
    assert losses == straight_losses  # bit-identical
    resumed = _params(second.policy)
    assert all(torch.equal(resumed[k], v) for k, v in straight_params.items())
    # adapters trained on another base are refused
    meta_path = saved / "ebft_checkpoint.json"
    text = meta_path.read_text()
    meta_path.write_text(text.replace(meta["base_fingerprint"], "0" * 64))
    try:
        with pytest.raises(CheckpointError, match="not the one the adapters were trained on"):
            base_of(saved)
        with pytest.raises(CheckpointError, match="trained on the base"):
            Trainer(load_config(None, tiny_overrides(ckpt, code, root / "resumed", steps=4, **lora)))
    finally:
        meta_path.write_text(text)


def test_a_merged_lora_export_matches_the_lora_model_in_transformers(setup, tiny_models):
    from ebft_megatron.checkpoint import convert
    from ebft_megatron.models.lora import adapters
    from ebft_megatron.models import gpt
    from ebft_megatron.training import builder
    from ebft_megatron.training.loop import Trainer
    from tests.fixtures import hf_logits

    ckpt, code, root = setup
    config = load_config(None, tiny_overrides(ckpt, code, root / "merge", steps=1, mode="sft",
                                              **{"lora.rank": 4, "lora.alpha": 8}))
    trainer = Trainer(config)
    trainer.train_step()
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():  # adapters big enough that a merge left out or done wrong shows
        for _, adapter in adapters(trainer.policy):
            adapter.lora_b.add_(torch.randn(adapter.lora_b.shape, generator=gen) * 0.1)
    saved = trainer.save()
    arch = trainer.arch
    tokens = torch.randint(0, arch.vocab_size, (2, 19), generator=gen)

    def logits(model):
        positions = torch.arange(19).expand_as(tokens)
        return gpt.forward(model, tokens, positions, reduce=lambda o: o[..., :arch.vocab_size].clone())

    lora_logits = logits(trainer.policy)
    # the LoRA checkpoint as model.load (evaluate, generate): base + the saved adapters
    reloaded = builder.policy(load_config(None, [f"model.load={saved}"]), arch)
    assert torch.equal(logits(reloaded), lora_logits)
    hf_dir = convert.mcore_to_hf(saved, root / "merged-hf", log=lambda *_: None)
    merged = hf_logits(hf_dir, tokens)
    base = hf_logits(tiny_models["qwen3"][0], tokens)
    assert float((merged - lora_logits).abs().max()) <= 1e-5
    assert float((base - lora_logits).abs().max()) > 1e-2
    full = convert.merge_lora(saved, root / "merged-mcore", log=lambda *_: None)
    merged_model, _ = load_megatron_model(full)
    assert float((logits(merged_model) - lora_logits).abs().max()) <= 1e-5


def test_the_memory_model_counts_lora_adapters_and_the_shared_feature_network(setup):
    from ebft_megatron.models.lora import attach_adapters, lora_parameters
    from ebft_megatron.training import memory

    ckpt, code, root = setup
    model, arch = load_megatron_model(ckpt)
    attach_adapters(model, rank=4, targets=("qkv", "fc1", "fc2"))
    counted = arch.num_layers * memory.lora_layer_parameters(arch, 1, 4, ("qkv", "fc1", "fc2"))
    assert counted == sum(p.numel() for p in lora_parameters(model))
    full = memory.StepShape.of(load_config(None, tiny_overrides(ckpt, code, "")), arch)
    lora = memory.StepShape.of(load_config(None, tiny_overrides(ckpt, code, "", **{"lora.rank": 4})), arch)
    assert full.feature_layers > 0 and lora.feature_layers == 0 and lora.lora_rank == 4
    full_estimate, lora_estimate = memory.estimate(arch, full), memory.estimate(arch, lora)
    params = memory.stage_parameters(arch, 1, 1)
    adapters = arch.num_layers * memory.lora_layer_parameters(arch, 1, 4)
    # fp32: frozen weights 4 bytes; adapters 4 + 4 (gradient) + 8 (Adam moments, DP1)
    assert lora_estimate.model_state == params * 4 + adapters * 16
    assert full_estimate.model_state == params * 16
    assert lora_estimate.feature_network == 0 < full_estimate.feature_network
    assert lora_estimate.phases["optimizer"] == adapters * 4


DISTRIBUTED_SCRIPT = """
import json, sys
sys.path.insert(0, {root!r})
from ebft_megatron.cli import quiet_imports; quiet_imports()
import torch.distributed as dist
from ebft_megatron.config import load_config
from ebft_megatron.training.loop import Trainer
# the TP1 run's checkpoint of step 2, resumed at TP2 x PP2
resumed = Trainer(load_config(None, {resume!r}))
start = resumed.step
losses = [resumed.train_step()["loss"] for _ in range(2)]
# EBFT with the shared feature network cut across two pipeline stages
ebft = Trainer(load_config(None, {ebft!r}))
ebft_losses = [ebft.train_step()["loss"] for _ in range(2)]
if dist.get_rank() == 0:
    json.dump({{"start": start, "losses": losses, "ebft": ebft_losses,
               "shared": ebft.feature_model is ebft.policy}}, open({out!r}, "w"))
"""


def test_lora_at_tp2_pp2_resumes_a_tp1_checkpoint_and_trains_ebft(setup, tmp_path):
    import json
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    from ebft_megatron.training.loop import Trainer

    ckpt, code, root = setup
    lora = {"lora.rank": 4, "lora.alpha": 8, "train.save_interval": 0}
    save = tmp_path / "sft"
    single = Trainer(load_config(None, tiny_overrides(ckpt, code, save, steps=4, mode="sft", **lora)))
    losses = [single.train_step()["loss"] for _ in range(2)]
    single.save()
    losses += [single.train_step()["loss"] for _ in range(2)]
    layout = {"parallel.tp": 2, "parallel.pp": 2}
    script = DISTRIBUTED_SCRIPT.format(
        root=str(Path(__file__).resolve().parents[2]), out=str(tmp_path / "out.json"),
        resume=tiny_overrides(ckpt, code, save, steps=4, mode="sft", **lora, **layout),
        ebft=tiny_overrides(ckpt, code, "", steps=2, mode="ebft", **lora, **layout))
    (tmp_path / "run.py").write_text(script)
    with socket.socket() as sock:  # torchrun's static rendezvous needs a concrete free port
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=4",
                           f"--master_port={port}", str(tmp_path / "run.py")],
                          env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["start"] == 2 and result["shared"]
    for got, expected in zip(result["losses"], losses[2:]):
        assert abs(got - expected) < 1e-5
    assert all(math.isfinite(loss) for loss in result["ebft"])
