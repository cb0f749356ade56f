"""A static rule, read from the code with ``ast``: every tensor that ``ebft_megatron/`` creates names
its device (``device=``), except in the places listed here, each with the reason it is made on the
host. ``*_like`` and ``new_*`` creations follow their input and are not counted.

The device guard (tests/runtime/test_device_guard.py) finds what runs; this finds what is written,
including paths no test reaches."""

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ebft_megatron"
FACTORIES = {"tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "rand", "randn", "randint",
             "randperm", "linspace", "eye", "from_numpy"}

DATA_INDICES = "indices of host data: chunks are picked on the host and then cross to the device at one boundary"
ALLOWED = {  # "file::function": why it is made on the host
    "data/packing.py::PackedChunks.select": "the corpus is packed on the host; batches cross at runtime.device.to_device",
    "data/packing.py::pack_documents": "the corpus is packed on the host; batches cross at runtime.device.to_device",
    "data/packing.py::pack_aligned": "the corpus is packed on the host; batches cross at runtime.device.to_device",
    "training/loop.py::Trainer._micro_batches": DATA_INDICES,
    "evaluation/ce.py::validation_ce": DATA_INDICES,
    "evaluation/feature_matching.py::feature_matching_curve": DATA_INDICES,
    "evaluation/completions.py::complete_in_context": DATA_INDICES,
    "evaluation/feature_matching.py::_CurveSums.__init__": "the curve's running sums: a few numbers per batch, kept on the host",
    "evaluation/feature_matching.py::_CurveSums.curve": "the curve's sums, moved to the device for their one all-reduce",
    "evaluation/unit_tests.py::UnitTestReward.__call__": "rewards come from programs run on the host",
    "models/attention_kernels.py::attend_backward": "0-dim host tensors as the CUDA kernel's unused dropout seed "
                                                    "and offset (host scalars, as CUDA allows)",
    "models/lora.py::_adapter_class.LoraAdapter.__init__": "an adapter is built on the host, then moved beside the weight it adapts",
    "models/lora.py::_init_a": "initial values drawn on the host from a layout-independent generator",
    "models/lora.py::attach_adapters": "full-size initial values, copied into each rank's shard on the device",
    "runtime/cpu_fallbacks.py::_cpu_causal_mask": "a CPU fallback: only ever applied without CUDA",
    "runtime/cpu_fallbacks.py::_cpu_sliding_window_mask": "a CPU fallback: only ever applied without CUDA",
    "training/checkpointing.py::_decode_rng": "the state of the rollout sampler's host generator",
}


class _Creations(ast.NodeVisitor):
    """torch.<factory>(...) calls without a device= keyword, by qualified name of the function."""

    def __init__(self):
        self.names, self.found = [], {}

    def _scope(self, node):
        self.names.append(node.name)
        self.generic_visit(node)
        self.names.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _scope

    def visit_Call(self, node):
        if (isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "torch" and node.func.attr in FACTORIES
                and not any(keyword.arg == "device" for keyword in node.keywords)):
            self.found.setdefault(".".join(self.names) or "<module>", []).append(node.lineno)
        self.generic_visit(node)


def creations_without_device():
    """{"file::qualified.function": [line, ...]} of tensor creations without a device."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        visitor = _Creations()
        visitor.visit(ast.parse(path.read_text(), filename=str(path)))
        for name, lines in visitor.found.items():
            found[f"{path.relative_to(PACKAGE)}::{name}"] = lines
    return found


def test_every_tensor_the_package_creates_names_its_device():
    found = creations_without_device()
    unexplained = {key: lines for key, lines in found.items() if key not in ALLOWED}
    assert not unexplained, ("tensors created without a device (name it: device=runtime.device.current(), or an "
                             f"input's .device; or add the place to ALLOWED with its reason): {unexplained}")


def test_the_allow_list_holds_only_places_that_need_it():
    stale = sorted(set(ALLOWED) - set(creations_without_device()))
    assert not stale, f"ALLOWED names places that create no host tensor any more: {stale}"


def test_the_rule_sees_a_creation_without_a_device(tmp_path, monkeypatch):
    (tmp_path / "sample.py").write_text("import torch\n\ndef make():\n    return torch.zeros(3), torch.ones(2, device='cpu')\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path)
    assert creations_without_device() == {"sample.py::make": [4]}
