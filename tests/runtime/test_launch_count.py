"""The launch counter (``runtime.launch_count``): ops, device kernels and host syncs by phase.

Every case runs in one fresh process under the device guard (``EBFT_DEVICE_GUARD=1``: the guard is
process-wide, and its emulated GPU is what makes a tensor a GPU tensor), which prints what the
counter saw for each; the tests below hold each rule to numbers derived by hand, each with its
reason. A second process without the guard shows that nothing is a GPU tensor there.
"""

import json
import subprocess
import sys
import textwrap

import pytest

from tests.runtime.test_device_guard import GUARDED, ROOT

CASES = """
    import json
    import torch
    import torch.distributed as dist
    from ebft_megatron.runtime import device, device_guard, distributed
    from ebft_megatron.runtime.launch_count import LaunchCounter
    from ebft_megatron.runtime.timing import PhaseTimer

    distributed.initialize(1, 1)
    gpu = device.current()
    seen = {}

    def count(name, action):
        with LaunchCounter() as counter:
            action()
        seen[name] = counter.as_dict()["total"]

    x = torch.arange(6.0, device=gpu)
    h = torch.arange(6.0)
    hs, s = h.sum(), x.sum()
    mask, idx = x > 2, torch.tensor([0, 2], device=gpu)
    m = x.view(2, 3)
    r = torch.tensor([1, 0, 2, 1, 0, 1], device=gpu)
    y, hh = x.clone(), h.clone()
    pinned, unpinned, batch = torch.ones(3).pin_memory(), torch.ones(3), torch.ones(3)

    count("item on the GPU", lambda: s.item())
    count("item on the host", lambda: hs.item())
    count("float, int, bool", lambda: (float(s), int(s), bool(s)))
    count("if tensor", lambda: 1 if (x > 0).any() else 0)
    count("bool mask index", lambda: x[mask])
    count("integer index", lambda: x[idx])
    count("bool mask assignment", lambda: y.__setitem__(mask, 0.0))
    count("nonzero", lambda: torch.nonzero(x))
    count("masked_select", lambda: torch.masked_select(x, mask))
    count("unique", lambda: torch.unique(x))
    count("equal", lambda: torch.equal(x, x))
    count("allclose", lambda: torch.allclose(x, x))
    count("repeat_interleave", lambda: torch.repeat_interleave(x, r))
    count("repeat_interleave with output_size", lambda: torch.repeat_interleave(x, r, output_size=5))
    count("tolist", lambda: x.tolist())
    count("tolist on the host", lambda: h.tolist())
    count("cpu", lambda: x.cpu())
    count("cpu then numpy", lambda: x.cpu().numpy())
    count("to the host", lambda: x.to("cpu"))
    count("copy_ to the host", lambda: hh.copy_(x))
    count("copy_ to the GPU", lambda: y.copy_(h))
    count("copy_ on the GPU", lambda: y.copy_(x))
    count("tensor of host data onto the GPU", lambda: torch.tensor([1, 2], device="cuda"))
    count("as_tensor of host data onto the GPU", lambda: torch.as_tensor([1, 2], device=gpu))
    count("tensor of GPU values", lambda: torch.tensor([s, s]))
    count("to the GPU", lambda: h.to(gpu))
    count("cuda", lambda: h.cuda())
    count("a dtype change on the GPU, naming the GPU", lambda: x.to(device=gpu, dtype=torch.float64))
    count("pinned non-blocking", lambda: pinned.to(gpu, non_blocking=True))
    count("pinned blocking", lambda: pinned.to(gpu))
    count("unpinned non-blocking", lambda: unpinned.to(gpu, non_blocking=True))
    count("a batch to the device", lambda: device.to_device(batch))
    count("add", lambda: x + x)
    count("add on the host", lambda: h + h)
    count("view", lambda: x.view(2, 3))
    count("t", lambda: m.t())
    count("views", lambda: (m.transpose(0, 1), m.permute(1, 0), m.unsqueeze(0), m[0], m[:, 1:], m.split(1),
                            m.expand(4, 2, 3), x.detach(), m.reshape(6), m.unbind(0), m.chunk(2, dim=1)))
    count("empty", lambda: torch.empty(3, device=gpu))
    count("zeros", lambda: torch.zeros(3, device=gpu))
    count("synchronize", lambda: device.synchronize())
    count("torch.cuda.synchronize", lambda: torch.cuda.synchronize())
    count("all_reduce", lambda: dist.all_reduce(y))

    mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).to(gpu)
    features = torch.ones(2, 4, device=gpu)
    count("mlp with grad", lambda: mlp(features))
    with torch.no_grad():
        count("mlp without grad", lambda: mlp(features))

    with LaunchCounter() as counter:
        with counter.phase("a"):
            x + x
            with counter.phase("b"):
                x * x
                s.item()
            x - x
        with counter.phase("b"):
            x / x
        x.neg()
        with PhaseTimer().phase("timed"):
            x + x
    seen["phases"] = counter.as_dict()

    with LaunchCounter() as counter:
        for _ in range(3):
            s.item()  # SITE 1
        s.item()  # SITE 2
        s.item()  # SITE 3
        s.item()  # SITE 4
    seen["sites"] = counter.sync_sites()

    class Twice(torch.autograd.Function):
        @staticmethod
        def forward(ctx, value):
            return value * 2

        @staticmethod
        def backward(ctx, grad):
            grad.tolist()
            return grad * torch.tensor([2.0], device=grad.device)

    leaf = torch.ones(3, device=gpu, requires_grad=True)
    loss = Twice.apply(leaf).sum()
    count("custom backward", lambda: loss.backward())

    with LaunchCounter():
        try:
            with LaunchCounter():
                pass
        except RuntimeError:
            seen["one at a time"] = True
    print("COUNTS " + json.dumps(seen))
"""

