"""Tests for rl_mtd.factorize against tensorly, the reference implementation of CP and Tucker.

CP-ALS cannot promise to recover an exactly rank-R kernel (ALS can sit in a local minimum, and
tensorly's parafac fails on some kernels too), but ours must never be the one that stops early:
on every kernel it either recovers the kernel or ends within 1.5x of tensorly's error.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from rl_mtd import factorize
from rl_mtd.decompose import FactorCache, decompose_conv

tl = pytest.importorskip("tensorly")
tl_decomposition = pytest.importorskip("tensorly.decomposition")

CP_SHAPE, CP_RANK = (64, 32, 3, 3), 8
RECOVERED = 1e-4  # relative output error of a recovered kernel
TL_SLACK = 1.5  # otherwise: no worse than this multiple of tensorly's error


def _rank_r_kernel(shape: tuple[int, int, int, int], rank: int, seed: int) -> torch.Tensor:
    """A float32 kernel of exactly CP rank ``rank``: Gaussian factors from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    a, b, c, d = (torch.randn(n, rank, generator=g) for n in shape)
    return torch.einsum("or,ir,hr,wr->oihw", a, b, c, d)


def _conv_with(weight: torch.Tensor) -> nn.Conv2d:
    o, i, kh, kw = weight.shape
    conv = nn.Conv2d(i, o, (kh, kw), padding=1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(weight)
    return conv.eval()


def _output_error(conv: nn.Conv2d, block: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        y = conv(x)
        return float(torch.linalg.vector_norm(block(x) - y) / torch.linalg.vector_norm(y))


def _tensorly_cp_kernel(weight: torch.Tensor, rank: int, seed: int) -> torch.Tensor:
    """tensorly's CP-ALS reconstruction of ``weight``: SVD init, 100 sweeps, float64 numpy."""
    with tl.backend_context("numpy"):
        cp = tl_decomposition.parafac(
            weight.double().numpy(), rank, init="svd", n_iter_max=100, random_state=seed
        )
        return torch.from_numpy(np.asarray(tl.cp_to_tensor(cp))).float()


@pytest.mark.filterwarnings("ignore:Trying to compute SVD")  # tensorly, for the 3-sized modes
@pytest.mark.parametrize("seed", range(40))
def test_cp_recovers_exact_rank_kernel_or_matches_tensorly(seed: int) -> None:
    w = _rank_r_kernel(CP_SHAPE, CP_RANK, seed)
    conv = _conv_with(w)
    x = torch.randn(2, CP_SHAPE[1], 8, 8, generator=torch.Generator().manual_seed(1000 + seed))
    ours = _output_error(conv, decompose_conv(conv, "cp", CP_RANK, cache=FactorCache()), x)
    if ours < RECOVERED:
        return
    # Not recovered: tensorly, measured the same way (its kernel in the same conv), must not do
    # markedly better.
    reference = _output_error(conv, _conv_with(_tensorly_cp_kernel(w, CP_RANK, seed)), x)
    assert ours <= TL_SLACK * reference, (
        f"seed {seed}: rl_mtd CP output error {ours:.3g}, tensorly parafac {reference:.3g}"
    )


def test_cp_stops_at_the_cap_and_fit_tolerance() -> None:
    w = _rank_r_kernel((16, 8, 3, 3), 3, seed=0)
    # An exactly low-rank kernel stops once its error is below FIT_TOL, well before the cap.
    f = factorize.cp(w, 3)
    assert factorize.relative_error(f.reconstruct(), w) <= 1e-5
    assert f.iterations < factorize.default_max_iter(tuple(w.shape), 3)
    # An explicit cap is honoured.
    noise = torch.randn(16, 8, 3, 3, generator=torch.Generator().manual_seed(1))
    assert factorize.cp(noise, 5, max_iter=7).iterations <= 7
    # The default cap is larger for smaller problems, within its bounds.
    small = factorize.default_max_iter((64, 32, 3, 3), 8)
    large = factorize.default_max_iter((512, 512, 3, 3), 128)
    assert factorize.MIN_SWEEPS <= large < small <= factorize.MAX_SWEEPS


def test_cp_first_fit_stops_before_its_terms_cancel() -> None:
    # Pushed on (tol=0) over a kernel far from rank 20, ALS drifts into cancelling terms (at sweep
    # ~516 here); the first fit returns the sweep before, so no refit and no warning is needed.
    w = torch.randn(32, 32, 3, 3, generator=torch.Generator().manual_seed(100))
    with warnings.catch_warnings():
        warnings.simplefilter("error", factorize.DegenerateFactorsWarning)
        f = factorize.cp(w, 20, tol=0.0)
    assert not f.degenerate_fixed
    assert f.iterations < factorize.default_max_iter(tuple(w.shape), 20)
    mats = [m.double() for m in (f.out, f.inp, f.vertical, f.horizontal)]
    assert all(torch.isfinite(m).all() for m in mats)
    terms = factorize._term_norms(mats)
    assert float(terms.max()) <= factorize.DEGENERACY_RATIO * float(w.double().norm())


def test_cp_of_an_all_zero_kernel_is_exact_and_quiet() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", factorize.DegenerateFactorsWarning)
        f = factorize.cp(torch.zeros(8, 4, 3, 3), 3)
    assert not f.degenerate_fixed
    assert f.out.shape == (8, 3) and f.horizontal.shape == (3, 3)
    assert torch.equal(f.reconstruct(), torch.zeros(8, 4, 3, 3))


def _multilinear_kernel(shape: tuple[int, int, int, int], ranks: tuple[int, int], seed: int):
    """A kernel of exact multilinear rank ``ranks`` on its two channel modes."""
    g = torch.Generator().manual_seed(seed)
    o, i, kh, kw = shape
    core = torch.randn(ranks[0], ranks[1], kh, kw, generator=g, dtype=torch.float64)
    u_out = torch.randn(o, ranks[0], generator=g, dtype=torch.float64)
    u_in = torch.randn(i, ranks[1], generator=g, dtype=torch.float64)
    return torch.einsum("abhw,oa,ib->oihw", core, u_out, u_in)


TUCKER_CASES = [("gaussian", 0, (12, 8)), ("gaussian", 1, (24, 16)), ("gaussian", 2, (40, 30))]


@pytest.mark.parametrize("kind,seed,ranks", [*TUCKER_CASES, ("exact", 3, (10, 6))])
def test_tucker2_matches_tensorly_partial_tucker(kind: str, seed: int, ranks: tuple[int, int]):
    shape = (48, 32, 3, 3)
    if kind == "exact":
        w = _multilinear_kernel(shape, ranks, seed)
    else:
        w = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    ours = factorize.relative_error(factorize.tucker2(w, ranks).reconstruct(), w)
    with tl.backend_context("numpy"):
        (core, (u_out, u_in)), _ = tl_decomposition.partial_tucker(
            w.numpy(), rank=list(ranks), modes=[0, 1], init="svd", n_iter_max=100, tol=1e-8
        )
    rec = torch.from_numpy(np.einsum("abhw,oa,ib->oihw", core, u_out, u_in))
    reference = factorize.relative_error(rec, w)
    # A few HOOI sweeps from the HOSVD land within 1% of tensorly's 100.
    assert ours <= 1.01 * reference + 1e-9, (ours, reference)


@pytest.mark.parametrize("scale", [1e-12, 1e8])
def test_cp_fit_does_not_depend_on_the_kernel_s_scale(scale: float) -> None:
    """A kernel scaled by 1e-12 came back as zero factors flagged degenerate: the fit's floors
    were absolute. It runs on the unit-norm kernel now."""
    w = torch.randn(16, 8, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    plain, scaled = factorize.cp(w, 12), factorize.cp(w * scale, 12)
    assert not scaled.degenerate_fixed
    err = factorize.relative_error(plain.reconstruct(), w)
    assert factorize.relative_error(scaled.reconstruct(), w * scale) == pytest.approx(err, rel=1e-6)
