"""Tensor factorisations of conv kernels, in torch, on the kernel's own device.

Kernel ``W`` has shape ``(O, I, kh, kw)`` (output channels, input channels, kernel height/width).

- Tucker-2 (Kim et al. 2016): ``W ~ G x_0 U_out x_1 U_in`` with core ``G (r_out, r_in, kh, kw)``,
  ``U_out (O, r_out)``, ``U_in (I, r_in)``. HOSVD start, then a few HOOI sweeps.
- CP (Lebedev et al. 2015): ``W[o,i,h,w] ~ sum_r A[o,r] B[i,r] C[h,r] D[w,r]``, fitted by
  alternating least squares with a small ridge term. The MTTKRPs contract the large channel modes
  with one matrix product each, so a sweep over a 512x512x3x3 kernel at rank 128 costs two
  ~0.3 GFLOP products instead of forming Khatri-Rao products of the whole tensor.

CP-ALS on conv kernels is prone to degeneracy: rank-one terms that grow huge and cancel. The
guards here: SVD initialisation, a ridge term in every least-squares solve, an iteration cap and a
stopping rule, a check of the rank-one term norms against the kernel norm (refit with a stronger
ridge when it fires, with a warning), no non-finite factor ever returned, and the scale of each
rank-one term spread evenly over its four factors so no layer receives huge weights.

CP-ALS is also prone to swamps: long runs of sweeps that barely lower the error before it drops
by orders of magnitude. Stopping on the change of the fit over one sweep stopped inside them (on
exactly rank-8 64x32x3x3 kernels, 8 of 40 fits ended above 1e-4 relative error, the worst at
0.1, where tensorly's parafac reached 1e-7). So:

- the first fit's ridge is proximal: it pulls each factor towards its previous value rather than
  towards zero, so the solves stay well posed but the fixed points are the exact least-squares
  ones (a ridge towards zero biased exactly low-rank fits to ~1e-4 and slowed swamps further);
  it stops before its terms start to cancel (see ``_cp_als``). The refits after a degeneracy keep
  the ridge towards zero, which bounds the norms;
- a line search after every sweep (Bro 1998; tensorly's ``parafac(linesearch=True)``):
  extrapolate all four factors along the sweep's update by ``sweep ** (1 / p)`` and keep the
  extrapolation when it lowers the error; ``p`` grows after repeated rejections. It costs no
  extra product with the kernel: ``W x_i B`` is linear in ``B``, so the extrapolated contraction
  is a combination of the sweep's first contraction and the next sweep's;
- the fit stops when the relative error itself is below ``FIT_TOL``; or when the mean relative
  improvement per sweep over the last ``STALL_WINDOW`` sweeps is below ``tol`` while the error
  is at least ``SWAMP_ERR`` (the kernel is far from rank R, and a fit that gains so little per
  sweep there has little left to gain), or below ``SWAMP_TOL`` under it (swamps on exactly
  low-rank kernels sat at up to ~0.14 error, some gaining under 1e-8 per sweep for a hundred
  sweeps before dropping to 1e-6); or at a sweep cap that is larger for smaller problems
  (``default_max_iter``: a fixed amount of work per fit, so a big layer's time stays bounded).

Data-aware fits (``input_moment=M``, the input channels' second moment) run on the whitened
kernel ``W x_1 M^(1/2)`` and map the input factor back, so they minimise the layer's expected
output error (``rl_mtd.datafit`` derives it).
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass

import torch

from rl_mtd.datafit import whitening

log = logging.getLogger(__name__)

# A rank-one term whose norm exceeds this multiple of the kernel's norm signals cancellation.
DEGENERACY_RATIO = 10.0

# CP-ALS stopping rule (see the module doc).
FIT_TOL = 1e-6  # stop once the relative error ||W - W_hat|| / ||W|| is this small
STALL_WINDOW = 10  # sweeps over which progress is measured against the tolerance
SWAMP_ERR = 0.25  # below this relative error a stall may be a swamp: be patient
SWAMP_TOL = 1e-9  # the stall tolerance there (mean relative improvement per sweep)
# Default sweep cap: a fixed work budget per fit, within [MIN_SWEEPS, MAX_SWEEPS]: 50 sweeps for
# 512x512x3x3 at rank 128 (about 1.2 s on 2 CPU cores), 1000 for 64x32x3x3 at rank 8 (< 1 ms each).
SWEEP_WORK = 1e10
MIN_SWEEPS, MAX_SWEEPS = 50, 1000
# Line search: the step is ``sweep ** (1 / power)``; after this many rejections in a row the
# power grows by one (shorter steps). An extrapolated contraction of the kernel is reused while
# its rounding error is at most LS_MAX_AMP times a direct product's.
LS_MAX_FAILS = 4
LS_MAX_AMP = 100.0


class DegenerateFactorsWarning(RuntimeWarning):
    """CP-ALS produced cancelling or non-finite terms and was refitted with a stronger ridge."""


@dataclass
class TuckerFactors:
    core: torch.Tensor  # (r_out, r_in, kh, kw)
    u_out: torch.Tensor  # (O, r_out)
    u_in: torch.Tensor  # (I, r_in)

    def reconstruct(self) -> torch.Tensor:
        return torch.einsum("abhw,oa,ib->oihw", self.core, self.u_out, self.u_in)


@dataclass
class CPFactors:
    out: torch.Tensor  # A (O, R)
    inp: torch.Tensor  # B (I, R)
    vertical: torch.Tensor  # C (kh, R)
    horizontal: torch.Tensor  # D (kw, R)
    iterations: int = 0
    degenerate_fixed: bool = False

    def reconstruct(self) -> torch.Tensor:
        return torch.einsum("or,ir,hr,wr->oihw", self.out, self.inp, self.vertical, self.horizontal)


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return float(
        torch.linalg.vector_norm(approx - exact) / torch.linalg.vector_norm(exact).clamp_min(1e-30)
    )


def _top_left_singular(mat: torch.Tensor, rank: int) -> torch.Tensor:
    """Leading ``rank`` left singular vectors of ``mat`` (rows x cols), via the smaller Gram."""
    # eigh of the (rows x rows) Gram is much faster than a full SVD of a wide unfolding.
    gram = mat @ mat.T
    _, vecs = torch.linalg.eigh(gram)
    return vecs[:, -rank:].flip(-1).contiguous()


def _whiten(w: torch.Tensor, moment: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W x_1 S, S^-1)`` in ``w``'s dtype and device (see ``whitening``)."""
    s, s_inv = (t.to(device=w.device, dtype=w.dtype) for t in whitening(moment, w.shape[1]))
    return torch.einsum("oihw,ji->ojhw", w, s), s_inv