UNGUARDED = """
    import json
    import torch
    from ebft_megatron.runtime import device
    from ebft_megatron.runtime.launch_count import LaunchCounter

    x = torch.arange(6.0, device=device.current())
    with LaunchCounter() as counter:
        x.sum().item(), x.tolist(), x[x > 2], torch.tensor([1, 2], device=device.current()), x + x
        device.synchronize()
    print("COUNTS " + json.dumps({"device": str(device.current()), **counter.as_dict()["total"]}))
"""


def _counts(code: str, env: dict) -> dict:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                            timeout=300, cwd=ROOT)
    lines = [line for line in result.stdout.splitlines() if line.startswith("COUNTS ")]
    assert result.returncode == 0 and lines, result.stderr[-4000:]
    return json.loads(lines[-1][len("COUNTS "):])


@pytest.fixture(scope="module")
def seen():
    return _counts(CASES, GUARDED)


# case: what the counter must see, and why. Under the guard the data is on the host, so a GPU's
# own copies inside .tolist() are not dispatched (ops 0 there); the rules are the same.
EXPECTED = {
    # .item() dispatches _local_scalar_dense alone: a read of a device value, no kernel
    "item on the GPU": dict(ops=1, kernels=0, syncs=1, sync_kinds={"item": 1}),
    "item on the host": dict(ops=1, kernels=0, syncs=0),
    # each of float/int/bool of a tensor is one .item()
    "float, int, bool": dict(ops=3, kernels=0, syncs=3, sync_kinds={"item": 3}),
    # gt and any are kernels; `if` reads the result: one _local_scalar_dense
    "if tensor": dict(ops=3, kernels=2, syncs=1, sync_kinds={"item": 1}),
    # one aten.index; a bool mask makes its output size depend on the values
    "bool mask index": dict(ops=1, kernels=1, syncs=1, sync_kinds={"bool mask index": 1}),
    "integer index": dict(ops=1, kernels=1, syncs=0),
    # the scalar 0.0 becomes a 0-dim tensor (lift_fresh, a view) and one index_put_ with the mask
    "bool mask assignment": dict(ops=2, kernels=1, syncs=1, sync_kinds={"bool mask index": 1}),
    "nonzero": dict(ops=1, kernels=1, syncs=1, sync_kinds={"nonzero": 1}),
    "masked_select": dict(ops=1, kernels=1, syncs=1, sync_kinds={"masked_select": 1}),
    "unique": dict(ops=1, kernels=1, syncs=1, sync_kinds={"unique": 1}),
    "equal": dict(ops=1, kernels=1, syncs=1, sync_kinds={"equal": 1}),
    "allclose": dict(ops=1, kernels=1, syncs=1, sync_kinds={"allclose": 1}),
    # repeat_interleave(x, r) is repeat_interleave(r) (the indices: their number is r's sum) and
    # an index_select; given output_size, nothing needs the sum on the host
    "repeat_interleave": dict(ops=2, kernels=2, syncs=1, sync_kinds={"repeat_interleave": 1}),
    "repeat_interleave with output_size": dict(ops=2, kernels=2, syncs=0),
    # one device-to-host read, counted once
    "tolist": dict(ops=0, kernels=0, syncs=1, sync_kinds={"tolist": 1}),
    "tolist on the host": dict(ops=0, syncs=0),
    # a copy (one op, one kernel) that the host waits for
    "cpu": dict(ops=1, kernels=1, syncs=1, sync_kinds={"device-to-host copy": 1}),
    # numpy() of the host copy reads host memory (through a detach: a view)
    "cpu then numpy": dict(ops=2, kernels=1, syncs=1, sync_kinds={"device-to-host copy": 1}),
    "to the host": dict(ops=1, kernels=1, syncs=1, sync_kinds={"device-to-host copy": 1}),
    "copy_ to the host": dict(ops=1, kernels=1, syncs=1, sync_kinds={"device-to-host copy": 1}),
    "copy_ to the GPU": dict(ops=1, kernels=1, syncs=1, sync_kinds={"host-to-device copy": 1}),
    "copy_ on the GPU": dict(ops=1, kernels=1, syncs=0),
    # torch makes the host tensor and copies it with no op dispatched, then lift_fresh (a view):
    # the copy is the kernel, and a blocking one
    "tensor of host data onto the GPU": dict(ops=1, kernels=1, syncs=1, sync_kinds={"host-to-device copy": 1}),
    "as_tensor of host data onto the GPU": dict(ops=1, kernels=1, syncs=1, sync_kinds={"host-to-device copy": 1}),
    # each GPU scalar in the list is read on the host; the result stays there (lift_fresh only)
    "tensor of GPU values": dict(ops=1, kernels=0, syncs=2, sync_kinds={"GPU values read by torch.tensor": 2}),
    "to the GPU": dict(ops=1, kernels=1, syncs=1, sync_kinds={"host-to-device copy": 1}),
    "cuda": dict(ops=1, kernels=1, syncs=1, sync_kinds={"host-to-device copy": 1}),
    # one _to_copy that converts in place on the device: no move (megatron's RoPE does this)
    "a dtype change on the GPU, naming the GPU": dict(ops=1, kernels=1, syncs=0),
    # from pinned memory without blocking: a copy the host does not wait for, counted apart
    "pinned non-blocking": dict(ops=1, kernels=1, syncs=0, async_copies=1),
    "pinned blocking": dict(ops=1, kernels=1, syncs=1, async_copies=0),
    # from pageable memory CUDA copies through a staging buffer: the host waits
    "unpinned non-blocking": dict(ops=1, kernels=1, syncs=1, async_copies=0),
    # the runtime's one boundary for batches pins and copies without blocking
    "a batch to the device": dict(ops=1, kernels=1, syncs=0, async_copies=1),
    "add": dict(ops=1, kernels=1, syncs=0),
    # a host op launches nothing on the device
    "add on the host": dict(ops=1, kernels=0, syncs=0),
    "view": dict(ops=1, kernels=0, syncs=0),
    "t": dict(ops=1, kernels=0, syncs=0),
    "views": dict(kernels=0, syncs=0),
    # an allocation is no kernel; zeros fills its memory
    "empty": dict(ops=1, kernels=0, syncs=0),
    "zeros": dict(ops=1, kernels=1, syncs=0),
    # waits dispatch nothing
    "synchronize": dict(ops=0, kernels=0, syncs=1, sync_kinds={"synchronize": 1}),
    "torch.cuda.synchronize": dict(ops=0, kernels=0, syncs=1, sync_kinds={"synchronize": 1}),
    # one collective op, one kernel (NCCL's); no host wait
    "all_reduce": dict(ops=1, kernels=1, syncs=0),
    # Linear(4, 8): t (a view) + addmm; ReLU: relu; Linear(8, 3): t + addmm. With grad, autograd
    # keeps ReLU's output for its backward through a detach (a view).
    "mlp without grad": dict(ops=5, kernels=3, syncs=0),
    "mlp with grad": dict(ops=6, kernels=3, syncs=0),
    # the custom backward's .tolist() and torch.tensor(..., device=gpu): torch runs custom
    # backwards without function modes, the counter's is carried in (runtime.backward_modes)
    "custom backward": dict(syncs=2, sync_kinds={"tolist": 1, "host-to-device copy": 1}),
}


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_each_rule(seen, case):
    got = seen[case]
    assert {key: got[key] for key in EXPECTED[case]} == EXPECTED[case]


