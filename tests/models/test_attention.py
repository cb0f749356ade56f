"""BlockCoreAttention: the block-structured paths (packed, prefill + decode) against the dense
masked path, forward and backward, and the dense path against a hand-written attention."""

import math

import pytest
import torch

from ebft_megatron.models import attention as attention_module
from ebft_megatron.models.attention import BlockAttentionParams, BlockCoreAttention, RolloutKVCache
from ebft_megatron.block_layout import BlockLayout
from tests.test_block_layout import document_ids_with_every_case, reference_document_mask

H, HKV, D, B = 4, 2, 16, 2
TOL = dict(atol=1e-5, rtol=1e-5)

# (P, C, s, G, n); NB in the comment. Several have NB > TILE_BLOCKS so that more than one prefix
# tile (and a partial last tile) is exercised.
LAYOUTS = [
    (32, 8, 4, 4, 2),  # s == G, NB=6
    (16, 2, 1, 3, 2),  # s < G (overlapping windows), NB=12
    (20, 3, 5, 2, 3),  # s > G, NB=4
    (10, 1, 1, 1, 2),  # G == 1, NB=9
    (24, 4, 2, 2, 1),  # n == 1, NB=10
    (40, 4, 2, 4, 1),  # NB=17: three tiles, the last holding one block
    (27, 2, 1, 2, 2),  # NB=24: three full tiles
]
IDS = ["s=G", "s<G", "s>G", "G=1", "n=1", "NB=17", "NB=24"]


@pytest.fixture(scope="module")
def core():
    from ebft_megatron.models import architecture, gpt
    from ebft_megatron.runtime import distributed

    distributed.initialize(1, 1)
    arch = architecture.from_hf_config(dict(
        architectures=["LlamaForCausalLM"], hidden_size=64, num_attention_heads=H,
        num_key_value_heads=HKV, intermediate_size=128, num_hidden_layers=2, vocab_size=300,
    ))
    config = gpt.transformer_config(arch, 1, 1)
    module = BlockCoreAttention(config, layer_number=1, attn_mask_type=None, attention_type="self")
    assert module.softmax_scale == pytest.approx(1.0 / math.sqrt(D))
    return module


def _qkv(S, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(S, B, H, D, generator=gen)
    k = torch.randn(S, B, HKV, D, generator=gen)
    v = torch.randn(S, B, HKV, D, generator=gen)
    return q, k, v


def _manual_attention(q, k, v, allowed, scale):
    """q [S,B,H,d], k/v [S,B,Hkv,d], allowed [S,S] (True = may attend) -> [S,B,H*d].
    Query head h uses key/value group h // (H // Hkv) (megatron's query groups)."""
    S = q.shape[0]
    rep = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(rep, dim=2)
    v = v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("qbhd,kbhd->bhqk", q.double(), k.double()) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    out = torch.einsum("bhqk,kbhd->qbhd", scores.softmax(-1), v.double())
    return out.reshape(S, q.shape[1], -1).float()


def _dense(core, q, k, v, layout):
    mask = ~layout.dense_attention_mask()[None, None]  # megatron: True = masked out
    return core(q, k, v, mask)


def _packed(core, q, k, v, layout, implementation="fused", doc_ids=None):
    core.set_implementation(implementation)
    try:
        params = BlockAttentionParams(layout=layout, mode="packed", doc_ids=doc_ids)
        return core(q, k, v, None, packed_seq_params=params)
    finally:
        core.set_implementation("fused")


def _forward_backward(core, layout, path, seed=2):
    """(out, dq, dk, dv) of ``path(core, q, k, v, layout)`` against a fixed upstream gradient."""
    base = _qkv(layout.packed_len, seed=seed)
    upstream = torch.randn(layout.packed_len, B, H * D, generator=torch.Generator().manual_seed(seed + 1))
    q, k, v = (x.clone().requires_grad_(True) for x in base)
    out = path(core, q, k, v, layout)
    (out * upstream).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


def _assert_all_close(got, expected):
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, expected):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("settings", LAYOUTS, ids=IDS)
def test_dense_path_matches_hand_written_attention(core, settings):
    layout = BlockLayout(*settings)
    q, k, v = _qkv(layout.packed_len, seed=1)
    out = _dense(core, q, k, v, layout)
    assert tuple(out.shape) == (layout.packed_len, B, H * D)
    expected = _manual_attention(q, k, v, layout.dense_attention_mask(), 1.0 / math.sqrt(D))
    torch.testing.assert_close(out, expected, **TOL)


