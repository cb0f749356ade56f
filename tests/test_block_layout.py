"""BlockLayout: sizes, index maps, the dense reference mask, packing, and refused settings.

The expected values are built here from the definitions (reference §1.2), by explicit loops over
(block, sample, step), not from the vectorised code under test.
"""

import pytest
import torch

from ebft_megatron.block_layout import BlockLayout, LayoutError

# (P, C, s, G, n): s == G, s < G (overlapping windows), s > G, G == 1, n == 1
LAYOUTS = [
    (32, 8, 4, 4, 2),
    (16, 2, 1, 3, 2),
    (20, 3, 5, 2, 3),
    (10, 1, 1, 1, 2),
    (24, 4, 2, 2, 1),
    (13, 5, 3, 2, 2),
]
IDS = ["s=G", "s<G", "s>G", "G=1", "n=1", "odd"]


def _enumerate(P, C, s, G, n):
    """[(packed index, b, i, t, anchor)] built by walking the packed sequence in order."""
    NB = (P - G - C) // s + 1
    rows, index = [], P
    for b in range(NB):
        for i in range(n):
            for t in range(G):
                rows.append((index, b, i, t, C + b * s))
                index += 1
    return rows


@pytest.mark.parametrize(
    "settings, expected",
    [
        ((1024, 8, 8, 8, 4), 127),
        ((1024, 4, 2, 4, 4), 509),
        ((32, 8, 4, 4, 2), 6),
        ((16, 2, 1, 3, 2), 12),
        ((20, 3, 5, 2, 3), 4),
        ((10, 1, 1, 1, 2), 9),
        ((5, 1, 1, 4, 1), 1),  # P == C + G: exactly one block
    ],
)
def test_num_blocks_and_sizes(settings, expected):
    P, C, s, G, n = settings
    layout = BlockLayout(*settings)
    assert layout.num_blocks == expected
    assert layout.rollout_tokens_per_sample == expected * G
    assert layout.num_rollout_tokens == expected * n * G
    assert layout.packed_len == P + expected * n * G


@pytest.mark.parametrize("settings", LAYOUTS, ids=IDS)
def test_anchor_positions_and_ground_truth_windows(settings):
    P, C, s, G, n = settings
    layout = BlockLayout(*settings)
    NB = layout.num_blocks
    anchors = layout.anchor_positions
    assert anchors.tolist() == [C + b * s for b in range(NB)]
    windows = layout.ground_truth_windows
    assert tuple(windows.shape) == (NB, G)
    for b in range(NB):
        assert windows[b].tolist() == list(range(C + b * s, C + b * s + G))
    # the last block's window ends exactly at the end of the chunk, the first starts at C
    assert int(windows[0, 0]) == C and int(windows[-1, -1]) == P - 1
    assert int(windows.min()) >= 1  # every token has a predicting logit a_b - 1 >= 0


@pytest.mark.parametrize("settings", LAYOUTS, ids=IDS)
def test_rollout_index_is_block_major_and_covers_the_tail(settings):
    P, C, s, G, n = settings
    layout = BlockLayout(*settings)
    seen = []
    for index, b, i, t, _ in _enumerate(*settings):
        assert layout.rollout_index(b, i, t) == index == P + (b * n + i) * G + t
        seen.append(index)
    assert seen == list(range(P, layout.packed_len))
    # tensors broadcast like ints
    b = torch.arange(layout.num_blocks)[:, None, None]
    i = torch.arange(n)[None, :, None]
    t = torch.arange(G)[None, None, :]
    assert layout.rollout_index(b, i, t).reshape(-1).tolist() == seen


@pytest.mark.parametrize("settings", LAYOUTS, ids=IDS)
def test_position_ids(settings):
    P, C, s, G, n = settings
    layout = BlockLayout(*settings)
    pos = layout.position_ids
    assert tuple(pos.shape) == (layout.packed_len,)
    assert pos[:P].tolist() == list(range(P))
    for index, b, i, t, anchor in _enumerate(*settings):
        assert int(pos[index]) == anchor + t, (index, b, i, t)
    # a rollout token carries the position of the ground-truth token it stands in for
    windows = layout.ground_truth_windows
    for index, b, i, t, _ in _enumerate(*settings):
        assert int(pos[index]) == int(windows[b, t])


@pytest.mark.parametrize("settings", LAYOUTS, ids=IDS)
def test_rollout_predictor_index(settings):
    P, C, s, G, n = settings
    layout = BlockLayout(*settings)
    pred = layout.rollout_predictor_index
    assert tuple(pred.shape) == (layout.num_blocks, n, G)
    for index, b, i, t, anchor in _enumerate(*settings):
        expected = anchor - 1 if t == 0 else index - 1  # its predecessor in the packed order
        assert int(pred[b, i, t]) == expected, (b, i, t)
    # a predictor always carries position (position of the predicted token) - 1
    pos = layout.position_ids
    for index, b, i, t, _ in _enumerate(*settings):
        assert int(pos[pred[b, i, t]]) == int(pos[index]) - 1


