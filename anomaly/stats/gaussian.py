"""A multivariate Gaussian with Ledoit-Wolf shrinkage, fitted from streamed moments.

The shrunk covariance is eq. (6) of the paper,
``Sigma_shrunk = (1 - rho) S + rho * tr(S) / D * I``, with the empirical
covariance ``S = Xc^T Xc / n`` (1/n, as in sklearn) and ``rho`` from the closed
form of Ledoit & Wolf as implemented by ``sklearn.covariance.ledoit_wolf_shrinkage``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from anomaly.errors import UserError
from anomaly.stats.moments import Moments


@dataclass(frozen=True)
class GaussianFit:
    """One level's fitted Gaussian (all tensors float64)."""

    mean: Tensor  # (D,)
    covariance: Tensor  # (D, D), shrunk
    precision: Tensor  # (D, D), inverse of ``covariance``
    shrinkage: float
    std: Tensor  # (D,), unbiased per-feature standard deviation (for SED, eq. 9)
    n: int

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])


def ledoit_wolf_shrinkage(emp_cov: Tensor, centred_quartic: Tensor, n: int) -> float:
    """The Ledoit-Wolf shrinkage intensity rho from moments.

    Equals sklearn's ``ledoit_wolf_shrinkage(X)``: with centred ``X``,
    ``beta = (sum_i ||x_i||^4 / n - ||X^T X||_F^2 / n^2) / (D n)`` and
    ``delta = ||S - mu I||_F^2 / D`` with ``mu = tr(S) / D``;
    ``rho = min(beta, delta) / delta``.
    """
    return float(ledoit_wolf_shrinkages(emp_cov[None], centred_quartic[None], n)[0].item())


def ledoit_wolf_shrinkages(emp_covs: Tensor, centred_quartics: Tensor, n: int) -> Tensor:
    """:func:`ledoit_wolf_shrinkage` of a batch: ``(K, D, D)`` covariances, ``(K,)`` quartics -> ``(K,)``."""
    dim = emp_covs.shape[-1]
    if dim == 1:
        return torch.zeros(emp_covs.shape[0], dtype=emp_covs.dtype, device=emp_covs.device)
    trace = torch.diagonal(emp_covs, dim1=-2, dim2=-1).sum(dim=-1)
    trace_mean = trace / dim
    frob = (emp_covs * emp_covs).sum(dim=(-2, -1))  # ||X^T X||_F^2 / n^2
    beta = (centred_quartics / n - frob) / (dim * n)
    delta = (frob - 2.0 * trace_mean * trace + dim * trace_mean**2) / dim
    beta = torch.minimum(beta, delta)
    # beta >= 0 in exact arithmetic; rounding can make it slightly negative
    return torch.where(beta > 0.0, beta / torch.where(beta > 0.0, delta, 1.0), 0.0)


def shrink_covariance(emp_cov: Tensor, shrinkage: float, inplace: bool = False) -> Tensor:
    """Eq. (6): ``(1 - rho) S + rho tr(S)/D I`` (written over ``emp_cov`` when ``inplace``)."""
    dim = emp_cov.shape[0]
    target = torch.diagonal(emp_cov).sum() / dim
    shrunk = emp_cov.mul_(1.0 - shrinkage) if inplace else (1.0 - shrinkage) * emp_cov
    shrunk.diagonal().add_(shrinkage * target)
    return shrunk


def inverse_is_accurate(matrix: Tensor, inverse: Tensor, probes: int = 4, tolerance: float = 1e-6) -> bool:
    """Whether ``matrix @ inverse`` acts as the identity on a few fixed random vectors.

    Cholesky can succeed on a numerically singular matrix (a pivot of rounding
    size), and its inverse is then garbage; this O(D^2) check catches that.
    """
    generator = torch.Generator(device="cpu").manual_seed(0)
    vectors = torch.randn(matrix.shape[0], probes, generator=generator, dtype=matrix.dtype).to(matrix.device)
    residual = matrix @ (inverse @ vectors) - vectors
    return bool(torch.isfinite(inverse).all()) and float(residual.norm() / vectors.norm()) < tolerance


def invert_spd(matrix: Tensor) -> Tensor:
    """Inverse of a symmetric positive (semi-)definite matrix, in float64.

    Cholesky first. When it fails or its inverse is inaccurate (the matrix is
    singular, e.g. zero shrinkage with fewer images than dimensions, or features
    that are constant), falls back to the eigen-decomposition pseudo-inverse, as
    ``scipy.linalg.pinvh`` does (and sklearn's ``precision_``), and warns.
    """
    matrix = matrix.to(torch.float64)
    factor, info = torch.linalg.cholesky_ex(matrix)
    if int(info.item()) == 0:
        identity = torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
        solved = torch.cholesky_solve(identity, factor)  # several times faster than cholesky_inverse on CPU
        del factor
        # symmetrised into the identity's memory: three D x D matrices at most besides ``matrix``
        inverse = torch.add(solved, solved.T, out=identity).mul_(0.5)
        del solved
        if inverse_is_accurate(matrix, inverse):
            return inverse
    warnings.warn(
        "covariance is singular or not positive definite; using the pseudo-inverse instead "
        "(constant or duplicated features, or too few training images)",
        RuntimeWarning,
        stacklevel=2,
    )
    eigval, eigvec = torch.linalg.eigh(matrix)
    cutoff = eigval.abs().max() * matrix.shape[0] * torch.finfo(torch.float64).eps
    inv_val = torch.where(eigval.abs() > cutoff, 1.0 / eigval, torch.zeros_like(eigval))
    return (eigvec * inv_val) @ eigvec.T


#: Total variance below this fraction of the mean's squared norm counts as none (rounding only).
NO_VARIANCE = 1e-12


def warn_if_no_variance(emp_cov: Tensor, mean: Tensor) -> None:
    """A specific warning when the training samples are (almost) all the same (identical or blank images).

    Every distance is then about 0, so the AUROC is chance and a threshold flags nothing.
    """
    total = float(torch.diagonal(emp_cov).sum())
    if total <= NO_VARIANCE * float(mean.square().sum()) or total == 0.0:
        warnings.warn(
            f"the training data have (almost) no variance (total {total:.3g} over {emp_cov.shape[0]} "
            "features): every score will be about 0 and nothing will be flagged; check that the training "
            "images differ (identical, blank or all-black images?)",
            RuntimeWarning,
            stacklevel=3,
        )


def fit_gaussian(moments: Moments) -> GaussianFit:
    """Mean, Ledoit-Wolf covariance and precision from streamed moments."""
    n = moments.n
    if n < 2:
        raise UserError(f"a Gaussian needs at least 2 training images, got {n}: add normal images to fit on")
    # one D x D matrix becomes the scatter, the empirical and the shrunk covariance in turn (in place);
    # the moments stay as they are (they can be updated and merged further)
    mean_y = moments.sum / moments.count
    emp_cov = moments.outer.clone().addr_(mean_y, mean_y, alpha=-moments.count.item())
    std = torch.sqrt(torch.clamp(torch.diagonal(emp_cov) / (n - 1), min=0.0))
    emp_cov.div_(n)
    warn_if_no_variance(emp_cov, moments.mean)
    shrinkage = ledoit_wolf_shrinkage(emp_cov, moments.centred_quartic(), n)
    covariance = shrink_covariance(emp_cov, shrinkage, inplace=True)
    return GaussianFit(
        mean=moments.mean,
        covariance=covariance,
        precision=invert_spd(covariance),
        shrinkage=shrinkage,
        std=std,
        n=n,
    )