@pytest.mark.parametrize("implementation", ["fused", "generic"])
@pytest.mark.parametrize("settings", LAYOUTS, ids=IDS)
def test_packed_equals_dense_forward_and_backward(core, settings, implementation):
    layout = BlockLayout(*settings)
    dense = _forward_backward(core, layout, _dense)
    packed = _forward_backward(core, layout, lambda *a: _packed(*a, implementation=implementation))
    assert tuple(packed[0].shape) == (layout.packed_len, B, H * D)
    _assert_all_close(packed, dense)
    # the comparison is not vacuous: rollout gradients reach the chunk keys
    assert packed[2][: layout.chunk_len].abs().sum() > 0


@pytest.mark.parametrize("settings", LAYOUTS, ids=IDS)
def test_fused_equals_generic_forward_and_backward(core, settings, monkeypatch):
    layout = BlockLayout(*settings)
    calls = []
    attend = attention_module.kernels.attend
    monkeypatch.setattr(attention_module.kernels, "attend", lambda *a, **kw: calls.append(1) or attend(*a, **kw))
    fused = _forward_backward(core, layout, lambda *a: _packed(*a, implementation="fused"))
    # chunk, own blocks and one call per prefix tile: the fused kernels ran, once per part
    assert len(calls) == 2 + len(layout.prefix_tiles(attention_module.TILE_BLOCKS))
    generic = _forward_backward(core, layout, lambda *a: _packed(*a, implementation="generic"))
    _assert_all_close(fused, generic)


def _document_ids(layout, seed):
    return document_ids_with_every_case(layout, B, seed)


def _document_reference(q, k, v, layout, doc_ids):
    """Hand-written attention under the brute-force document mask, chunk by chunk."""
    outs = []
    for row in range(B):
        allowed = reference_document_mask(*_settings_of(layout), doc_ids[row].tolist())
        outs.append(_manual_attention(q[:, row:row + 1], k[:, row:row + 1], v[:, row:row + 1], allowed,
                                      1.0 / math.sqrt(D)))
    return torch.cat(outs, dim=1)


def _settings_of(layout):
    return layout.chunk_len, layout.first_anchor, layout.stride, layout.rollout_len, layout.num_samples


@pytest.mark.parametrize("implementation", ["fused", "generic"])
@pytest.mark.parametrize("settings", LAYOUTS, ids=IDS)
def test_document_masking_packed_equals_dense_forward_and_backward(core, settings, implementation):
    layout = BlockLayout(*settings)
    doc_ids = _document_ids(layout, seed=sum(settings))

    def dense(core, q, k, v, layout):
        return core(q, k, v, ~layout.dense_attention_mask(doc_ids)[:, None])

    expected = _forward_backward(core, layout, dense)
    packed = _forward_backward(core, layout, lambda *a: _packed(*a, implementation=implementation, doc_ids=doc_ids))
    _assert_all_close(packed, expected)
    # the rule itself, from its statement (not from the layout under test)
    q, k, v = _qkv(layout.packed_len, seed=2)
    torch.testing.assert_close(packed[0], _document_reference(q, k, v, layout, doc_ids), **TOL)
    # ... and the documents matter: without them the result differs
    plain = _forward_backward(core, layout, lambda *a: _packed(*a, implementation=implementation))
    assert not torch.allclose(plain[0], expected[0], atol=1e-3)