def _reference_mask(P, C, s, G, n):
    """Brute force: allowed[q, k] from the roles of q and k (one document: see
    :func:`reference_document_mask`)."""
    return reference_document_mask(P, C, s, G, n, [0] * P)


@pytest.mark.parametrize("settings", LAYOUTS, ids=IDS)
def test_dense_attention_mask_matches_definition(settings):
    P, C, s, G, n = settings
    layout = BlockLayout(*settings)
    mask = layout.dense_attention_mask()
    assert mask.dtype == torch.bool and tuple(mask.shape) == (layout.packed_len,) * 2
    assert torch.equal(mask, _reference_mask(*settings))
    # row sums: chunk row j sees j + 1 keys; rollout (b, i, t) sees a_b + t + 1
    sums = mask.sum(dim=1)
    assert sums[:P].tolist() == list(range(1, P + 1))
    for index, b, i, t, anchor in _enumerate(*settings):
        assert int(sums[index]) == anchor + t + 1


def test_dense_attention_mask_specific_entries():
    layout = BlockLayout(32, 8, 4, 4, 2)  # anchors 8, 12, ..., 28
    mask = layout.dense_attention_mask()
    P = 32
    assert mask[5, 5] and mask[5, 0] and not mask[5, 6]  # chunk causal
    assert not mask[0, P]  # the chunk never sees rollout tokens
    q = layout.rollout_index(1, 1, 2)  # block 1 (anchor 12), sample 1, step 2
    assert q == P + (1 * 2 + 1) * 4 + 2
    assert mask[q, 0] and mask[q, 11] and not mask[q, 12] and not mask[q, 31]
    assert mask[q, layout.rollout_index(1, 1, 0)] and mask[q, layout.rollout_index(1, 1, 1)]
    assert mask[q, q] and not mask[q, layout.rollout_index(1, 1, 3)]  # not its future
    assert not mask[q, layout.rollout_index(1, 0, 0)]  # not the other sample of its block
    assert not mask[q, layout.rollout_index(0, 1, 0)]  # not the same sample of another block
    assert not mask[q, layout.rollout_index(2, 1, 0)]
    last = layout.rollout_index(5, 1, 3)
    assert last == layout.packed_len - 1
    assert int(mask[last].sum()) == 28 + 4


@pytest.mark.parametrize("settings", LAYOUTS, ids=IDS)
def test_pack_and_unpack_round_trip(settings):
    P, C, s, G, n = settings
    layout = BlockLayout(*settings)
    B, NB = 3, layout.num_blocks
    gen = torch.Generator().manual_seed(0)
    chunk = torch.randint(0, 1000, (B, P), generator=gen)
    rollouts = torch.randint(1000, 2000, (B, NB, n, G), generator=gen)
    packed = layout.pack(chunk, rollouts)
    assert tuple(packed.shape) == (B, layout.packed_len)
    assert torch.equal(packed[:, :P], chunk)
    for index, b, i, t, _ in _enumerate(*settings):
        assert torch.equal(packed[:, index], rollouts[:, b, i, t])
    assert torch.equal(layout.unpack_rollouts(packed), rollouts)
    # with trailing feature dimensions
    values = torch.randn(B, layout.packed_len, 5, 2, generator=gen)
    unpacked = layout.unpack_rollouts(values)
    assert tuple(unpacked.shape) == (B, NB, n, G, 5, 2)
    for index, b, i, t, _ in _enumerate(*settings):
        assert torch.equal(unpacked[:, b, i, t], values[:, index])


@pytest.mark.parametrize(
    "settings, pattern",
    [
        ((1024, 8, 5, 8, 4), r"not divisible by stride=5"),
        ((30, 8, 4, 4, 2), r"stride=4"),
        ((32, 8, 0, 4, 2), r"stride=0"),
        ((32, 0, 4, 4, 2), r"first_anchor=0"),
        ((32, 8, 4, 0, 2), r"rollout_len=0"),
        ((32, 8, 4, 4, 0), r"num_samples=0"),
        ((0, 8, 4, 4, 2), r"chunk_len=0"),
        ((32, 8, -4, 4, 2), r"stride=-4"),
        ((11, 8, 4, 4, 2), r"chunk_len=11"),
        ((8, 8, 1, 1, 1), r"chunk_len=8"),
    ],
)
def test_bad_settings_are_refused_naming_the_setting(settings, pattern):
    with pytest.raises(LayoutError, match=pattern):
        BlockLayout(*settings)


def test_non_divisible_message_suggests_valid_chunk_lengths():
    with pytest.raises(LayoutError) as info:
        BlockLayout(1023, 8, 8, 8, 4)
    message = str(info.value)
    suggested = [int(x) for x in message.split("use chunk_len=")[1].split(", or")[0].split(" or ")]
    assert len(suggested) == 2
    for P in suggested:
        assert BlockLayout(P, 8, 8, 8, 4).num_blocks >= 1  # both suggestions are valid
    assert suggested[0] < 1023 < suggested[1]


def test_layout_error_is_a_value_error():
    assert issubclass(LayoutError, ValueError)


