"""Every CPU fallback that megatron-core needs, in one place.

megatron-core assumes CUDA in a handful of spots. On a CPU-only torch (our CI, laptops) these
spots raise "Torch not compiled with CUDA enabled". ``apply()`` patches exactly those spots and
nothing else; it is a no-op when ``torch.cuda.is_available()``, so GPU runs execute megatron-core
unmodified.

The patches:

P2  ``torch.cuda.current_device/synchronize/current_stream/Stream/stream/Event``: megatron
    allocates with ``device=torch.cuda.current_device()`` (p2p buffers, DDP grad buffers, global
    memory buffer, rotary ``inv_freq``) and syncs streams in the p2p and DDP code; the MoE
    all-to-all dispatcher makes a side stream for its device-to-host copies of the split sizes.
    There is one null stream: every stream is the current one, so nothing is recorded on it.
P3  A ``TorchFunctionMode`` that rewrites literal ``device="cuda"`` to CPU, makes
    ``Tensor.cuda()`` the identity, and reports CPU tensors' ``.type()`` as ``torch.cuda.*``
    because the optimizer and grad clipping branch on those strings.
    A TorchFunctionMode is not active inside autograd backward; P6 covers the one spot that
    matters there (activation recompute building default masks).
P4  A CPU RNG tracker replacing ``model_parallel_cuda_manual_seed``: DotProductAttention always
    forks the tracker, and the CUDA tracker calls ``torch.cuda.get_rng_state``.
P5  ``tensor_parallel.random._get_cuda_rng_state/_set_cuda_rng_state`` wrap the CPU RNG, for
    activation recompute and the tracker's ``fork``.
P6  ``get_default_causal_mask``/``get_sliding_window_causal_mask`` allocate on ``"cuda"``; they are
    replaced in both modules that bound them by name.
P7  dist-checkpoint saves use a thread queue instead of a spawned multiprocessing Manager (the
    spawn re-imports ``__main__`` and costs 2-13 s on the first save). This one is applied on GPU
    too: it is a pure speed/robustness choice, not a CUDA fallback.
P8  Without Transformer Engine, megatron's output-discarding checkpoint (the norm recompute of
    selective recompute) reaches for TE's FP8 state: its fp8 flag is ``fp8 is not None``, true for
    the default ``fp8=False``. Stand-ins that say FP8 is off are put where it looks. Applied
    wherever TE is missing, GPU included; with TE nothing changes.
P9  Without Transformer Engine, the MoE router's linear reads the name ``te_general_gemm``, which
    megatron defines only when TE imports; it is defined as None, which sends the router to its
    torch matmul. Applied wherever TE is missing, GPU included.
P10 The MoE all-to-all dispatcher turns its split sizes into host numbers by copying them off the
    GPU (``maybe_move_tensor_to_cpu`` turns only CUDA tensors into numpy); on the host they stayed
    tensors, which gloo's all-to-all refuses. The host's split sizes become numpy too.
P11 gloo gathers and reduce-scatters only equal shares, and the MoE dispatcher's gather over the
    expert-TP ranks (and its reduce-scatter back) moves as many tokens as each rank routed there:
    megatron's first-dimension gather and reduce-scatter with split sizes pad each share to the
    largest and cut the padding off again.

Under the device guard (``EBFT_DEVICE_GUARD=1``, ``runtime.device_guard``) P3 is replaced by the
guard's mode, which also tracks which tensors a GPU run would hold on the GPU and fails where CUDA
would; ``current_device()`` then answers the emulated GPU's index, as CUDA answers an index.

P1 (stubbing a triton-only MoE module) is not needed by megatron-core 0.16.1, which we pin.
"""

from __future__ import annotations

import queue
import time

import torch

from ebft_megatron.runtime import device_guard, rows

_APPLIED = False


def cuda_available() -> bool:
    return torch.cuda.is_available()


def apply() -> None:
    """Apply the CPU fallbacks once per process. Safe to call many times."""
    global _APPLIED
    if _APPLIED:
        return
    _APPLIED = True
    _use_thread_queue_for_checkpoint_writes()
    _fp8_state_without_transformer_engine()
    _router_gemm_without_transformer_engine()
    if cuda_available():
        return
    _patch_cuda_runtime_calls()
    if device_guard.active():
        device_guard.enter()
    else:
        _enter_cuda_to_cpu_mode()
    _patch_rng_state_helpers()
    _patch_default_masks()
    _host_split_sizes_for_all_to_all()
    _uneven_first_dim_collectives()