@pytest.mark.parametrize("implementation", ["fused", "generic"])
def test_only_the_generic_path_keeps_score_matrices_for_backward(core, implementation):
    """What autograd saves for backward: the fused path keeps O(S * heads * head_dim) (inputs,
    output, row log-sum-exps); the generic path keeps its [rows x keys] probabilities."""
    layout = BlockLayout(128, 8, 8, 8, 4)  # NB=15, 480 rollout rows, prefixes up to 120 keys
    q, k, v = (x.requires_grad_(True) for x in _qkv(layout.packed_len, seed=8))
    saved = []

    def pack(tensor):
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        _packed(core, q, k, v, layout, implementation=implementation)
    activation = layout.packed_len * B * H * D
    if implementation == "fused":
        assert max(saved) <= activation
    else:
        assert max(saved) > 2 * activation


# Decode paths: the fused no-grad path (two kernel calls + log-sum-exp merge), and the generic path,
# which decode takes when grad is enabled.
DECODE_PATHS = ["fused", "generic"]


@pytest.mark.parametrize("documents", [False, True], ids=["", "documents"])
@pytest.mark.parametrize("path", DECODE_PATHS, ids=list(DECODE_PATHS))
@pytest.mark.parametrize("settings", LAYOUTS, ids=IDS)
def test_prefill_then_decode_reproduces_packed(core, settings, path, documents, monkeypatch):
    layout = BlockLayout(*settings)
    P, NB, n, G = layout.chunk_len, layout.num_blocks, layout.num_samples, layout.rollout_len
    q, k, v = _qkv(layout.packed_len, seed=4)
    doc_ids = _document_ids(layout, seed=sum(settings)) if documents else None
    fused_calls = []
    if path == "fused":
        assert attention_module.kernels.available(torch.device("cpu")), "this torch build lacks the CPU flash kernel"
        fused = attention_module.decode_attention
        monkeypatch.setattr(attention_module, "decode_attention",
                            lambda *a, **kw: fused_calls.append(1) or fused(*a, **kw))
    with torch.no_grad():
        packed = _packed(core, q, k, v, layout, doc_ids=doc_ids)
        # the fused decode reads all G own slots at every step, masking those not yet written
        if documents:  # the packed path itself is checked against the dense mask above
            torch.testing.assert_close(packed, core(q, k, v, ~layout.dense_attention_mask(doc_ids)[:, None]), **TOL)
        cache = RolloutKVCache()
        prefill = core(q[:P], k[:P], v[:P], None, packed_seq_params=BlockAttentionParams(
            layout=layout, mode="prefill", cache=cache, doc_ids=doc_ids))
        torch.testing.assert_close(prefill, packed[:P], **TOL)
        # the rollout slots start zeroed, and a step must see only those written so far: values
        # in the later slots would change its output if it saw them
        for layer in cache.layers.values():
            layer["rollout_k"].normal_(0, 3)
            layer["rollout_v"].normal_(0, 3)
    for t in range(G):
        rows = torch.tensor([layout.rollout_index(b, i, t) for b in range(NB) for i in range(n)])
        params = BlockAttentionParams(layout=layout, mode="decode", cache=cache, step=t, doc_ids=doc_ids)
        with torch.set_grad_enabled(path == "generic"):
            out = core(q[rows], k[rows], v[rows], None, packed_seq_params=params)
        assert tuple(out.shape) == (NB * n, B, H * D)
        torch.testing.assert_close(out, packed[rows], **TOL, msg=lambda m, t=t: f"step {t}: {m}")
    # the intended path ran: fused on every step, or never
    assert len(fused_calls) == (0 if path == "generic" else G)


