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
tolerance, a check of the rank-one term norms against the kernel norm (refit with a stronger ridge
when it fires, with a warning), no non-finite factor ever returned, and the scale of each
rank-one term spread evenly over its four factors so no layer receives huge weights.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

# A rank-one term whose norm exceeds this multiple of the kernel's norm signals cancellation.
DEGENERACY_RATIO = 10.0


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
    return float(torch.linalg.vector_norm(approx - exact) / torch.linalg.vector_norm(exact).clamp_min(1e-30))


def _top_left_singular(mat: torch.Tensor, rank: int) -> torch.Tensor:
    """Leading ``rank`` left singular vectors of ``mat`` (rows x cols), via the smaller Gram."""
    # eigh of the (rows x rows) Gram is much faster than a full SVD of a wide unfolding.
    gram = mat @ mat.T
    _, vecs = torch.linalg.eigh(gram)
    return vecs[:, -rank:].flip(-1).contiguous()


def tucker2(weight: torch.Tensor, ranks: tuple[int, int], *, n_iter: int = 3) -> TuckerFactors:
    """Tucker-2 of a conv kernel on its two channel modes; ``ranks = (r_out, r_in)``."""
    w = weight.detach().to(torch.float64 if weight.device.type == "cpu" else torch.float32)
    o, i, kh, kw = w.shape
    r_out, r_in = ranks
    if not (1 <= r_out <= o and 1 <= r_in <= i):
        raise ValueError(f"Tucker-2 ranks {ranks} out of range for a kernel of shape {tuple(w.shape)}")
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


def _solve(mttkrp: torch.Tensor, gram: torch.Tensor, ridge: float) -> torch.Tensor:
    """Least-squares factor update ``X = M (G + ridge*I)^-1`` (G symmetric PSD)."""
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    reg = gram + (ridge * gram.diagonal().mean().clamp_min(1e-12)) * eye
    chol, info = torch.linalg.cholesky_ex(reg)  # SPD: Cholesky costs a third of LU
    if int(info) == 0:
        return torch.cholesky_solve(mttkrp.T, chol).T
    return torch.linalg.solve(reg, mttkrp.T).T


def _cp_als(
    w: torch.Tensor, rank: int, *, max_iter: int, tol: float, ridge: float, gen: torch.Generator
) -> tuple[list[torch.Tensor], int]:
    o, i, kh, kw = w.shape
    a, b, c, d = _svd_init(w, rank, gen)
    w_sq = float((w * w).sum())
    w_ohw_i = w.permute(0, 2, 3, 1).reshape(o * kh * kw, i)  # for contracting the input mode
    w_ihw_o = w.permute(1, 2, 3, 0).reshape(i * kh * kw, o)  # for contracting the output mode
    prev_err = float("inf")
    it = 0
    for it in range(1, max_iter + 1):  # noqa: B007 - returned below
        kr_cd = (c[:, None, :] * d[None, :, :]).reshape(kh * kw, rank)  # Khatri-Rao of C and D
        g_cd = (c.T @ c) * (d.T @ d)
        # A: contract I with B, then the spatial modes with C (.) D.
        t = (w_ohw_i @ b).reshape(o, kh * kw, rank)
        a = _solve((t * kr_cd).sum(1), (b.T @ b) * g_cd, ridge)
        # B and the spatial factors share the product of W with the new A over O.
        p = (w_ihw_o @ a).reshape(i, kh * kw, rank)
        b = _solve((p * kr_cd).sum(1), (a.T @ a) * g_cd, ridge)
        s = (p * b[:, None, :]).sum(0).reshape(kh, kw, rank)  # W x_o A x_i B
        g_ab = (a.T @ a) * (b.T @ b)
        c = _solve(torch.einsum("hwr,wr->hr", s, d), g_ab * (d.T @ d), ridge)
        d = _solve(torch.einsum("hwr,hr->wr", s, c), g_ab * (c.T @ c), ridge)
        # ||W - W_hat||^2 from the inner products, without rebuilding W_hat.
        inner = float((torch.einsum("hwr,hr->wr", s, c) * d).sum())
        model_sq = float((g_ab * (c.T @ c) * (d.T @ d)).sum())
        err = max(w_sq - 2 * inner + model_sq, 0.0) ** 0.5 / max(w_sq, 1e-30) ** 0.5
        if not torch.isfinite(a).all() or abs(prev_err - err) < tol * max(err, 1e-12):
            break
        prev_err = err
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
    max_iter: int = 100,
    tol: float = 1e-5,
    ridge: float = 1e-6,
    seed: int = 0,
) -> CPFactors:
    """4-way CP of a conv kernel at ``rank`` by ridge-regularised ALS with degeneracy guards."""
    if rank < 1:
        raise ValueError(f"CP rank must be >= 1, got {rank}")
    w = weight.detach().to(torch.float64 if weight.device.type == "cpu" else torch.float32)
    if not torch.isfinite(w).all():
        raise ValueError("cannot decompose a kernel with NaN or inf weights; check the checkpoint")
    gen = torch.Generator().manual_seed(seed)
    w_norm = float(torch.linalg.vector_norm(w))
    fixed = False
    factors, iters = _cp_als(w, rank, max_iter=max_iter, tol=tol, ridge=ridge, gen=gen)
    strength = ridge
    while _is_degenerate(factors, w_norm):
        fixed = True
        strength = max(strength * 100, 1e-4)
        if strength > 1.0:
            # Last resort: a heavily damped fit cannot blow up; better a weak layer than NaN.
            strength = 10.0
            factors, iters = _cp_als(w, rank, max_iter=20, tol=tol, ridge=strength, gen=gen)
            factors = [torch.nan_to_num(f, nan=0.0, posinf=0.0, neginf=0.0) for f in factors]
            break
        factors, iters = _cp_als(w, rank, max_iter=max_iter, tol=tol, ridge=strength, gen=gen)
    if fixed:
        warnings.warn(
            f"CP-ALS on a kernel of shape {tuple(w.shape)} at rank {rank} produced degenerate "
            f"(cancelling or non-finite) terms; refitted with ridge {strength:g}",
            DegenerateFactorsWarning,
            stacklevel=2,
        )
    a, b, c, d = (f.to(weight.dtype) for f in _balance(factors))
    return CPFactors(a, b, c, d, iterations=iters, degenerate_fixed=fixed)
