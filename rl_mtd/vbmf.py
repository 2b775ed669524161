r"""Empirical variational Bayesian matrix factorisation (EVBMF) for rank selection.

Reference: S. Nakajima, M. Sugiyama, S. D. Babacan and R. Tomioka, "Global analytic solution
of fully-observed variational Bayesian matrix factorization", JMLR 14 (2013) 1-37. Kim et al.,
"Compression of deep convolutional neural networks for fast and low power mobile
applications" (ICLR 2016) apply it to the mode-0 and mode-1 unfoldings of a conv kernel to pick
the two Tucker-2 ranks.

Model and notation
------------------
``Y = B A^T + E`` with ``Y`` of shape ``L x M`` (transposed if needed so that ``L <= M``),
Gaussian noise of variance ``sigma2`` and Gaussian priors on the columns of ``A`` and ``B``
whose variances are learned (empirical Bayes). Let ``gamma_1 >= ... >= gamma_L`` be the
singular values of ``Y``, ``H <= L`` the largest rank allowed (``max_rank``) and

* ``alpha = L / M`` (in ``(0, 1]``),
* ``x_h = gamma_h**2 / (M * sigma2)`` (the scaled squared singular values),
* ``tau(x) = (x - (1 + alpha) + sqrt((x - (1 + alpha))**2 - 4 * alpha)) / 2``, the larger
  root of ``tau + alpha / tau = x - (1 + alpha)``, so that ``x = (1 + tau) (1 + alpha / tau)``.

Threshold. ``tau_bar`` is the unique positive zero of

    ``Psi(tau) = log(tau + 1) + alpha * log(tau / alpha + 1) - tau``

(``Psi(0) = 0``, ``Psi'(0) = 1`` and ``Psi`` is concave, so the positive zero is unique). It
is found here to machine precision with Brent's method. The closed form used by most
implementations, ``tau_bar ~= 2.5129 * sqrt(alpha)``, is exact at ``alpha = 1`` (where the
equation reads ``2 log(tau + 1) = tau``) and an approximation elsewhere: about 0.3% low at
``alpha = 0.5``, 3.5% at ``alpha = 0.1`` (a 3x3 conv unfolding ``C x 9C``), 13% at 0.01. With ``x_bar = (1 + tau_bar) (1 + alpha / tau_bar)`` the h-th
component is retained (non-zero EVB estimate) iff

    ``gamma_h > gamma_EVB = sqrt(M * sigma2 * (1 + tau_bar) * (1 + alpha / tau_bar))``,

i.e. iff ``x_h > x_bar``. A retained component is shrunk to

    ``gamma_hat_h = gamma_h / 2 * (1 - (L + M) sigma2 / gamma_h**2
    + sqrt((1 - (L + M) sigma2 / gamma_h**2)**2 - 4 L M sigma2**2 / gamma_h**4))``,

which equals ``gamma_h * tau(x_h) / x_h < gamma_h``.

Noise variance. Up to terms that do not depend on it, the EVB free energy (with the prior
variances already optimised analytically) is, as a function of ``sigma2``,

    ``sum_{h=1..L} psi0(x_h) + sum_{h=1..H, x_h > x_bar} psi1(x_h)``,

    ``psi0(x) = x - log x``,
    ``psi1(x) = log(tau(x) + 1) + alpha * log(tau(x) / alpha + 1) - tau(x)`` (``<= 0`` there).

The first sum equals ``||Y||_F**2 / (M sigma2) + L log sigma2`` plus a constant, which is the
form evaluated here (it tolerates exactly-zero singular values). The minimiser lies in
``[sigma2_lower, sigma2_upper]`` with

    ``sigma2_upper = ||Y||_F**2 / (L M)``,
    ``sigma2_lower = max(gamma_{H_bar+1}**2 / (M x_bar),
    sum_{h > H_bar} gamma_h**2 / (M (L - H_bar)))``,
    ``H_bar = min(ceil(L / (1 + alpha)) - 1, H)``.

The free energy is minimised over that interval: a coarse logarithmic grid finds the basin
(the function need not be unimodal) and ``scipy.optimize.minimize_scalar(method="bounded")``
refines it, in ``log sigma2`` (the same minimiser, better conditioned when the interval spans
orders of magnitude).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import brentq, minimize_scalar

from rl_mtd.errors import RlMtdError

__all__ = ["EVBMFResult", "evbmf", "estimate_rank", "tau_bar"]

_GRID_POINTS = 64
_MIN_LOWER_FRACTION = 1e-12  # floor for sigma2_lower relative to sigma2_upper (noise-free input)


@dataclass
class EVBMFResult:
    """The outcome of :func:`evbmf`.

    Attributes:
        rank: Number of retained components (non-zero EVB singular values).
        singular_values: The VB-shrunk retained singular values, descending, length ``rank``.
        sigma2: The noise variance: estimated by empirical Bayes, or the one given.
    """

    rank: int
    singular_values: np.ndarray
    sigma2: float


def tau_bar(alpha: float) -> float:
    """Return the positive zero of ``log(t + 1) + alpha log(t / alpha + 1) - t``.

    Args:
        alpha: The aspect ratio ``L / M`` in ``(0, 1]``.

    Returns:
        ``tau_bar(alpha)``; ``2.5129`` at ``alpha = 1``, about ``2.5129 * sqrt(alpha)`` near 1
        and somewhat above it for small ``alpha``.
    """
    if not 0.0 < alpha <= 1.0:
        raise RlMtdError(f"alpha must lie in (0, 1], got {alpha}")

    def psi(t: float) -> float:
        return math.log1p(t) + alpha * math.log1p(t / alpha) - t

    # psi > 0 just above 0 (psi'(0) = 1) and psi(10) < 0 for every alpha in (0, 1].
    lo = 1e-3 * math.sqrt(alpha)
    return float(brentq(psi, lo, 10.0, xtol=1e-14, rtol=1e-14))


def _tau(x: np.ndarray, alpha: float) -> np.ndarray:
    """The larger root ``tau`` of ``tau + alpha / tau = x - (1 + alpha)`` (for ``x >= x_bar``)."""
    b = x - (1.0 + alpha)
    return 0.5 * (b + np.sqrt(np.maximum(b * b - 4.0 * alpha, 0.0)))


def _as_matrix(y: Any) -> np.ndarray:
    """Validate ``y`` and return it as a float64 numpy matrix."""
    if hasattr(y, "detach"):  # torch.Tensor, without importing torch here
        y = y.detach().cpu().numpy()
    try:
        arr = np.asarray(y, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise RlMtdError(f"evbmf needs a real numeric matrix, got {type(y).__name__}") from exc
    if arr.ndim != 2:
        raise RlMtdError(
            f"evbmf needs a 2-D matrix, got an array with {arr.ndim} dimension(s) "
            f"of shape {arr.shape}"
        )
    if arr.size == 0:
        raise RlMtdError(f"evbmf needs a non-empty matrix, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise RlMtdError("evbmf input contains NaN or infinite entries")
    return arr


def _free_energy(
    log_s2: float, s2: np.ndarray, total: float, m: int, h: int, alpha: float, x_bar: float
) -> float:
    """EVB free energy in ``log sigma2`` up to constants (see the module docstring)."""
    sigma2 = math.exp(log_s2)
    length = s2.shape[0]
    value = total / (m * sigma2) + length * log_s2
    x = s2[:h] / (m * sigma2)
    x = x[x > x_bar]
    if x.size:
        t = _tau(x, alpha)
        value += float(np.sum(np.log1p(t) + alpha * np.log1p(t / alpha) - t))
    return value


def _estimate_sigma2(
    s2: np.ndarray, total: float, m: int, h: int, alpha: float, x_bar: float
) -> float:
    """Minimise the EVB free energy over ``sigma2`` within the analytic bounds."""
    length = s2.shape[0]
    upper = total / (length * m)
    h_bar = min(math.ceil(length / (1.0 + alpha)) - 1, h)
    lower = max(s2[h_bar] / (m * x_bar), float(np.mean(s2[h_bar:])) / m)
    lower = max(lower, _MIN_LOWER_FRACTION * upper)
    if lower >= upper:
        return upper
    lo, hi = math.log(lower), math.log(upper)
    args = (s2, total, m, h, alpha, x_bar)
    grid = np.linspace(lo, hi, _GRID_POINTS)
    values = [_free_energy(g, *args) for g in grid]
    i = int(np.argmin(values))
    a, b = grid[max(i - 1, 0)], grid[min(i + 1, _GRID_POINTS - 1)]
    res = minimize_scalar(
        _free_energy, bounds=(a, b), args=args, method="bounded", options={"xatol": 1e-10}
    )
    best = res.x if res.fun <= values[i] else grid[i]
    return float(math.exp(best))


def evbmf(y: Any, sigma2: float | None = None, max_rank: int | None = None) -> EVBMFResult:
    """Empirical VB matrix factorisation of ``y`` (Nakajima et al., JMLR 2013).

    Args:
        y: A 2-D ``torch.Tensor`` or array-like; computed in float64. Any shape; a tall matrix
            is transposed internally (the result does not depend on orientation).
        sigma2: The noise variance. ``None`` (default) estimates it by minimising the free
            energy (empirical Bayes); a positive number fixes it.
        max_rank: The largest rank ``H`` to consider; ``None`` means ``min(y.shape)``.

    Returns:
        An :class:`EVBMFResult` with the rank, the shrunk retained singular values and sigma2.

    Raises:
        RlMtdError: (a ``ValueError``) for input that is not a finite, non-empty 2-D matrix, a
            non-positive ``sigma2`` or a ``max_rank`` below 1.
    """
    arr = _as_matrix(y)
    if arr.shape[0] > arr.shape[1]:
        arr = arr.T
    length, m = arr.shape
    if max_rank is None:
        h = length
    else:
        if int(max_rank) != max_rank or max_rank < 1:
            raise RlMtdError(f"max_rank must be a positive integer, got {max_rank!r}")
        h = min(int(max_rank), length)
    if sigma2 is not None and not (math.isfinite(sigma2) and sigma2 > 0.0):
        raise RlMtdError(f"sigma2 must be a positive finite number, got {sigma2!r}")

    s = np.linalg.svd(arr, compute_uv=False)
    s2 = s * s
    total = float(np.sum(arr * arr))
    if total == 0.0:
        return EVBMFResult(
            rank=0, singular_values=np.zeros(0), sigma2=float(sigma2) if sigma2 is not None else 0.0
        )

    alpha = length / m
    t_bar = tau_bar(alpha)
    x_bar = (1.0 + t_bar) * (1.0 + alpha / t_bar)
    if sigma2 is None:
        sigma2 = _estimate_sigma2(s2, total, m, h, alpha, x_bar)
    sigma2 = float(sigma2)

    threshold = math.sqrt(m * sigma2 * x_bar)
    kept = s[:h][s[:h] > threshold]
    ratio = (length + m) * sigma2 / kept**2
    disc = np.maximum((1.0 - ratio) ** 2 - 4.0 * length * m * sigma2**2 / kept**4, 0.0)
    shrunk = 0.5 * kept * (1.0 - ratio + np.sqrt(disc))
    return EVBMFResult(rank=int(kept.size), singular_values=shrunk, sigma2=sigma2)


def estimate_rank(y: Any, max_rank: int | None = None) -> int:
    """Return the EVBMF rank of ``y``, at least 1 (a usable factorisation rank).

    Args:
        y: A 2-D ``torch.Tensor`` or array-like.
        max_rank: The largest rank to consider; ``None`` means ``min(y.shape)``.

    Returns:
        ``max(1, evbmf(y, max_rank=max_rank).rank)``.
    """
    return max(1, evbmf(y, max_rank=max_rank).rank)