def test_decode_masks_fold_query_heads_into_rows_and_hide_the_staircase():
    layout = BlockLayout(16, 2, 3, 2, 3)
    anchors, n, query_groups = layout.anchors, 3, 2
    assert anchors == (2, 5, 8, 11, 14)
    masks = attention_module.decode_masks(layout, query_groups, torch.float32, torch.device("cpu"))
    hidden = attention_module.kernels.masked_value(torch.float32)
    for step in range(layout.rollout_len):
        prefix, own, blind = masks.at_step(torch.tensor([step]), torch.float32)
        assert tuple(prefix.shape) == (len(anchors) * n * query_groups, 16) and blind is None
        for row in range(prefix.shape[0]):  # rows: (block, sample, query head of the group)
            visible = torch.arange(16) < anchors[row // (n * query_groups)]
            assert torch.equal(prefix[row], torch.where(visible, 0.0, hidden))
        visible = torch.arange(layout.rollout_len) <= step  # own slots written so far: 0..step
        assert torch.equal(own.flatten(), torch.where(visible, 0.0, hidden))


def test_decode_does_not_see_other_samples_or_later_steps(core):
    """Changing one (block, sample)'s later tokens or another sample's tokens leaves a decode
    output unchanged; changing its own earlier token or its prefix changes it."""
    layout = BlockLayout(16, 2, 1, 3, 2)
    P, NB, n = layout.chunk_len, layout.num_blocks, layout.num_samples
    q, k, v = _qkv(layout.packed_len, seed=5)

    def decode_step1(k, v):
        cache = RolloutKVCache()
        with torch.no_grad():
            core(q[:P], k[:P], v[:P], None,
                 packed_seq_params=BlockAttentionParams(layout=layout, mode="prefill", cache=cache))
            outs = []
            for t in range(2):
                rows = torch.tensor([layout.rollout_index(b, i, t) for b in range(NB) for i in range(n)])
                params = BlockAttentionParams(layout=layout, mode="decode", cache=cache, step=t)
                outs.append(core(q[rows], k[rows], v[rows], None, packed_seq_params=params))
        return outs[1].view(NB, n, B, H * D)

    base = decode_step1(k, v)
    b = 3
    anchor = layout.anchors[b]

    def perturbed(index):
        k2, v2 = k.clone(), v.clone()
        k2[index] += 1.0
        v2[index] += 1.0
        return decode_step1(k2, v2)

    other_sample = perturbed(layout.rollout_index(b, 1, 0))
    torch.testing.assert_close(other_sample[b, 0], base[b, 0], **TOL)
    assert not torch.allclose(other_sample[b, 1], base[b, 1], atol=1e-3)
    hidden_chunk = perturbed(anchor)  # x[a_b] is beyond block b's prefix
    torch.testing.assert_close(hidden_chunk[b], base[b], **TOL)
    assert not torch.allclose(hidden_chunk[b + 1], base[b + 1], atol=1e-3)
    visible_chunk = perturbed(anchor - 1)
    assert not torch.allclose(visible_chunk[b], base[b], atol=1e-3)


@pytest.mark.parametrize("S", [1, 7, 20])
def test_no_mask_no_params_is_causal(core, S):
    q, k, v = _qkv(S, seed=6)
    out = core(q, k, v, None)
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    torch.testing.assert_close(out, core(q, k, v, ~causal[None, None]), **TOL)
    torch.testing.assert_close(out, _manual_attention(q, k, v, causal, 1.0 / math.sqrt(D)), **TOL)


def test_tile_size_is_what_the_layouts_above_exercise():
    # the multi-tile layouts above are only meaningful while tiles hold fewer than 17 blocks
    assert attention_module.TILE_BLOCKS < 17
    assert max(BlockLayout(*s).num_blocks for s in LAYOUTS) > 2 * attention_module.TILE_BLOCKS


def test_bad_params_are_refused():
    layout = BlockLayout(32, 8, 4, 4, 2)
    with pytest.raises(ValueError, match="unknown block attention mode"):
        BlockAttentionParams(layout=layout, mode="chunked")
    with pytest.raises(ValueError, match="needs a RolloutKVCache"):
        BlockAttentionParams(layout=layout, mode="decode")