# --- document masking (reference §1.4) -----------------------------------------------------------
def random_document_ids(batch, chunk_len, seed, boundary_rate=0.25):
    """[batch, P] document ids with random boundaries (the first chunk holds one document), the
    tail of the last chunk padding (-1) as a short last chunk has it."""
    gen = torch.Generator().manual_seed(seed)
    starts = (torch.rand(batch, chunk_len, generator=gen) < boundary_rate).long()
    starts[0] = 0
    doc_ids = starts.cumsum(-1)
    doc_ids[-1, chunk_len - max(1, chunk_len // 6):] = -1
    return doc_ids


def document_ids_with_every_case(layout, batch, seed):
    """[batch, P] random document ids (one chunk holds several documents) where some rollout step
    sees no prefix key (its document starts at or after its anchor) and, when G > 1, some block's
    window crosses a document boundary: the cases the plain layout lacks. The first draw that has
    them, so deterministic."""
    P, NB = layout.chunk_len, layout.num_blocks
    for attempt in range(100):
        doc_ids = random_document_ids(batch, P, seed * 100 + attempt)
        blind = ~layout.prefix_visibility(0, NB, P, doc_ids).any(dim=-1)
        own = layout.own_visibility(doc_ids=doc_ids)
        crossing = layout.rollout_len == 1 or not torch.equal(own, layout.own_visibility().expand_as(own))
        if doc_ids[-1].max() > 0 and blind.any() and crossing:
            return doc_ids
    raise AssertionError("no draw of document ids has every case")


def reference_document_mask(P, C, s, G, n, docs):
    """Brute force over the roles of query and key, for one chunk's document ids (a list):
    a chunk token sees the earlier tokens of its document; rollout token (b, i, t) belongs to the
    document of x[a_b + t] and sees the prefix x[:a_b] of that document and its own tokens
    t' <= t of that document."""
    rows = _enumerate(P, C, s, G, n)
    S = P + len(rows)
    role = {j: ("chunk", j) for j in range(P)}
    for index, b, i, t, anchor in rows:
        role[index] = ("rollout", b, i, t, anchor)
    allowed = torch.zeros(S, S, dtype=torch.bool)
    for q in range(S):
        for k in range(S):
            rq, rk = role[q], role[k]
            if rq[0] == "chunk":
                ok = rk[0] == "chunk" and rk[1] <= rq[1] and docs[rk[1]] == docs[rq[1]]
            else:
                doc = docs[rq[4] + rq[3]]
                if rk[0] == "chunk":
                    ok = rk[1] < rq[4] and docs[rk[1]] == doc
                else:
                    ok = rk[1:3] == rq[1:3] and rk[3] <= rq[3] and docs[rq[4] + rk[3]] == doc
            allowed[q, k] = ok
    return allowed


def reference_document_positions(P, C, s, G, n, docs):
    """Positions restart at every document start; a rollout token takes that of x[a_b + t]."""
    chunk = []
    for k in range(P):
        start = k
        while start > 0 and docs[start - 1] == docs[k]:
            start -= 1
        chunk.append(k - start)
    return chunk + [chunk[anchor + t] for _, _, _, t, anchor in _enumerate(P, C, s, G, n)]


@pytest.mark.parametrize("settings", LAYOUTS, ids=IDS)
def test_document_mask_and_positions_match_definition(settings):
    layout = BlockLayout(*settings)
    doc_ids = document_ids_with_every_case(layout, 2, seed=sum(settings))
    mask = layout.dense_attention_mask(doc_ids)
    positions = layout.batch_position_ids(2, doc_ids)
    assert tuple(mask.shape) == (2, layout.packed_len, layout.packed_len)
    assert tuple(positions.shape) == (2, layout.packed_len)
    for row in range(2):
        docs = doc_ids[row].tolist()
        assert torch.equal(mask[row], reference_document_mask(*settings, docs)), row
        assert positions[row].tolist() == reference_document_positions(*settings, docs), row
    # the pieces the fused attention uses agree with the assembled mask
    P, NB = layout.chunk_len, layout.num_blocks
    assert torch.equal(mask[:, :P, :P], layout.chunk_visibility(doc_ids))
    assert torch.equal(mask[:, P:, :P], layout.rollout_rows(layout.prefix_visibility(0, NB, P, doc_ids)))
    own = layout.own_visibility(doc_ids=doc_ids)  # [B, NB, G, G]
    for index, b, i, t, _ in _enumerate(*settings):
        first = layout.rollout_index(b, i, 0)
        assert torch.equal(mask[:, index, first:first + layout.rollout_len], own[:, b, t])


def test_one_document_is_the_plain_layout():
    layout = BlockLayout(32, 8, 4, 4, 2)
    one = torch.zeros(3, 32, dtype=torch.long)
    assert torch.equal(layout.dense_attention_mask(one), layout.dense_attention_mask().expand(3, -1, -1))
    assert torch.equal(layout.batch_position_ids(3, one), layout.position_ids.expand(3, -1))
    assert torch.equal(layout.batch_position_ids(3), layout.position_ids.expand(3, -1))