def tucker2(
    weight: torch.Tensor,
    ranks: tuple[int, int],
    *,
    n_iter: int = 3,
    input_moment: torch.Tensor | None = None,
) -> TuckerFactors:
    """Tucker-2 of a conv kernel on its two channel modes; ``ranks = (r_out, r_in)``.

    Without ``input_moment`` it minimises the kernel error ``||W - W_hat||`` (HOSVD, then
    ``n_iter`` HOOI sweeps). With it (``M``, the ``(I, I)`` second moment of the layer's input
    channels) it minimises ``||(W - W_hat) x_1 S||``, ``S = (M + ridge)^(1/2)``: the expected
    output error on inputs of that moment, spatial correlations ignored; ``u_in`` is then
    ``S^-1`` times an orthonormal basis.
    """
    w = weight.detach().to(torch.float64 if weight.device.type == "cpu" else torch.float32)
    if input_moment is not None:
        w_white, s_inv = _whiten(w, input_moment)
        t = tucker2(w_white, ranks, n_iter=n_iter)
        return TuckerFactors(*(f.to(weight.dtype) for f in (t.core, t.u_out, s_inv @ t.u_in)))
    o, i, kh, kw = w.shape
    r_out, r_in = ranks
    if not (1 <= r_out <= o and 1 <= r_in <= i):
        raise ValueError(
            f"Tucker-2 ranks {ranks} out of range for a kernel of shape {tuple(w.shape)}"
        )
    unfold_out = w.reshape(o, -1)
    unfold_in = w.transpose(0, 1).reshape(i, -1)
    u_out = _top_left_singular(unfold_out, r_out)
    u_in = _top_left_singular(unfold_in, r_in)
    # HOOI: each factor from the kernel projected on the other; a few sweeps suffice.
    for _ in range(n_iter if (r_out < o or r_in < i) else 0):
        proj_in = torch.einsum("oihw,ib->obhw", w, u_in).reshape(o, -1)
        u_out = _top_left_singular(proj_in, r_out)
        proj_out = torch.einsum("oihw,oa->iahw", w, u_out).reshape(i, -1)
        u_in = _top_left_singular(proj_out, r_in)
    core = torch.einsum("oihw,oa,ib->abhw", w, u_out, u_in)
    dtype = weight.dtype
    return TuckerFactors(core.to(dtype), u_out.to(dtype), u_in.to(dtype))


