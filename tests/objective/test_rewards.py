"""Reward, baseline, whitening and CFM identities (reference §3, §5.2, §7), and the unbiasedness of the
REINFORCE estimator, checked against direct feature-space computations and exact expectations."""

import itertools

import pytest
import torch

from ebft_megatron.objective.rewards import (
    RewardSettings,
    alignment_and_diversity,
    block_rewards,
    cfm_loss,
    reward_metrics,
    whiten_samples,
)


def features_of(ground_truth, samples):
    """[..., D] and [..., n, D] -> [..., n+1, D] with the ground truth first."""
    return torch.cat([ground_truth[..., None, :], samples], dim=-2).double()


def gram_of(ground_truth, samples):
    """The same as a Gram matrix [..., n+1, n+1]."""
    stacked = features_of(ground_truth, samples)
    return stacked @ stacked.transpose(-1, -2)


def unit(x):
    return x / x.norm(dim=-1, keepdim=True)


def reference_rewards(gt, X, alpha, beta, whiten, threshold=1e-5):
    """The reference's computation in feature space (reference §2-3), for one group: X [n, D], gt [D]."""
    X, gt = X.double(), gt.double()
    n = X.shape[0]
    G = gt.expand(n, -1)
    if whiten:
        U, S, _ = torch.linalg.svd(X, full_matrices=False)
        inv = torch.where(S > threshold * S.max(), 1.0 / (S + 1e-12), torch.zeros_like(S))
        W = U @ torch.diag(inv) @ U.T
        X, G = W @ X, W @ G
    a = torch.nn.functional.cosine_similarity(X, G, dim=-1, eps=1e-8)
    dots = X @ X.T
    d = (dots.sum(-1) - dots.diagonal()) / (n - 1)
    A, D = 2 * a, 2 * d
    r = alpha * A - beta * D
    b = alpha * (A.sum() - A) / (n - 1) - (beta * (D.sum() - 2 * D) / (n - 2) if n > 2 and beta else 0)
    return a, d, r, r - b


