"""sample_tokens: greedy, the inverse-CDF draw, the sampled distribution, top-p, padded vocab,
reproducibility and shapes."""

import math

import pytest
import torch

from ebft_megatron.rollouts.sampling import sample_tokens


def _softmax(values, temperature):
    """Plain-python softmax(values / T) in double precision."""
    scaled = [x / temperature for x in values]
    top = max(scaled)
    weights = [math.exp(x - top) for x in scaled]
    total = sum(weights)
    return [w / total for w in weights]


def _inverse_cdf(probs, u):
    """Smallest j with p_0 + ... + p_j > u."""
    acc = 0.0
    for j, p in enumerate(probs):
        acc += p
        if u < acc:
            return j
    return len(probs) - 1


def _chi_square_p_value(counts, probs):
    total = counts.sum().item()
    expected = torch.tensor(probs, dtype=torch.float64) * total
    stat = ((counts.double() - expected) ** 2 / expected).sum()
    df = len(probs) - 1
    return torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2).item()


# --- greedy -------------------------------------------------------------------------------------

def test_temperature_zero_is_argmax():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.9], [5.0, 0.0, 0.0, 0.0], [-2.0, -3.0, -1.0, -1.5]])
    assert sample_tokens(logits, 0.0).tolist() == [1, 0, 2]
    # uniforms and top_p do not matter when greedy
    assert sample_tokens(logits, 0.0, top_p=0.1, uniforms=torch.tensor([0.99, 0.99, 0.99])).tolist() == [1, 0, 2]


def test_temperature_zero_with_num_samples_repeats_the_argmax():
    logits = torch.tensor([[[0.1, 3.0, -1.0]], [[4.0, 0.0, 1.0]]])  # [2, 1, 3]
    tokens = sample_tokens(logits, 0.0, num_samples=4)
    assert tuple(tokens.shape) == (2, 1, 4)
    assert tokens[0, 0].tolist() == [1, 1, 1, 1] and tokens[1, 0].tolist() == [0, 0, 0, 0]


# --- inverse CDF ----------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_explicit_uniforms_give_the_inverse_cdf(temperature):
    values = [math.log(0.1), math.log(0.2), math.log(0.3), math.log(0.4)]
    probs = _softmax(values, temperature)
    cdf = [sum(probs[: j + 1]) for j in range(4)]
    # uniforms between (and well away from) the cdf steps, plus the ends of [0, 1)
    us = [0.0, 1.0 - 2**-24]
    lo = 0.0
    for c in cdf:
        us += [lo + 0.25 * (c - lo), lo + 0.75 * (c - lo)]
        lo = c
    logits = torch.tensor([values] * len(us))
    tokens = sample_tokens(logits, temperature, uniforms=torch.tensor(us))
    assert tokens.tolist() == [_inverse_cdf(probs, u) for u in us]
    assert sorted(set(tokens.tolist())) == [0, 1, 2, 3]  # every token reached


def test_explicit_uniforms_with_num_samples():
    values = [0.0, 1.0, 2.0]
    probs = _softmax(values, 1.0)
    us = torch.tensor([[[0.05, 0.5, 0.95]], [[0.95, 0.05, 0.5]]])  # [2, 1, 3]
    logits = torch.tensor(values).expand(2, 1, 3)
    tokens = sample_tokens(logits, 1.0, uniforms=us, num_samples=3)
    assert tuple(tokens.shape) == (2, 1, 3)
    assert tokens.reshape(-1).tolist() == [_inverse_cdf(probs, u) for u in us.reshape(-1).tolist()]


# --- the sampled distribution -----------------------------------------------------------------

@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_empirical_frequencies_match_softmax(temperature):
    values = [1.0, 0.0, -0.5, 2.0, 0.3, -3.0]
    probs = _softmax(values, temperature)
    N = 200_000
    gen = torch.Generator().manual_seed(11)
    tokens = sample_tokens(torch.tensor([values]), temperature, generator=gen, num_samples=N)
    assert tuple(tokens.shape) == (1, N)
    counts = torch.bincount(tokens.reshape(-1), minlength=len(values))
    freq = counts.double() / N
    for j, p in enumerate(probs):
        sigma = math.sqrt(p * (1 - p) / N)
        assert abs(freq[j].item() - p) < 5 * sigma, (j, freq[j].item(), p)
    assert _chi_square_p_value(counts, probs) > 1e-4


def test_rows_are_sampled_independently_from_their_own_logits():
    values = torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
    gen = torch.Generator().manual_seed(12)
    tokens = sample_tokens(values.repeat(20_000, 1), 1.0, generator=gen).view(20_000, 2)
    p_top = _softmax([3.0, 0.0, 0.0], 1.0)[0]
    for row, top in ((0, 0), (1, 2)):
        freq = (tokens[:, row] == top).double().mean().item()
        assert abs(freq - p_top) < 5 * math.sqrt(p_top * (1 - p_top) / 20_000)


# --- top-p --------------------------------------------------------------------------------------

# vocabulary order is shuffled relative to probability order on purpose
TOP_P_PROBS = [0.15, 0.5, 0.04, 0.25, 0.06]  # sorted: 0.5 (1), 0.25 (3), 0.15 (0), 0.06 (4), 0.04 (2)