def _svd_init(w: torch.Tensor, rank: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Leading singular vectors of each unfolding; random columns where the mode is smaller."""
    factors = []
    for mode in range(4):
        unfold = w.movedim(mode, 0).reshape(w.shape[mode], -1)
        k = min(rank, w.shape[mode])
        u = _top_left_singular(unfold, k)
        if k < rank:
            extra = torch.randn(w.shape[mode], rank - k, generator=gen, dtype=w.dtype, device="cpu")
            u = torch.cat([u, extra.to(w.device)], dim=1)
        factors.append(u)
    return factors


def _solve(
    mttkrp: torch.Tensor, gram: torch.Tensor, ridge: float, prev: torch.Tensor | None = None
) -> torch.Tensor:
    """Ridge least-squares factor update ``X = (M + lam*P) (G + lam*I)^-1`` (G symmetric PSD).

    ``lam`` is ``ridge`` times the mean of G's diagonal. Without ``prev`` (P = 0) the ridge pulls
    X towards zero; with it, towards ``prev`` (proximal: the fixed points are unbiased).
    """
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    lam = ridge * gram.diagonal().mean().clamp_min(1e-12)
    reg = gram + lam * eye
    rhs = mttkrp if prev is None else mttkrp + lam * prev
    chol, info = torch.linalg.cholesky_ex(reg)  # SPD: Cholesky costs a third of LU
    if int(info) == 0:
        return torch.cholesky_solve(rhs.T, chol).T
    return torch.linalg.solve(reg, rhs.T).T


def default_max_iter(shape: tuple[int, ...], rank: int) -> int:
    """The sweep cap ``cp`` uses by default: ``SWEEP_WORK`` over ``sweep_work``."""
    return int(min(MAX_SWEEPS, max(MIN_SWEEPS, SWEEP_WORK // max(sweep_work(shape, rank), 1))))


def sweep_work(shape: tuple[int, ...], rank: int) -> int:
    """Multiply-adds of one CP-ALS sweep of a kernel of ``shape`` at ``rank``: two contractions
    of the kernel with a channel factor, the (R x R) Cholesky solves and their right-hand sides."""
    o, i, kh, kw = shape
    return 2 * o * i * kh * kw * rank + 4 * rank**3 + 2 * rank**2 * (o + i + kh + kw)


def _khatri_rao(c: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Column-wise Kronecker product of C (kh, R) and D (kw, R), as (kh * kw, R)."""
    return (c[:, None, :] * d[None, :, :]).reshape(c.shape[0] * d.shape[0], c.shape[1])


def _cp_als(
    w: torch.Tensor,
    rank: int,
    *,
    max_iter: int,
    tol: float,
    ridge: float,
    gen: torch.Generator,
    refit: bool = False,
) -> tuple[list[torch.Tensor], int]:
    """ALS sweeps from the SVD start; returns the factors and the number of sweeps.

    The first fit (``refit=False``) uses a proximal ridge and the line search, and stops before
    its terms start to cancel: once a sweep leaves a rank-one term above ``DEGENERACY_RATIO``
    times the kernel's norm (or a non-finite value), it returns the sweep before, if any. A refit
    after a degeneracy (``refit=True``) uses plain sweeps with a ridge towards zero, which bounds
    the norms, and leaves the norm check to the caller.
    """
    o, i, kh, kw = w.shape
    a, b, c, d = _svd_init(w, rank, gen)
    w_sq = max(float((w * w).sum()), 1e-30)
    w_ohw_i = w.permute(0, 2, 3, 1).reshape(o * kh * kw, i)  # for contracting the input mode
    w_ihw_o = w.permute(1, 2, 3, 0).reshape(i * kh * kw, o)  # for contracting the output mode

    def rel_err(inner: float, model_sq: float) -> float:
        # ||W - W_hat|| / ||W|| from the inner products, without rebuilding W_hat.
        return max(w_sq - 2 * inner + model_sq, 0.0) ** 0.5 / w_sq**0.5

    def update(mttkrp: torch.Tensor, gram: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        return _solve(mttkrp, gram, ridge, None if refit else old)

    limit = DEGENERACY_RATIO * w_sq**0.5
    good: list[torch.Tensor] | None = None  # the last sweep's factors, before any cancellation
    errs: list[float] = []
    power, fails = 2.0, 0
    t = None  # W x_i B for the current B, shaped (O, kh * kw, R)
    t_amp = 1.0  # bound on t's rounding error, in units of a direct product's
    it = 0
    for it in range(1, max_iter + 1):  # noqa: B007 - returned below
        if t is None:
            t, t_amp = (w_ohw_i @ b).reshape(o, kh * kw, rank), 1.0
        prev, t_prev = (a, b, c, d), t
        kr_cd = _khatri_rao(c, d)
        g_cd = (c.T @ c) * (d.T @ d)
        # A: contract I with B, then the spatial modes with C (.) D.
        a = update((t * kr_cd).sum(1), (b.T @ b) * g_cd, a)
        # B and the spatial factors share the product of W with the new A over O.
        p = (w_ihw_o @ a).reshape(i, kh * kw, rank)
        b = update((p * kr_cd).sum(1), (a.T @ a) * g_cd, b)
        s = (p * b[:, None, :]).sum(0).reshape(kh, kw, rank)  # W x_o A x_i B
        g_ab = (a.T @ a) * (b.T @ b)
        c = update(torch.einsum("hwr,wr->hr", s, d), g_ab * (d.T @ d), c)
        d = update(torch.einsum("hwr,hr->wr", s, c), g_ab * (c.T @ c), d)
        inner = float((torch.einsum("hwr,hr->wr", s, c) * d).sum())
        err = rel_err(inner, float((g_ab * (c.T @ c) * (d.T @ d)).sum()))
        t = None
        if not refit and it > 1 and math.isfinite(err):
            # The next sweep's contraction; W x_i B is linear in B, so the extrapolated one
            # follows from it and the last without another product.
            t, t_amp_new = (w_ohw_i @ b).reshape(o, kh * kw, rank), 1.0
            step = it ** (1.0 / power)  # >= 1
            trial = [old + step * (new - old) for old, new in zip(prev, (a, b, c, d))]
            ta, tb, tc, td = trial
            t_trial = t_prev + step * (t - t_prev)
            amp = (step - 1.0) * t_amp + step + 1.0
            inner = float(((t_trial * _khatri_rao(tc, td)).sum(1) * ta).sum())
            grams = (ta.T @ ta) * (tb.T @ tb) * (tc.T @ tc) * (td.T @ td)
            err_trial = rel_err(inner, float(grams.sum()))
            if err_trial < err:  # False for NaN: a non-finite extrapolation is never kept
                a, b, c, d = trial
                err, fails = err_trial, 0
                # Keep the extrapolated contraction while its rounding stays small, else redo it.
                t, t_amp_new = (t_trial, amp) if amp <= LS_MAX_AMP else (None, 1.0)
            else:
                fails += 1
                if fails >= LS_MAX_FAILS:
                    power, fails = power + 1.0, 0
            t_amp = t_amp_new
        errs.append(err)
        finite = math.isfinite(err) and all(bool(torch.isfinite(f).all()) for f in (a, b, c, d))
        if not finite or (not refit and float(_term_norms([a, b, c, d]).max()) > limit):
            if not refit and good is not None:
                return good, it - 1
            break
        good = [a, b, c, d]
        if err <= FIT_TOL:
            break
        stall_tol = tol if err >= SWAMP_ERR else min(tol, SWAMP_TOL)
        if (
            len(errs) > STALL_WINDOW
            and errs[-1 - STALL_WINDOW] - err <= STALL_WINDOW * stall_tol * err
        ):
            break
    return [a, b, c, d], it


def _term_norms(factors: list[torch.Tensor]) -> torch.Tensor:
    norms = torch.ones(factors[0].shape[1], dtype=factors[0].dtype, device=factors[0].device)
    for f in factors:
        norms = norms * torch.linalg.vector_norm(f, dim=0)
    return norms


def _balance(factors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Spread each rank-one term's scale evenly over its four factors."""
    col = [torch.linalg.vector_norm(f, dim=0).clamp_min(1e-30) for f in factors]
    total = torch.ones_like(col[0])
    for n in col:
        total = total * n
    share = total ** (1.0 / len(factors))
    return [f / n * share for f, n in zip(factors, col)]


def _is_degenerate(factors: list[torch.Tensor], w_norm: float) -> bool:
    if not all(torch.isfinite(f).all() for f in factors):
        return True
    return float(_term_norms(factors).max()) > DEGENERACY_RATIO * max(w_norm, 1e-30)


def cp(
    weight: torch.Tensor,
    rank: int,
    *,
    max_iter: int | None = None,
    tol: float = 1e-5,
    ridge: float = 1e-6,
    seed: int = 0,
    input_moment: torch.Tensor | None = None,
) -> CPFactors:
    """4-way CP of a conv kernel at ``rank`` by ridge-regularised ALS with degeneracy guards.

    Without ``input_moment`` it minimises the kernel error ``||W - W_hat||``. With it (``M``, the
    ``(I, I)`` second moment of the layer's input channels) it minimises ``||(W - W_hat) x_1 S||``,
    ``S = (M + ridge)^(1/2)``, the expected output error on inputs of that moment (spatial
    correlations ignored): the same ALS and guards run on ``W x_1 S`` and ``inp`` is mapped back
    by ``S^-1``. Errors, tolerances and the degeneracy check then refer to the whitened kernel.

    ``max_iter`` caps the sweeps (default: ``default_max_iter``). A fit stops earlier once its
    relative error is below ``FIT_TOL``, or once its mean relative improvement per sweep over the
    last ``STALL_WINDOW`` sweeps is below ``tol`` (``min(tol, SWAMP_TOL)`` while the error is under
    ``SWAMP_ERR``); ``tol=0`` runs to the cap or ``FIT_TOL``.
    """
    if rank < 1:
        raise ValueError(f"CP rank must be >= 1, got {rank}")
    w = weight.detach().to(torch.float64 if weight.device.type == "cpu" else torch.float32)
    if not torch.isfinite(w).all():
        raise ValueError("cannot decompose a kernel with NaN or inf weights; check the checkpoint")
    w, s_inv = (w, None) if input_moment is None else _whiten(w, input_moment)
    if max_iter is None:
        max_iter = default_max_iter(tuple(w.shape), rank)
    gen = torch.Generator().manual_seed(seed)
    w_norm = float(torch.linalg.vector_norm(w))
    if w_norm == 0.0:  # all zeros: the zero factors are exact (every term would look degenerate)
        zeros = [torch.zeros(n, rank, dtype=weight.dtype, device=weight.device) for n in w.shape]
        return CPFactors(*zeros)
    # The fit runs on the unit-norm kernel, so no floor inside it depends on the weights' scale.
    w = w / w_norm
    fixed = False
    factors, iters = _cp_als(w, rank, max_iter=max_iter, tol=tol, ridge=ridge, gen=gen)
    strength = ridge
    while _is_degenerate(factors, 1.0):
        fixed = True
        strength = max(strength * 100, 1e-4)
        if strength > 1.0:
            # Last resort: a heavily damped fit cannot blow up; better a weak layer than NaN.
            strength = 10.0
            factors, iters = _cp_als(
                w, rank, max_iter=20, tol=tol, ridge=strength, gen=gen, refit=True
            )
            factors = [torch.nan_to_num(f, nan=0.0, posinf=0.0, neginf=0.0) for f in factors]
            break
        factors, iters = _cp_als(
            w, rank, max_iter=max_iter, tol=tol, ridge=strength, gen=gen, refit=True
        )
    if fixed:
        warnings.warn(
            f"CP-ALS on a kernel of shape {tuple(w.shape)} at rank {rank} produced degenerate "
            f"(cancelling or non-finite) terms; refitted with ridge {strength:g}",
            DegenerateFactorsWarning,
            stacklevel=2,
        )
    factors = [factors[0] * w_norm, *factors[1:]]
    if s_inv is not None:
        factors = [factors[0], s_inv @ factors[1], *factors[2:]]
    a, b, c, d = (f.to(weight.dtype) for f in _balance(factors))
    return CPFactors(a, b, c, d, iterations=iters, degenerate_fixed=fixed)