@pytest.mark.parametrize("whiten", [False, True])
@pytest.mark.parametrize("n", [2, 3, 4, 6])
def test_rewards_equal_the_feature_space_reference(whiten, n):
    gen = torch.Generator().manual_seed(n)
    D = 16
    gt = torch.randn(3, 5, D, generator=gen)
    X = torch.randn(3, 5, n, D, generator=gen)
    X[0, 0, 1] = X[0, 0, 0]  # a duplicate pair
    gt[2, 4] *= 1e-6  # a ground truth and a sample of tiny norm: cosine clamps each norm on its own
    X[2, 4, 0] *= 1e-6
    settings = RewardSettings(alignment_coef=1.0, diversity_coef=0.5, whiten=whiten)
    ours = block_rewards(features_of(gt, X), settings)
    for c, b in itertools.product(range(3), range(5)):
        a, d, r, adv = reference_rewards(gt[c, b], X[c, b], 1.0, 0.5, whiten)
        torch.testing.assert_close(ours.alignment[c, b], a, atol=1e-9, rtol=1e-7)
        torch.testing.assert_close(ours.diversity[c, b], d, atol=1e-9, rtol=1e-7)
        torch.testing.assert_close(ours.reward[c, b], r, atol=1e-9, rtol=1e-7)
        torch.testing.assert_close(ours.advantage[c, b], adv, atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("whiten", [False, True])
def test_advantages_sum_to_zero_per_group(whiten):
    gen = torch.Generator().manual_seed(1)
    features = features_of(torch.randn(4, 7, 12, generator=gen), torch.randn(4, 7, 4, 12, generator=gen))
    adv = block_rewards(features, RewardSettings(1.0, 1.0, whiten)).advantage
    assert adv.abs().max() > 1e-3  # not trivially zero
    assert adv.sum(-1).abs().max() < 1e-12


def test_advantage_closed_form():
    gen = torch.Generator().manual_seed(2)
    n, alpha, beta = 5, 0.7, 0.4
    features = features_of(torch.randn(3, 6, generator=gen), torch.randn(3, n, 6, generator=gen))
    rewards = block_rewards(features, RewardSettings(alpha, beta, whiten=False))
    a, d = rewards.alignment, rewards.diversity
    expect = (2 * alpha * n / (n - 1) * (a - a.mean(-1, keepdim=True))
              - 2 * beta * n / (n - 2) * (d - d.mean(-1, keepdim=True)))
    torch.testing.assert_close(rewards.advantage, expect, atol=1e-12, rtol=1e-10)


def test_baseline_of_a_sample_does_not_depend_on_that_sample():
    gen = torch.Generator().manual_seed(3)
    n, D = 4, 10
    gt, X = torch.randn(D, generator=gen), torch.randn(n, D, generator=gen)
    settings = RewardSettings(1.0, 1.0, whiten=False)
    before = block_rewards(features_of(gt, X), settings)
    for i in range(n):
        changed = X.clone()
        changed[i] = torch.randn(D, generator=gen)
        after = block_rewards(features_of(gt, changed), settings)
        assert abs(float(after.baseline[i] - before.baseline[i])) < 1e-12
        others = [j for j in range(n) if j != i]
        assert (after.baseline[others] - before.baseline[others]).abs().max() > 1e-6


def test_whitened_diversity_is_a_duplicate_penalty():
    gen = torch.Generator().manual_seed(4)
    gt = torch.randn(32, generator=gen)
    distinct = torch.randn(4, 32, generator=gen)
    pair = distinct.clone()
    pair[1] = pair[0]
    same = distinct[:1].expand(4, -1)
    settings = RewardSettings(1.0, 1.0, whiten=True)
    D = lambda X: 2 * block_rewards(features_of(gt, X), settings).diversity  # noqa: E731
    torch.testing.assert_close(D(distinct), torch.zeros(4, dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(D(pair), torch.tensor([1 / 3, 1 / 3, 0, 0], dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(D(same), torch.full((4,), 0.5, dtype=torch.float64), atol=1e-9, rtol=0)


def test_whitening_orthonormalises_full_rank_samples_and_drops_tiny_singular_values():
    gen = torch.Generator().manual_seed(5)
    X = torch.randn(4, 9, generator=gen, dtype=torch.float64)
    whitened, _ = whiten_samples(X)
    torch.testing.assert_close(whitened @ whitened.T, torch.eye(4, dtype=torch.float64), atol=1e-10, rtol=0)
    X[3] = X[2] + 1e-9 * torch.randn(9, generator=gen, dtype=torch.float64)  # S_min << 1e-5 S_max
    whitened, _ = whiten_samples(X)
    assert torch.linalg.matrix_rank(whitened, atol=1e-6) == 3


def nearly_duplicated(n=4, D=48, spread=(1.0, 1e-1, 1e-2, 1.5e-2), seed=11):
    """n unit vectors whose singular values span a condition number of about 1/spread[-1]."""
    gen = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(D, n, generator=gen, dtype=torch.float64))[0]
    base = torch.randn(D, generator=gen, dtype=torch.float64)
    X = base + 1e-2 * (U * torch.tensor(spread, dtype=torch.float64)) @ V.T
    return unit(torch.randn(D, generator=gen, dtype=torch.float64)), unit(X)


def test_whitened_advantages_are_accurate_for_nearly_duplicated_samples():
    """Condition number ~1e5 (every singular value kept): the advantages equal the reference's
    computed from the features themselves to 1e-10, also when the rewards are given the
    features' coordinates in their span (as the feature network hands them over). An
    eigendecomposition of the Gram matrix is off by ~3e-8 here."""
    from ebft_megatron.features.network import span_coordinates

    gt, X = nearly_duplicated()
    S = torch.linalg.svdvals(X)
    assert 1e4 < S[0] / S[-1] < 1e5
    settings = RewardSettings(1.0, 0.5, whiten=True)
    _, _, _, expected = reference_rewards(gt, X, 1.0, 0.5, True)
    for features in (features_of(gt, X), span_coordinates(features_of(gt, X))):
        advantage = block_rewards(features, settings).advantage
        torch.testing.assert_close(advantage, expected, atol=1e-10, rtol=0)


def test_invalid_blocks_get_no_advantage():
    gen = torch.Generator().manual_seed(6)
    features = features_of(torch.randn(2, 3, 5, generator=gen), torch.randn(2, 3, 4, 5, generator=gen))
    valid = torch.tensor([[True, True, True], [True, False, False]])
    rewards = block_rewards(features, RewardSettings(1.0, 0.5, False), valid)
    assert (rewards.advantage[1, 1:] == 0).all() and (rewards.advantage[0] != 0).all()


def test_cfm_identity_and_metrics():
    """Unit features, no whitening, alpha = beta = 1: mean(2a - d) = 1 - L_CFM."""
    gen = torch.Generator().manual_seed(7)
    gt = unit(torch.randn(5, 6, 8, generator=gen, dtype=torch.float64))
    X = unit(torch.randn(5, 6, 4, 8, generator=gen, dtype=torch.float64))
    gram = gram_of(gt, X)
    settings = RewardSettings(1.0, 1.0, whiten=False)
    rewards = block_rewards(features_of(gt, X), settings)
    effective = (2 * rewards.alignment - rewards.diversity).mean(-1)
    torch.testing.assert_close(effective, 1 - cfm_loss(gram), atol=1e-12, rtol=0)
    metrics = reward_metrics(rewards, gram, settings)
    assert abs(metrics["reward/effective"] - (1 - metrics["cfm"])) < 1e-9


def test_cfm_estimate_is_the_unbiased_u_statistic():
    """Enumerate every draw of n = 4 samples from a 3-outcome policy: the probability-weighted
    mean of the estimate equals ||E phi - g||^2 exactly."""
    gen = torch.Generator().manual_seed(8)
    feats = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    probs = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    g = torch.randn(5, generator=gen, dtype=torch.float64)
    expected = 0.0
    for draw in itertools.product(range(3), repeat=4):
        weight = probs[list(draw)].prod()
        expected += weight * cfm_loss(gram_of(g, feats[list(draw)]))
    exact = ((probs @ feats) - g).square().sum()
    assert abs(float(expected - exact)) < 1e-12


def _toy_setup(K=4, D=3, seed=9):
    gen = torch.Generator().manual_seed(seed)
    theta = torch.randn(K, generator=gen, dtype=torch.float64)
    feats = unit(torch.randn(K, D, generator=gen, dtype=torch.float64))
    g = unit(torch.randn(D, generator=gen, dtype=torch.float64))
    return theta, feats, g


def _exact_gradient(theta, feats, g):
    theta = theta.clone().requires_grad_(True)
    loss = (torch.softmax(theta, 0) @ feats - g).square().sum()
    (grad,) = torch.autograd.grad(loss, theta)
    return grad


def _estimator(theta, feats, g, draws, settings):
    """Per group of n draws: grad of -(1/n) sum_i adv_i log pi(y_i)  ([groups, K])."""
    n = draws.shape[-1]
    features = features_of(g.expand(draws.shape[0], -1), feats[draws])
    adv = block_rewards(features, settings).advantage  # [groups, n]
    score = torch.nn.functional.one_hot(draws, theta.shape[0]).double() - torch.softmax(theta, 0)  # d log pi
    return -(adv[..., None] * score).sum(1) / n


def test_reinforce_estimator_is_unbiased_exactly_and_by_monte_carlo():
    theta, feats, g = _toy_setup()
    K, n = feats.shape[0], 4
    settings = RewardSettings(1.0, 1.0, whiten=False)
    exact = _exact_gradient(theta, feats, g)
    probs = torch.softmax(theta, 0)
    draws = torch.tensor(list(itertools.product(range(K), repeat=n)))
    weights = probs[draws].prod(-1)
    expectation = (weights[:, None] * _estimator(theta, feats, g, draws, settings)).sum(0)
    torch.testing.assert_close(expectation, exact, atol=1e-12, rtol=0)
    # Monte Carlo: the mean over many sampled groups converges (within 5 standard errors)
    gen = torch.Generator().manual_seed(10)
    sampled = torch.multinomial(probs.expand(200_000, -1), n, replacement=True, generator=gen)
    estimates = _estimator(theta, feats, g, sampled, settings)
    stderr = estimates.std(0) / estimates.shape[0] ** 0.5
    assert ((estimates.mean(0) - exact).abs() <= 5 * stderr + 1e-12).all()
    assert exact.abs().max() > 10 * stderr.max()  # the check is not vacuous


def test_alignment_is_cosine_not_dot_product():
    gt = torch.tensor([[3.0, 0.0]])
    X = torch.tensor([[[2.0, 0.0], [0.0, 5.0]]])
    a, _ = alignment_and_diversity(features_of(gt, X)[0], whiten=False)
    torch.testing.assert_close(a, torch.tensor([1.0, 0.0], dtype=torch.float64))


@pytest.mark.parametrize("whiten", [True, False])
def test_a_step_scored_in_one_call_gives_each_micro_batch_its_own_rewards(whiten):
    """EBFT scores all micro-batches of a step in one call (one SVD a step): each chunk's rewards
    are to the bit those of its micro-batch scored alone, at the validation layout's shapes."""
    generator = torch.Generator().manual_seed(3)
    parts = [torch.randn(2, 127, 5, 48, generator=generator, dtype=torch.float64) for _ in range(4)]
    valids = [torch.rand(2, 127, generator=generator) > 0.1 for _ in range(4)]
    settings = RewardSettings(1.0, 0.5, whiten=whiten)
    together = block_rewards(torch.cat(parts), settings, torch.cat(valids))
    for index, (features, valid) in enumerate(zip(parts, valids)):
        alone = block_rewards(features, settings, valid)
        rows = together.rows(2 * index, 2 * index + 2)
        for name in ("alignment", "diversity", "reward", "baseline", "advantage", "valid"):
            assert torch.equal(getattr(rows, name), getattr(alone, name)), (index, name)
