"""The CUDA side of the fused attention kernels (attention_kernels), run on CPU through emulations of
torch's memory-efficient attention operators that read memory the way the CUDA kernels do
(tests/models/cuda_attention_emulation.py): the packed block attention through that side must
equal the dense reference, forward and all three gradients, at micro-batches 1 to 3, with
grouped-query heads, with and without document masking, in fp32 and bf16."""

import math

import pytest
import torch

from ebft_megatron.block_layout import BlockLayout
from ebft_megatron.models import attention_kernels as kernels
from ebft_megatron.models.attention import BlockAttentionParams, RolloutKVCache
from tests.models import cuda_attention_emulation as emulation
from tests.models.test_attention import H, HKV, D, LAYOUTS, IDS, core  # noqa: F401
from tests.test_block_layout import document_ids_with_every_case

# the multi-tile layouts and the overlapping windows; the others add nothing the contract sees
CONTRACT_LAYOUTS = {name: settings for name, settings in zip(IDS, LAYOUTS) if name in ("s<G", "NB=17", "NB=24")}


@pytest.fixture
def cuda_side(monkeypatch):
    """attention_kernels' CUDA branch, on the emulated CUDA operators."""
    monkeypatch.setattr(kernels, "_uses_cpu_kernels", lambda tensor: False)
    monkeypatch.setattr(kernels, "_cuda_forward", emulation.efficient_attention_forward)
    monkeypatch.setattr(kernels, "_cuda_backward", emulation.efficient_attention_backward)