def test_phases_take_the_innermost_and_the_total_everything(seen):
    phases = seen["phases"]
    pick = {name: (c["ops"], c["kernels"], c["syncs"]) for name, c in phases.items()}
    assert pick == {
        "a": (2, 2, 0),  # x + x and x - x (x * x is b's, inside)
        "b": (3, 2, 1),  # x * x, the .item() (no kernel, a sync), and x / x when b is entered again
        "timed": (1, 1, 0),  # a PhaseTimer phase is a counter phase, and does not wait for the device
        "outside": (1, 1, 0),  # x.neg()
        "total": (7, 6, 1),
    }
    assert phases["timed"]["sync_kinds"] == {}


def test_sync_sites_name_the_first_few_lines(seen):
    lines = textwrap.dedent(CASES).splitlines()
    line_of = {n: next(i + 1 for i, text in enumerate(lines) if f"# SITE {n}" in text) for n in (1, 2, 3, 4)}
    # three places kept, each once however often it synced; the fourth is dropped
    assert seen["sites"] == {"item": [f"<string>:{line_of[n]} in <module>" for n in (1, 2, 3)]}


def test_one_counter_at_a_time(seen):
    assert seen["one at a time"] is True


def test_without_a_gpu_nothing_is_a_kernel_or_a_sync():
    """No CUDA and no guard: every tensor is on the host, so the counter counts ops only."""
    env = {key: value for key, value in GUARDED.items() if key != "EBFT_DEVICE_GUARD"}
    counts = _counts(UNGUARDED, env)
    assert counts["device"] == "cpu"
    assert counts["kernels"] == 0 and counts["syncs"] == 0 and counts["ops"] > 0
