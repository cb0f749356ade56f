"""What one rollout generation costs a GPU's host, counted on a CPU under the device guard (the GPU
code path on an emulated GPU; ``runtime.launch_count``): at the rollout benchmark's layout (P=1024,
C=s=G=8, n=4) and a model 30 layers deep (SmolLM2-135M's depth, tiny width: the counts do not
depend on the width), one generation stays within its budgets of kernels and host syncs, no
decode step waits for the device, and every decode step dispatches the same ops on the same
shapes (what replaying one captured step as a CUDA graph needs)."""

import json
import subprocess
import sys
import textwrap

from tests.runtime.test_device_guard import GUARDED, ROOT

# a quarter of what the reference's full recompute launches for the same generation (46,932)
KERNELS_PER_GENERATION = 12_000
# the prefill's and the sampling's, none in a decode step
SYNCS_PER_GENERATION = 8

GENERATION = """
    import json
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from ebft_megatron.block_layout import BlockLayout
    from ebft_megatron.models import architecture, gpt
    from ebft_megatron.rollouts import sampler
    from ebft_megatron.rollouts.sampling import SamplingSettings
    from ebft_megatron.runtime import device, distributed
    from ebft_megatron.runtime.launch_count import LaunchCounter

    distributed.initialize(1, 1)
    arch = architecture.from_hf_config(dict(
        architectures=["LlamaForCausalLM"], hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, num_hidden_layers=30, vocab_size=512))
    model = gpt.build_model(arch)
    layout = BlockLayout(1024, 8, 8, 8, 4)
    chunk = device.to_device(torch.randint(0, 512, (1, 1024), generator=torch.Generator().manual_seed(0)))

    class Shapes(TorchDispatchMode):  # each op and the shapes of its tensor arguments
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
            self.seen.append((str(func), shapes))
            return func(*args, **(kwargs or {}))

    forwards, steps = [], []
    plain_forward = gpt.forward

    def counted_forward(*args, **kwargs):
        name = "prefill" if not forwards else f"decode {len(forwards)}"
        forwards.append(name)
        with counter.phase(name), Shapes() as shapes:
            result = plain_forward(*args, **kwargs)
        steps.append(shapes.seen)
        return result

    gpt.forward = counted_forward
    with LaunchCounter() as counter:
        rollouts = sampler.sample_rollouts(model, layout, chunk, arch.vocab_size, SamplingSettings(0.6, 1.0),
                                           sampler.rollout_generator(43, 0))
    figures = counter.as_dict()
    figures["decode steps dispatch the same ops"] = all(seen == steps[1] for seen in steps[1:])
    figures["decode steps"] = len(steps) - 1
    print("FIGURES " + json.dumps(figures))
"""


def test_a_generation_stays_within_its_launch_budget():
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(GENERATION)], env=GUARDED, capture_output=True,
                            text=True, timeout=900, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("FIGURES "))[8:])
    total = figures["total"]
    assert figures["decode steps"] == 7
    assert total["kernels"] <= KERNELS_PER_GENERATION, total
    assert total["syncs"] <= SYNCS_PER_GENERATION, total
    for step in range(1, 8):
        decode = figures[f"decode {step}"]
        assert decode["syncs"] == 0, (step, decode["sync_sites"])
        assert decode["kernels"] > 0
    assert figures["decode steps dispatch the same ops"]
