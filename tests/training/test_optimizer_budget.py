"""What one optimizer step (gradient norm, clipping, Adam, the copies back to the model) costs a
GPU's host, counted on a CPU under the device guard (``runtime.launch_count``) for a model 28
layers deep (the GPU validation's depth, tiny width): a number of kernels and syncs that does not
grow with the parameters. Megatron's own fallbacks without Transformer Engine or Apex launched
818 kernels and read 200 values back to the host here (a norm per parameter, each read back);
runtime/multi_tensor.py gives them foreach ops. The trainer takes the step in two halves around its
one read of the step's figures (training.optimizer.prepare_step / finish_step): the same
parameters as megatron's own step, to the bit."""

import json
import subprocess
import sys
import textwrap

from tests.runtime.test_device_guard import GUARDED, ROOT

KERNELS = 100
SYNCS = 1  # the global gradient norm, read to decide whether to clip (the trainer reads it with the loss)

STEP = """
    import json
    import torch
    from ebft_megatron.config import OptimizerSettings
    from ebft_megatron.models import architecture, gpt
    from ebft_megatron.runtime import distributed
    from ebft_megatron.runtime.launch_count import LaunchCounter
    from ebft_megatron.training.optimizer import build_optimizer, wrap_ddp

    distributed.initialize(1, 1)
    arch = architecture.from_hf_config(dict(
        architectures=["Qwen2ForCausalLM"], hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, num_hidden_layers=28, vocab_size=512))
    from ebft_megatron.training.optimizer import finish_step, prepare_step

    def step_in_halves(optimizer):
        grad_norm = float(prepare_step(optimizer)) ** 0.5  # the trainer reads it with the step's figures
        finish_step(optimizer, grad_norm)
        return grad_norm

    for dtype in (torch.float32, torch.bfloat16):
        model = gpt.build_model(arch, params_dtype=dtype)
        ddp = wrap_ddp(model)
        optimizer = build_optimizer(ddp, OptimizerSettings(clip_grad=1e-3), params_dtype=dtype)
        twin = gpt.build_model(arch, params_dtype=dtype)
        twin.load_state_dict(model.state_dict())
        twin_ddp = wrap_ddp(twin)
        twin_optimizer = build_optimizer(twin_ddp, OptimizerSettings(clip_grad=1e-3), params_dtype=dtype)
        parameters = sum(1 for _ in model.parameters())
        norms = []
        for step in range(2):  # the first step also makes Adam's state: count a later one
            torch.manual_seed(step)
            for buffer in ddp.buffers:
                buffer.grad_data.normal_()  # gradients large enough to be clipped
            for buffer, twin_buffer in zip(ddp.buffers, twin_ddp.buffers):
                twin_buffer.grad_data.copy_(buffer.grad_data)
            _, megatron_norm, _ = twin_optimizer.step()
            if step == 0:
                norms.append((step_in_halves(optimizer), megatron_norm))
                continue
            with LaunchCounter() as counter:
                with counter.phase("optimizer"):
                    norms.append((step_in_halves(optimizer), megatron_norm))
        same = all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
        figures = counter.as_dict()["optimizer"]
        figures.update(parameters=parameters, same_parameters=same, norms=norms)
        print("FIGURES " + json.dumps({"dtype": str(dtype), **figures}))
"""


def test_an_optimizer_step_launches_a_fixed_number_of_kernels():
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(STEP)], env=GUARDED, capture_output=True,
                            text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = [json.loads(line[8:]) for line in result.stdout.splitlines() if line.startswith("FIGURES ")]
    assert len(runs) == 2
    for figures in runs:
        assert figures["parameters"] > KERNELS  # a kernel per parameter would not fit
        assert figures["kernels"] <= KERNELS, figures
        assert figures["syncs"] <= SYNCS, (figures["dtype"], figures["sync_sites"])
        assert figures["same_parameters"], figures["dtype"]  # megatron's step, to the bit
        assert all(ours == megatron for ours, megatron in figures["norms"]), figures["norms"]
