"""What replaying one captured decode step as a CUDA graph needs, checked on a CPU.

A CUDA graph records the kernels of one call with their buffers, and a replay runs those kernels
again on the same buffers: Python is not run, values the host baked into the recording stay as
they were, and nothing may wait for the host. ``RecordedStep`` below does the same with torch's
ops on a CPU (it records every op the step dispatches, with its tensors, and a replay runs the
recorded ops again, writing into the recorded outputs), so a generation whose decode steps are
replays must sample exactly the tokens of a generation run step by step."""

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ebft_megatron.block_layout import BlockLayout
from ebft_megatron.rollouts import sampler
from ebft_megatron.rollouts.sampler import SamplingSettings, sample_rollouts
from tests.rollouts.test_sampler import model  # noqa: F401
from tests.test_block_layout import document_ids_with_every_case

# what a capture may not contain: ops that read device values on the host
HOST_READS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "equal", "is_nonzero"}


def _writes(func) -> bool:
    return any(arg.alias_info is not None and arg.alias_info.is_write for arg in func._schema.arguments)


def _is_view(func) -> bool:
    returns = func._schema.returns
    return bool(returns) and returns[0].alias_info is not None and not returns[0].alias_info.is_write


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        assert name not in HOST_READS, f"{name} in a captured step waits for the device"
        out = func(*args, **kwargs)
        self.ops.append((func, args, kwargs, out))
        return out


class RecordedStep:
    """sampler.CapturedStep's contract on a CPU: run once, record, replay the recording."""

    captures = 0

    def __init__(self, run):
        run()  # the warm-up
        recorder = _Recorder()
        with recorder:
            self.output = run()
        self.ops = recorder.ops
        RecordedStep.captures += 1
        self.replays = 0

    def __call__(self):
        with torch.no_grad():
            for func, args, kwargs, out in self.ops:
                if _is_view(func):
                    continue  # the recorded view still looks at the same memory
                result = func(*args, **kwargs)
                if _writes(func):
                    continue  # it wrote into its recorded arguments
                for recorded, fresh in zip(out if isinstance(out, (tuple, list)) else [out],
                                           result if isinstance(result, (tuple, list)) else [result]):
                    if isinstance(recorded, torch.Tensor):
                        recorded.copy_(fresh)
        self.replays += 1
        return self.output


@pytest.mark.parametrize("documents", [False, True], ids=["", "documents"])
@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9), (0.0, 1.0)])
def test_replayed_decode_steps_sample_the_tokens_of_eager_steps(model, monkeypatch, temperature, top_p, documents):
    net, arch = model
    layout = BlockLayout(24, 4, 4, 4, 3)  # G = 4: one capture, two replays
    B = 2
    chunk = torch.randint(0, arch.vocab_size, (B, layout.chunk_len), generator=torch.Generator().manual_seed(2))
    doc_ids = document_ids_with_every_case(layout, B, seed=1) if documents else None
    settings = SamplingSettings(temperature, top_p, cuda_graphs=True)
    eager = sample_rollouts(net, layout, chunk, arch.vocab_size, settings, torch.Generator().manual_seed(9),
                            doc_ids=doc_ids)
    monkeypatch.setattr(sampler, "_graphs_possible", lambda model, settings, keep_logits: settings.cuda_graphs)
    made = []
    monkeypatch.setattr(sampler, "CapturedStep", lambda run: made.append(RecordedStep(run)) or made[-1])
    replayed = sample_rollouts(net, layout, chunk, arch.vocab_size, settings, torch.Generator().manual_seed(9),
                               doc_ids=doc_ids)
    assert len(made) == 1 and made[0].replays == layout.rollout_len - 1
    assert torch.equal(replayed.tokens, eager.tokens)


class _FakeStream:
    def wait_stream(self, other):
        pass


class _FailingCapture:
    """torch.cuda.graph's stand-in: the capture fails the way CUDA fails one (the step made a call
    a capture forbids)."""

    def __init__(self, graph, capture_error_mode="global"):
        self.capture_error_mode = capture_error_mode
        _FailingCapture.modes.append(capture_error_mode)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nCUDA kernel errors ...")


def test_a_failed_capture_says_which_setting_runs_the_steps_eagerly(monkeypatch):
    _FailingCapture.modes = []
    monkeypatch.setattr(torch.cuda, "Stream", _FakeStream)
    monkeypatch.setattr(torch.cuda, "current_stream", _FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", object)
    monkeypatch.setattr(torch.cuda, "graph", _FailingCapture)
    runs = []
    with pytest.raises(RuntimeError) as failed:
        sampler.CapturedStep(lambda: runs.append(1))
    assert len(runs) == 2  # the warm-up, then the capture
    assert _FailingCapture.modes == ["thread_local"]
    message = str(failed.value)
    assert "\n" not in message and "rollout.cuda_graphs=false" in message
    assert "operation not permitted when stream is capturing" in message
    assert isinstance(failed.value.__cause__, RuntimeError)