@pytest.mark.parametrize(
    "top_p, kept",
    [
        (0.3, {1}),           # 0.5 alone reaches 0.3
        (0.7, {1, 3}),        # 0.5 < 0.7 <= 0.75
        (0.8, {1, 3, 0}),     # 0.75 < 0.8 <= 0.9
        (0.93, {1, 3, 0, 4}),  # 0.9 < 0.93 <= 0.96
        (0.99, {1, 3, 0, 4, 2}),
        (0.01, {1}),          # the top token is always possible
    ],
)
def test_top_p_keeps_the_smallest_prefix_reaching_top_p(top_p, kept):
    values = [math.log(p) for p in TOP_P_PROBS]
    # a dense grid of uniforms over [0, 1), ends included: exactly the kept tokens are reached
    us = torch.cat([torch.linspace(0, 1, 4001)[:-1], torch.tensor([1.0 - 2**-24])])
    tokens = sample_tokens(torch.tensor([values]).expand(len(us), -1), 1.0, top_p=top_p, uniforms=us)
    assert set(tokens.tolist()) == kept
    # and with the renormalised probabilities, in sorted order: inverse CDF over the kept tokens
    order = sorted(kept, key=lambda j: -TOP_P_PROBS[j])
    mass = sum(TOP_P_PROBS[j] for j in order)
    renorm = [TOP_P_PROBS[j] / mass for j in order]
    expected = [order[_inverse_cdf(renorm, u)] for u in us.tolist()]
    mismatch = sum(a != b for a, b in zip(tokens.tolist(), expected))
    assert mismatch <= 2  # only grid points that land on a cdf step may round differently


def test_top_p_empirical_frequencies():
    values = [math.log(p) for p in TOP_P_PROBS]
    N = 200_000
    gen = torch.Generator().manual_seed(13)
    tokens = sample_tokens(torch.tensor([values]), 1.0, top_p=0.8, generator=gen, num_samples=N)
    counts = torch.bincount(tokens.reshape(-1), minlength=5)
    assert counts[2].item() == 0 and counts[4].item() == 0
    kept = [1, 3, 0]
    mass = sum(TOP_P_PROBS[j] for j in kept)
    probs = [TOP_P_PROBS[j] / mass for j in kept]
    assert _chi_square_p_value(counts[kept], probs) > 1e-4
    for j, p in zip(kept, probs):
        assert abs(counts[j].item() / N - p) < 5 * math.sqrt(p * (1 - p) / N)


def test_top_p_with_temperature_uses_tempered_probabilities():
    # at T=1 the top token holds 0.5 (< 0.6, so two tokens kept); at T=0.25 it holds > 0.9
    values = [math.log(p) for p in TOP_P_PROBS]
    us = torch.linspace(0, 1, 1001)[:-1]
    logits = torch.tensor([values]).expand(len(us), -1)
    assert set(sample_tokens(logits, 1.0, top_p=0.6, uniforms=us).tolist()) == {1, 3}
    assert set(sample_tokens(logits, 0.25, top_p=0.6, uniforms=us).tolist()) == {1}


# --- padded vocabulary ----------------------------------------------------------------------------

@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_minus_inf_logits_are_never_drawn(top_p):
    inf = float("inf")
    # -inf at the front, the middle and the end (padded vocab), uniforms at 0, just below 1, at 1
    # (explicit uniforms may hold it) and a fine grid in between
    values = torch.tensor([-inf, 0.5, -inf, 0.0, 1.0, -inf, -inf, -inf])
    us = torch.cat([torch.tensor([0.0, 1.0 - 2**-24, 1.0 - 2**-20, 1.0]), torch.rand(5000, generator=torch.Generator().manual_seed(14))])
    tokens = sample_tokens(values.expand(len(us), -1), 0.7, top_p=top_p, uniforms=us)
    # (at T=0.7 the real tokens hold 0.58, 0.28, 0.14: top_p=0.9 keeps all three)
    assert set(tokens.tolist()) == {1, 3, 4}
    gen = torch.Generator().manual_seed(15)
    drawn = sample_tokens(values, 0.7, top_p=top_p, generator=gen, num_samples=100_000)
    assert set(drawn.tolist()) <= {1, 3, 4}


def test_minus_inf_logits_in_low_precision_are_never_drawn():
    values = torch.empty(300)
    values[:250] = torch.linspace(-5, 5, 250)
    values[250:] = float("-inf")
    gen = torch.Generator().manual_seed(16)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        drawn = sample_tokens(values.to(dtype).expand(64, -1), 1.0, generator=gen, num_samples=512)
        assert int(drawn.max()) < 250


# --- reproducibility and shapes -------------------------------------------------------------------

def test_same_seed_same_draws_different_seed_different_draws():
    logits = torch.randn(4, 3, 50, generator=torch.Generator().manual_seed(0))
    first = sample_tokens(logits, 0.8, generator=torch.Generator().manual_seed(7), num_samples=16)
    again = sample_tokens(logits, 0.8, generator=torch.Generator().manual_seed(7), num_samples=16)
    other = sample_tokens(logits, 0.8, generator=torch.Generator().manual_seed(8), num_samples=16)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    top_p_first = sample_tokens(logits, 0.8, top_p=0.9, generator=torch.Generator().manual_seed(7))
    top_p_again = sample_tokens(logits, 0.8, top_p=0.9, generator=torch.Generator().manual_seed(7))
    assert torch.equal(top_p_first, top_p_again)


@pytest.mark.parametrize("temperature", [0.0, 0.7])
@pytest.mark.parametrize("top_p", [1.0, 0.5])
def test_shapes(temperature, top_p):
    logits = torch.randn(2, 3, 5, 11)
    single = sample_tokens(logits, temperature, top_p=top_p)
    assert tuple(single.shape) == (2, 3, 5) and single.dtype == torch.long
    many = sample_tokens(logits, temperature, top_p=top_p, num_samples=4)
    assert tuple(many.shape) == (2, 3, 5, 4) and many.dtype == torch.long
    assert int(many.min()) >= 0 and int(many.max()) < 11
    flat = sample_tokens(torch.randn(11), temperature, top_p=top_p)
    assert flat.shape == ()
