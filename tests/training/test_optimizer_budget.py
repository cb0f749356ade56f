"""What one optimizer step (gradient norm, clipping, Adam, the copies back to the model) costs a
GPU's host, counted on a CPU under the device guard (``runtime.launch_count``) for a model 28
layers deep (the GPU validation's depth, tiny width): a number of kernels and syncs that does not
grow with the parameters. Megatron's own fallbacks without Transformer Engine or Apex launched
818 kernels and read 200 values back to the host here (a norm per parameter, each read back);
runtime/multi_tensor.py gives them foreach ops."""

import json
import subprocess
import sys
import textwrap

from tests.runtime.test_device_guard import GUARDED, ROOT

KERNELS = 100
SYNCS = 1  # the global gradient norm, which megatron reads to decide whether to clip

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
    for dtype in (torch.float32, torch.bfloat16):
        model = gpt.build_model(arch, params_dtype=dtype)
        ddp = wrap_ddp(model)
        optimizer = build_optimizer(ddp, OptimizerSettings(clip_grad=1e-3), params_dtype=dtype)
        parameters = sum(1 for _ in model.parameters())
        for buffer in ddp.buffers:
            buffer.grad_data.normal_()  # gradients large enough to be clipped
        optimizer.step()  # the first step also makes Adam's state: count a later one
        with LaunchCounter() as counter:
            with counter.phase("optimizer"):
                optimizer.step()
        figures = counter.as_dict()["optimizer"]
        figures["parameters"] = parameters
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