def _inputs(layout, batch, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    S = layout.packed_len
    q, k, v = (torch.randn(S, batch, heads, D, generator=gen) for heads in (H, HKV, HKV))
    upstream = torch.randn(S, batch, H * D, generator=gen)
    return [x.to(dtype) for x in (q, k, v, upstream)]


def _document_ids(layout, batch):
    """[batch, P] document ids with every case (a rollout step blind to its prefix, a window that
    crosses documents), drawn for two chunks or more and cut to ``batch``: one chunk alone rarely
    holds them all."""
    doc_ids = document_ids_with_every_case(layout, max(batch, 2), seed=batch)[-batch:]
    assert (~layout.prefix_visibility(0, layout.num_blocks, layout.chunk_len, doc_ids).any(-1)).any()
    return doc_ids


def _run(core, layout, inputs, path, doc_ids=None):
    """(out, dq, dk, dv) in fp32 of one forward and backward of ``path``: "fused", "generic", or
    "dense" (the dense masked attention, the reference)."""
    *qkv, upstream = inputs
    q, k, v = (x.clone().requires_grad_(True) for x in qkv)
    if path == "dense":
        out = core(q, k, v, ~layout.dense_attention_mask(doc_ids)[:, None] if doc_ids is not None
                   else ~layout.dense_attention_mask()[None, None])
    else:
        core.set_implementation(path)
        try:
            out = core(q, k, v, None, packed_seq_params=BlockAttentionParams(layout=layout, mode="packed",
                                                                             doc_ids=doc_ids))
        finally:
            core.set_implementation("fused")
    out.backward(upstream)
    return [x.float() for x in (out.detach(), q.grad, k.grad, v.grad)]


def _reference(core, layout, inputs, doc_ids):
    """The dense reference in fp64 from the same (possibly rounded) inputs."""
    return _run(core, layout, [x.double() for x in inputs], "dense", doc_ids)


def _relative_errors(got, expected):
    return {name: float((a - b.float()).abs().max() / b.float().abs().max())
            for name, a, b in zip(("out", "dq", "dk", "dv"), got, expected)}


# bf16 has 8 significant bits (relative rounding 2^-8 = 3.9e-3); the fused path rounds its parts'
# outputs, the merge and each gradient share, a few roundings deep
BF16_TOLERANCE = 2e-2
FP32_TOLERANCE = 1e-5


@pytest.mark.parametrize("documents", [False, True], ids=["", "documents"])
@pytest.mark.parametrize("batch", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", CONTRACT_LAYOUTS)
def test_packed_attention_through_the_cuda_kernels_equals_the_dense_reference(
        core, cuda_side, name, dtype, batch, documents):
    layout = BlockLayout(*CONTRACT_LAYOUTS[name])
    doc_ids = _document_ids(layout, batch) if documents else None
    inputs = _inputs(layout, batch, dtype, seed=batch + 10)
    fused = _run(core, layout, inputs, "fused", doc_ids)
    expected = _reference(core, layout, inputs, doc_ids)
    errors = _relative_errors(fused, expected)
    tolerance = FP32_TOLERANCE if dtype == torch.float32 else BF16_TOLERANCE
    assert all(error < tolerance for error in errors.values()), f"largest relative differences: {errors}"
    if dtype == torch.bfloat16:  # and the generic path, in the same precision, is as close
        generic = _relative_errors(_run(core, layout, inputs, "generic", doc_ids), expected)
        assert all(error < tolerance for error in generic.values()), f"generic path: {generic}"


def test_the_emulation_reads_what_the_kernel_reads():
    """The backward kernel reads ``out`` with row stride H * d whatever its strides say: a view of
    rows of a [L, B, H, d] tensor at B = 2 is read from the wrong rows, and reads past its end come
    back as NaN. A dense [B, L, H, d] layout is read as it is."""
    L, B, heads, d = 5, 2, 3, 4
    storage = torch.arange(L * B * heads * d, dtype=torch.float32).view(L, B, heads, d)
    view = storage.permute(1, 2, 0, 3)  # [B, H, L, d], row stride B * H * d
    read = emulation._out_as_read_by_backward(view)  # [B, L, H, d]
    assert torch.equal(read[0, 0], view[0, :, 0])  # the first row of the first batch entry is right
    assert not torch.equal(read[0, 1], view[0, :, 1])  # the second row is read H * d elements on
    assert torch.equal(read[0, 1], view[1, :, 0])  # ... which is the second batch entry's first row
    past_the_end = emulation.read_as_kernel(view, (2,), (L * B * heads * d,))  # the first element, then one past the end
    assert past_the_end[0] == 0 and torch.isnan(past_the_end[1])
    dense = view.transpose(1, 2).contiguous().transpose(1, 2)
    assert torch.equal(emulation._out_as_read_by_backward(dense), dense.transpose(1, 2))


def test_the_emulation_refuses_what_the_kernels_cannot_take():
    q = torch.randn(1, 2, 3, 8, dtype=torch.bfloat16)
    lowest = torch.finfo(torch.bfloat16).min
    with pytest.raises(emulation.KernelContractError, match="non-finite"):
        mask = torch.zeros(1, 2, 3, 16, dtype=torch.bfloat16)[..., :3]
        mask[..., 2] = float("-inf")
        emulation.efficient_attention_forward(q, q, q, mask, True, 0.0, False, scale=1.0)
    with pytest.raises(emulation.KernelContractError, match="without a visible key"):
        mask = torch.zeros(1, 2, 3, 16, dtype=torch.bfloat16)[..., :3]
        mask[:, :, 1] = lowest
        emulation.efficient_attention_forward(q, q, q, mask, True, 0.0, False, scale=1.0)
    with pytest.raises(emulation.KernelContractError, match="row stride"):
        emulation.efficient_attention_forward(q, q, q, torch.zeros(1, 2, 3, 3, dtype=torch.bfloat16),
                                              True, 0.0, False, scale=1.0)
    with pytest.raises(emulation.KernelContractError, match="equal heads"):
        emulation.efficient_attention_forward(q, q[:, :1], q[:, :1], None, True, 0.0, False, scale=1.0)
    with pytest.raises(emulation.KernelContractError, match="logsumexp"):
        out, lse, *_ = emulation.efficient_attention_forward(q, q, q, None, True, 0.0, False, scale=1.0)
        emulation.efficient_attention_backward(q, q, q, q, None, out, lse[..., :3], None, None, 0.0,
                                               [True] * 4, False, scale=1.0)


def test_the_emulation_is_attention():
    """Forward and backward of the emulation against autograd through a plain softmax attention."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=gen, dtype=torch.float64).requires_grad_(True) for _ in range(3))
    grad = torch.randn(2, 3, 5, 8, generator=gen, dtype=torch.float64)
    scale = 1 / math.sqrt(8)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    expected = torch.softmax((q @ k.transpose(-1, -2) * scale).masked_fill(~causal, float("-inf")), -1) @ v
    expected.backward(grad)
    out, lse, *_ = emulation.efficient_attention_forward(q.detach(), k.detach(), v.detach(), None, True, 0.0,
                                                         True, scale=scale)
    assert lse.shape[-1] == 32 and torch.isinf(lse[..., 5:]).all()
    torch.testing.assert_close(out.double(), expected.detach(), atol=1e-6, rtol=1e-6)
    grads = emulation.efficient_attention_backward(grad, q.detach(), k.detach(), v.detach(), None, out, lse,
                                                   None, None, 0.0, [True, True, True, False], True, scale=scale)
    for got, want in zip(grads[:3], (q.grad, k.grad, v.grad)):
        torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-6)


def test_masks_for_the_cuda_side_have_aligned_rows(cuda_side):
    allowed = torch.ones(5, 23, dtype=torch.bool).tril()
    mask = kernels.prepare_mask(allowed, torch.float32)
    assert tuple(mask.shape) == (5, 23) and mask.stride(0) == 32
    assert torch.equal(mask == 0, allowed)
    # hidden keys: a large negative that stays finite where the CUDA kernel scales it by log2(e)
    assert torch.equal(mask != 0, mask <= emulation.MASKED_BELOW)
    assert torch.isfinite(mask * emulation.LOG2E).all()
    # a row without a visible key is left open: no kernel is handed one, the caller discards it
    allowed[2] = False
    mask = kernels.prepare_mask(allowed, torch.bfloat16)
    assert torch.equal(mask[2], torch.zeros(23, dtype=torch.bfloat16))
    assert torch.equal(mask[3] == 0, allowed[3])
    assert torch.equal(kernels.blind_rows(allowed), torch.arange(5) == 2)
    assert not kernels.blind_rows(torch.ones(5, 23, dtype=torch.bool).tril()).any()


@pytest.mark.parametrize("documents", [False, True], ids=["", "documents"])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_decode_through_the_cuda_kernels_reproduces_the_packed_attention(core, cuda_side, dtype, batch, documents):
    """Prefill, then the rollout tokens one step at a time through the decode path's two kernel
    calls per step, on the emulated CUDA operators: every step's output equals the packed
    attention's rows for those tokens (both in ``dtype``, on the same kernels)."""
    layout = BlockLayout(*CONTRACT_LAYOUTS["NB=17"])
    doc_ids = _document_ids(layout, batch) if documents else None
    q, k, v, _ = _inputs(layout, batch, dtype, seed=batch + 20)
    P, NB, n = layout.chunk_len, layout.num_blocks, layout.num_samples
    tolerance = FP32_TOLERANCE if dtype == torch.float32 else BF16_TOLERANCE
    with torch.no_grad():
        packed = core(q, k, v, None, packed_seq_params=BlockAttentionParams(layout=layout, mode="packed",
                                                                             doc_ids=doc_ids)).float()
        cache = RolloutKVCache()
        core(q[:P], k[:P], v[:P], None, packed_seq_params=BlockAttentionParams(
            layout=layout, mode="prefill", cache=cache, doc_ids=doc_ids))
        for t in range(layout.rollout_len):
            rows = torch.tensor([layout.rollout_index(b, i, t) for b in range(NB) for i in range(n)])
            out = core(q[rows], k[rows], v[rows], None, packed_seq_params=BlockAttentionParams(
                layout=layout, mode="decode", cache=cache, step=t, doc_ids=doc_ids)).float()
            error = float((out - packed[rows]).abs().max() / packed[rows].abs().max())
            assert error < tolerance, f"step {t}: largest relative difference {error}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("documents", [False, True])
def test_the_hosts_decode_prefix_call_skips_hidden_key_tiles_and_matches_one_call(dtype, documents):
    """A decode step's prefix rows at the benchmark's layout (P = 1024, 127 blocks, n = 4, 3 query
    heads a KV head): each run of rows is computed over the key tiles its blocks can see, with the
    values of one call over all keys to rounding (the products over fewer keys add in another
    order)."""
    from ebft_megatron.block_layout import BlockLayout
    from ebft_megatron.models.attention import prefix_key_bounds

    layout = BlockLayout(1024, 8, 8, 8, 4)
    rows_per_block, B, Hkv, d, P = 4 * 3, 2, 3, 64, 1024
    rows = layout.num_blocks * rows_per_block
    bounds = prefix_key_bounds(layout, rows_per_block)
    # keys [0, 128) for the first rows, [0, 256) for the next, ... all of them for the last
    assert [stop for _, stop in kernels._cpu_tiles(bounds, P)] == list(range(128, P + 1, 128))
    generator = torch.Generator().manual_seed(5)
    q = torch.randn(B, Hkv, rows, d, generator=generator).to(dtype)
    k, v = (torch.randn(B, Hkv, P, d, generator=generator).to(dtype) for _ in range(2))
    visible = layout.prefix_visibility(0, layout.num_blocks, P)[:, 0].repeat_interleave(rows_per_block, dim=0)
    if documents:  # documents only hide more: [B, 1, rows, P]
        starts = torch.tensor([[0, 300, 700], [0, 100, 900]])
        doc_ids = (torch.arange(P)[None, None, :] >= starts[:, :, None]).sum(1)
        row_docs = doc_ids[:, layout.anchors].repeat_interleave(rows_per_block, dim=1)
        visible = (visible[None] & (doc_ids[:, None, :] == row_docs[..., None]))[:, None]
    mask = kernels.prepare_mask(visible, dtype)
    whole = kernels.attend(q, k, v, 0.125, mask)
    bounded = kernels.attend(q, k, v, 0.125, mask, key_bounds=bounds)
    torch.testing.assert_close(bounded[0], whole[0])  # the dtype's tolerance
    torch.testing.assert_close(bounded[1], whole[1])