# --- P2 -------------------------------------------------------------------------------------
class _NullStream:
    def __init__(self, *args, **kwargs):
        pass

    def __eq__(self, other) -> bool:
        return isinstance(other, _NullStream)

    def __hash__(self) -> int:
        return 0

    def wait_event(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def record_event(self, *args, **kwargs):
        return _TimingEvent()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _TimingEvent:
    def __init__(self, *args, **kwargs):
        self._time = None

    def record(self, *args, **kwargs):
        self._time = time.perf_counter()

    def elapsed_time(self, end: "_TimingEvent") -> float:
        return (end._time - self._time) * 1000.0

    def synchronize(self):
        pass

    def wait(self, *args, **kwargs):
        pass

    def query(self) -> bool:
        return True


def _patch_cuda_runtime_calls() -> None:
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.current_stream = lambda *args, **kwargs: _NullStream()
    torch.cuda.Stream = _NullStream
    torch.cuda.stream = lambda *args, **kwargs: _NullStream()
    torch.cuda.Event = _TimingEvent


# --- P3 -------------------------------------------------------------------------------------
def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


class _CudaToCpuMode(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to:
            args = tuple("cpu" if _is_cuda_device(a) else a for a in args)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return device_guard.cuda_type_name(func(*args))
        return func(*args, **kwargs)


def _enter_cuda_to_cpu_mode() -> None:
    _CudaToCpuMode().__enter__()


# --- P4 / P5 --------------------------------------------------------------------------------
def _patch_rng_state_helpers() -> None:
    from megatron.core.tensor_parallel import random as tp_random

    tp_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    tp_random._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)


def seed_model_parallel_rng(seed: int, tp_rank: int, ep_rank: int = 0, etp_rank: int = 0) -> None:
    """CPU replacement for ``tensor_parallel.model_parallel_cuda_manual_seed`` (P4).

    Seeds the tracker's named states the way megatron does (data-parallel: ``seed``;
    tensor-parallel: ``seed + 2718 + tp_rank``; expert: ``seed + 1024 + 100*ep + etp``), but
    stores CPU generator states, which ``fork`` swaps in through the P5 helpers.
    """
    from megatron.core.tensor_parallel import random as tp_random

    class CpuRNGStatesTracker(tp_random.CudaRNGStatesTracker):
        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    tracker = CpuRNGStatesTracker()
    tracker.add(tp_random._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(tp_random._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(tp_random._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024 + 100 * ep_rank + etp_rank)
    tp_random._CUDA_RNG_STATE_TRACKER = tracker
    tp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


# --- P6 -------------------------------------------------------------------------------------
def _cpu_causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


def _cpu_sliding_window_mask(sq, skv, window_size) -> torch.Tensor:
    ones = torch.ones(sq, skv, dtype=torch.bool)
    upper = torch.triu(ones, diagonal=skv - sq - window_size[0])
    return ~torch.tril(upper, diagonal=skv - sq + window_size[1])


def _patch_default_masks() -> None:
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils as transformer_utils

    for module in (transformer_utils, fused_softmax):
        module.get_default_causal_mask = _cpu_causal_mask
        module.get_sliding_window_causal_mask = _cpu_sliding_window_mask


# --- P7 -------------------------------------------------------------------------------------
def _use_thread_queue_for_checkpoint_writes() -> None:
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", None) is None:
        filesystem_async._results_queue = queue.Queue()


# --- P8 -------------------------------------------------------------------------------------
class _FP8Off:
    """What megatron asks of TE's FP8GlobalStateManager, when there is no TE: FP8 is off."""

    @staticmethod
    def is_fp8_enabled() -> bool:
        return False

    @staticmethod
    def get_fp8_recipe():
        return None


def _no_context(*args, **kwargs):
    import contextlib

    return contextlib.nullcontext()


def _fp8_state_without_transformer_engine() -> None:
    from megatron.core.tensor_parallel import random

    if getattr(random, "HAVE_TE", True):
        return
    random.FP8GlobalStateManager = _FP8Off
    random.activation_recompute_forward = _no_context
    random.fp8_autocast = _no_context


# --- P9 -------------------------------------------------------------------------------------
def _router_gemm_without_transformer_engine() -> None:
    from megatron.core.transformer.moe import moe_utils

    if not getattr(moe_utils, "HAVE_TE", True) and not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


# --- P10 ------------------------------------------------------------------------------------
def _host_split_sizes_for_all_to_all() -> None:
    from megatron.core.transformer.moe import token_dispatcher

    def to_host(tensor, as_numpy: bool = False, record_stream: bool = False):
        if torch.is_tensor(tensor) and as_numpy:
            return tensor.detach().cpu().numpy()
        return tensor.cpu() if torch.is_tensor(tensor) else tensor

    token_dispatcher.maybe_move_tensor_to_cpu = to_host


# --- P11 ------------------------------------------------------------------------------------
def _uneven_first_dim_collectives() -> None:
    import torch.distributed as dist
    from megatron.core.tensor_parallel import mappings

    gather, reduce_scatter = mappings._gather_along_first_dim, mappings._reduce_scatter_along_first_dim

    def uneven_gather(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return gather(input_, group, output_split_sizes, use_global_buffer)
        return rows.gather_rows(input_, [int(n) for n in output_split_sizes], group)

    def uneven_reduce_scatter(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1:
            return reduce_scatter(input_, group, input_split_sizes, use_global_buffer)
        sizes = [int(n) for n in input_split_sizes]
        longest = max(sizes)
        parts = torch.cat([rows.pad_rows(part, longest) for part in torch.split(input_, sizes, dim=0)])
        output = input_.new_empty(longest, *input_.shape[1:])
        dist.reduce_scatter_tensor(output, parts, group=group)
        return output[: sizes[dist.get_rank(group)]]

    mappings._gather_along_first_dim = uneven_gather
    mappings._reduce_scatter_along_first_dim = uneven_reduce_scatter
