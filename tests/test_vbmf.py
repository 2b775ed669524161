"""Tests for EVBMF rank estimation (rl_mtd.vbmf)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rl_mtd.vbmf import EVBMFResult, estimate_rank, evbmf, tau_bar


def _low_rank(
    shape: tuple[int, int],
    rank: int,
    noise: float,
    seed: int,
    top: float = 20.0,
    bottom: float = 6.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(U diag(d) V^T + noise * N, d)`` with orthonormal U, V and seeded noise."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((shape[0], rank)))
    v, _ = np.linalg.qr(rng.standard_normal((shape[1], rank)))
    d = np.linspace(top, bottom, rank)
    y = (u * d) @ v.T + noise * rng.standard_normal(shape)
    return y, d


def test_known_rank_and_noise_variance() -> None:
    y, _ = _low_rank((100, 80), rank=7, noise=0.1, seed=0)
    res = evbmf(y)
    assert isinstance(res, EVBMFResult)
    assert res.rank == 7
    assert res.singular_values.shape == (7,)
    assert res.sigma2 == pytest.approx(0.01, rel=0.2)


def test_shrunk_values_smaller_than_observed() -> None:
    y, _ = _low_rank((100, 80), rank=7, noise=0.1, seed=1)
    res = evbmf(y)
    observed = np.linalg.svd(y, compute_uv=False)[: res.rank]
    assert np.all(res.singular_values > 0)
    assert np.all(res.singular_values < observed)
    assert np.all(np.diff(res.singular_values) <= 0)


def test_pure_noise_gives_rank_zero() -> None:
    rng = np.random.default_rng(2)
    y = 0.1 * rng.standard_normal((100, 80))
    res = evbmf(y)
    assert res.rank == 0
    assert res.singular_values.shape == (0,)
    assert res.sigma2 == pytest.approx(0.01, rel=0.2)
    assert estimate_rank(y) == 1


@pytest.mark.parametrize(
    ("shape", "rank"),
    [
        ((100, 80), 7),
        ((80, 100), 7),  # wide
        ((300, 40), 5),  # tall
        ((40, 300), 5),  # very wide
        ((64, 576), 12),  # a 3x3 conv kernel unfolding: out x (in * 3 * 3)
        ((128, 128), 20),
        ((50, 50), 1),
    ],
)
def test_recovers_rank_across_shapes(shape: tuple[int, int], rank: int) -> None:
    y, _ = _low_rank(shape, rank=rank, noise=0.1, seed=sum(shape) + rank, top=25.0, bottom=8.0)
    res = evbmf(y)
    assert res.rank == rank
    assert estimate_rank(y) == rank
    assert res.sigma2 == pytest.approx(0.01, rel=0.2)


def test_transpose_invariant() -> None:
    y, _ = _low_rank((60, 90), rank=4, noise=0.1, seed=3)
    a, b = evbmf(y), evbmf(y.T)
    assert a.rank == b.rank
    assert a.sigma2 == pytest.approx(b.sigma2, rel=1e-6)
    np.testing.assert_allclose(a.singular_values, b.singular_values, rtol=1e-6)


def test_torch_input_matches_numpy() -> None:
    y, _ = _low_rank((40, 70), rank=3, noise=0.1, seed=4)
    a = evbmf(y)
    b = evbmf(torch.from_numpy(y).float())
    assert a.rank == b.rank == 3
    assert a.sigma2 == pytest.approx(b.sigma2, rel=1e-3)


def test_given_sigma2_is_used() -> None:
    y, _ = _low_rank((100, 80), rank=7, noise=0.1, seed=5)
    res = evbmf(y, sigma2=0.01)
    assert res.sigma2 == 0.01
    assert res.rank == 7
    # A huge noise variance explains everything away.
    assert evbmf(y, sigma2=100.0).rank == 0


def test_max_rank_caps_the_rank() -> None:
    y, _ = _low_rank((100, 80), rank=7, noise=0.1, seed=6)
    res = evbmf(y, max_rank=3)
    assert res.rank == 3
    assert estimate_rank(y, max_rank=3) == 3


def test_threshold_and_shrinkage_formula() -> None:
    y, _ = _low_rank((100, 80), rank=7, noise=0.1, seed=7)
    res = evbmf(y)
    length, m = 80, 100
    alpha = length / m
    t = tau_bar(alpha)
    threshold = math.sqrt(m * res.sigma2 * (1 + t) * (1 + alpha / t))
    s = np.linalg.svd(y, compute_uv=False)
    assert res.rank == int(np.sum(s > threshold))
    # gamma_hat = gamma * tau(x) / x with x = gamma^2 / (M sigma2)
    x = s[: res.rank] ** 2 / (m * res.sigma2)
    b = x - (1 + alpha)
    tau = 0.5 * (b + np.sqrt(b * b - 4 * alpha))
    np.testing.assert_allclose(res.singular_values, s[: res.rank] * tau / x, rtol=1e-10)


@pytest.mark.parametrize(
    ("alpha", "rel"), [(1.0, 1e-4), (0.8, 1e-3), (0.5, 5e-3), (0.1, 0.04), (0.01, 0.15)]
)
def test_tau_bar_solves_equation_and_matches_closed_form(alpha: float, rel: float) -> None:
    t = tau_bar(alpha)
    assert math.log1p(t) + alpha * math.log1p(t / alpha) - t == pytest.approx(0.0, abs=1e-10)
    assert t > math.sqrt(alpha)
    # The usual closed-form approximation is exact at alpha = 1 and drifts as alpha shrinks.
    assert t == pytest.approx(2.5129 * math.sqrt(alpha), rel=rel)


def test_zero_matrix() -> None:
    res = evbmf(np.zeros((5, 7)))
    assert res.rank == 0
    assert estimate_rank(np.zeros((5, 7))) == 1


def test_row_vector_matrix() -> None:
    res = evbmf(np.arange(1.0, 10.0)[None, :])
    assert res.rank == 0


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (np.ones(10), "2-D"),
        (np.ones((2, 3, 4)), "2-D"),
        (np.array([[1.0, np.nan], [0.0, 1.0]]), "NaN"),
        (np.array([[1.0, np.inf], [0.0, 1.0]]), "infinite"),
        (np.zeros((0, 4)), "non-empty"),
        ("abc", "numeric"),
    ],
)
def test_invalid_input_raises(bad: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        evbmf(bad)


def test_invalid_parameters_raise() -> None:
    y = np.eye(4)
    with pytest.raises(ValueError, match="sigma2"):
        evbmf(y, sigma2=-1.0)
    with pytest.raises(ValueError, match="max_rank"):
        evbmf(y, max_rank=0)
