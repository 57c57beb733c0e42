"""A multivariate Gaussian with Ledoit-Wolf shrinkage, fitted from streamed moments.

The shrunk covariance is eq. (6) of the paper,
``Sigma_shrunk = (1 - rho) S + rho * tr(S) / D * I``, with the empirical
covariance ``S = Xc^T Xc / n`` (1/n, as in sklearn) and ``rho`` from the closed
form of Ledoit & Wolf as implemented by ``sklearn.covariance.ledoit_wolf_shrinkage``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from anomaly.errors import UserError
from anomaly.stats.moments import Moments, Rows


@dataclass(frozen=True)
class GaussianFit:
    """One level's fitted Gaussian (all tensors float64).

    The shrunk covariance is not kept (the precision is computed in its memory):
    :attr:`covariance` rebuilds it from the moments.
    """

    mean: Tensor  # (D,)
    #: (D, D), the inverse of the shrunk covariance; fitted from rows, its exact low-rank form
    #: (:class:`anomaly.stats.low_rank.LowRankPrecision`)
    precision: Tensor | Any
    shrinkage: float
    std: Tensor  # (D,), unbiased per-feature standard deviation (for SED, eq. 9)
    n: int
    moments: Moments | Rows  # what the fit was made from

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    @property
    def covariance(self) -> Tensor:
        """The shrunk covariance of eq. (6), ``(D, D)``, rebuilt from the moments (a new matrix)."""
        moments = self.moments.moments() if isinstance(self.moments, Rows) else self.moments
        return shrunk_covariance(moments, self.shrinkage)


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
    trace = torch.diagonal(emp_covs, dim1=-2, dim2=-1).sum(dim=-1)
    flat = emp_covs.reshape(emp_covs.shape[0], -1)
    frob = torch.einsum("kd,kd->k", flat, flat)  # ||X^T X||_F^2 / n^2, without a (K, D, D) temporary
    return shrinkages_from_sums(trace, frob, centred_quartics, n, emp_covs.shape[-1])


def shrinkages_from_sums(trace: Tensor, frob: Tensor, centred_quartics: Tensor, n: int, dim: int) -> Tensor:
    """:func:`ledoit_wolf_shrinkages` from ``tr(S)``, ``||S||_F^2`` and ``sum_i ||x_i - mu||^4`` alone
    (each ``(K,)``): all that the closed form needs of the ``D x D`` covariance ``S``."""
    if dim == 1:
        return torch.zeros_like(trace)
    trace_mean = trace / dim
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


def inverse_is_accurate(
    times: Callable[[Tensor], Tensor], inverse: Tensor, probes: int = 4, tolerance: float = 1e-6
) -> bool:
    """Whether ``inverse`` inverts the matrix that ``times`` multiplies by, on a few fixed random vectors.

    Cholesky can succeed on a numerically singular matrix (a pivot of rounding
    size), and its inverse is then garbage; this O(D^2) check catches that.
    """
    generator = torch.Generator(device="cpu").manual_seed(0)
    vectors = torch.randn(inverse.shape[0], probes, generator=generator, dtype=inverse.dtype)
    vectors = vectors.to(inverse.device)
    solved = inverse @ vectors  # not finite when the inverse is not
    residual = times(solved) - vectors
    return bool(torch.isfinite(solved).all()) and float(residual.norm() / vectors.norm()) < tolerance


def cholesky_inverse_(matrix: Tensor) -> Tensor | None:
    """The inverse of a float64 symmetric positive definite matrix, written over it (see
    :func:`invert_in_place_`); ``None`` (and the matrix lost) when it is not positive definite."""
    return None if bool(invert_in_place_(matrix).any()) else matrix


def invert_in_place_(matrices: Tensor) -> Tensor:
    """Inverts float64 symmetric positive definite matrices ``(..., D, D)`` in their own memory;
    returns which were not positive definite (those hold the identity instead).

    ``A = L L^T`` and LAPACK's ``potri`` (``A^-1 = L^-T L^-1``, exactly symmetric), about ``D^3``
    flops, both in place on the column-major view ``A^T = A``: LAPACK's own layout, so that neither
    makes a copy and the inverse needs no memory beyond the matrix.
    """
    column_major = matrices.mT
    info = torch.empty(matrices.shape[:-2], dtype=torch.int32, device=matrices.device)
    torch.linalg.cholesky_ex(column_major, out=(column_major, info))  # L, zeros above the diagonal
    failed = info != 0
    if bool(failed.any()):
        identity = torch.eye(matrices.shape[-1], dtype=matrices.dtype, device=matrices.device)
        column_major.copy_(torch.where(failed[..., None, None], identity, column_major))
    torch.cholesky_inverse(column_major, out=column_major)
    return failed


#: Bytes of the matrices that :func:`batched_inverse_` copies at a time (to check their inverses).
INVERSE_CHUNK_BYTES = 2**20


def batched_inverse_(
    matrices: Tensor,
    fallback: Callable[[Tensor], Tensor] | None = None,
    chunk_bytes: int = INVERSE_CHUNK_BYTES,
) -> Tensor:
    """Inverts ``(K, D, D)`` symmetric positive definite matrices in their own memory
    (:func:`invert_in_place_`); returns whether each inverse is accurate (:func:`inverse_is_accurate`;
    not where the matrix is not positive definite).

    A chunk of at most ``chunk_bytes`` (at least one matrix) is copied at a time, to check its
    inverses against: the memory beyond the matrices stays bounded whatever ``K``. An inaccurate
    inverse is replaced by ``fallback(matrix)`` where given (else left as it is).
    """
    cells, dim = matrices.shape[0], matrices.shape[-1]
    step = max(1, chunk_bytes // max(1, dim * dim * matrices.element_size()))
    accurate = torch.zeros(cells, dtype=torch.bool)
    for start in range(0, cells, step):
        chunk = matrices[start : start + step]
        original = chunk.clone()
        failed = invert_in_place_(chunk)
        for k, (matrix, inverse) in enumerate(zip(original, chunk, strict=True)):
            accurate[start + k] = not bool(failed[k]) and inverse_is_accurate(matrix.__matmul__, inverse)
            if fallback is not None and not accurate[start + k]:
                inverse.copy_(fallback(matrix))
    return accurate


def pseudo_inverse(matrix: Tensor) -> Tensor:
    """The eigen-decomposition pseudo-inverse of a symmetric matrix, as ``scipy.linalg.pinvh``."""
    eigval, eigvec = torch.linalg.eigh(matrix)
    cutoff = eigval.abs().max() * matrix.shape[0] * torch.finfo(torch.float64).eps
    inv_val = torch.where(eigval.abs() > cutoff, 1.0 / eigval, torch.zeros_like(eigval))
    return (eigvec * inv_val) @ eigvec.T


def warn_singular() -> None:
    warnings.warn(
        "covariance is singular or not positive definite; using the pseudo-inverse instead "
        "(constant or duplicated features, or too few training images)",
        RuntimeWarning,
        stacklevel=3,
    )


def invert_spd(matrix: Tensor) -> Tensor:
    """Inverse of a symmetric positive (semi-)definite matrix, in float64.

    Cholesky first. When it fails or its inverse is inaccurate (the matrix is
    singular, e.g. zero shrinkage with fewer images than dimensions, or features
    that are constant), falls back to the eigen-decomposition pseudo-inverse, as
    ``scipy.linalg.pinvh`` does (and sklearn's ``precision_``), and warns.
    """
    matrix = matrix.to(torch.float64)
    inverse = cholesky_inverse_(matrix.clone())
    if inverse is not None and inverse_is_accurate(matrix.__matmul__, inverse):
        return inverse
    del inverse
    warn_singular()
    return pseudo_inverse(matrix)


#: Total variance below this fraction of the mean's squared norm counts as none (rounding only).
NO_VARIANCE = 1e-12


def total_is_rounding(total: float, mean: Tensor) -> bool:
    """Whether a total variance ``tr(S)`` is of rounding size next to the mean's squared norm."""
    return total <= NO_VARIANCE * float(mean.square().sum()) or total == 0.0


def warn_if_no_variance(total: float, mean: Tensor) -> None:
    """A specific warning when the training samples are (almost) all the same (identical or blank
    images), from their total variance ``tr(S)`` and their mean.

    Every distance is then about 0, so the AUROC is chance and a threshold flags nothing.
    """
    if total_is_rounding(total, mean):
        warnings.warn(
            f"the training data have (almost) no variance (total {total:.3g} over {mean.shape[0]} "
            "features): every score will be about 0 and nothing will be flagged; check that the training "
            "images differ (identical, blank or all-black images?)",
            RuntimeWarning,
            stacklevel=3,
        )


def scatter_matrix(moments: Moments) -> Tensor:
    """The centred scatter matrix ``sum_i (x_i - mu)(x_i - mu)^T`` as one new ``D x D`` matrix."""
    mean_y = moments.sum / moments.count
    return moments.outer.clone().addr_(mean_y, mean_y, alpha=-moments.count.item())


def shrunk_covariance(moments: Moments, shrinkage: float) -> Tensor:
    """Eq. (6) from the moments, as one new ``D x D`` matrix."""
    return shrink_covariance(scatter_matrix(moments).div_(moments.n), shrinkage, inplace=True)


def covariance_times(moments: Moments, shrinkage: float, vectors: Tensor) -> Tensor:
    """``shrunk_covariance(moments, shrinkage) @ vectors`` from the moments, without a ``D x D`` matrix."""
    n, mean_y = moments.count, moments.sum / moments.count
    trace = (torch.diagonal(moments.outer).sum() - n * (mean_y @ mean_y)) / n
    empirical = (moments.outer @ vectors - n * torch.outer(mean_y, mean_y @ vectors)) / n
    return (1.0 - shrinkage) * empirical + (shrinkage * trace / mean_y.shape[0]) * vectors


def check_samples(n: int) -> None:
    """A Gaussian needs at least two samples: the :class:`UserError` that says so."""
    if n < 2:
        raise UserError(f"a Gaussian needs at least 2 training images, got {n}: add normal images to fit on")


def fit_gaussian(moments: Moments) -> GaussianFit:
    """Mean, Ledoit-Wolf shrinkage and precision from streamed moments.

    One new ``D x D`` matrix becomes the scatter, the empirical and the shrunk covariance, its
    Cholesky factor and the precision in turn (in place; one more while inverting); the moments
    stay as they are (they can be updated and merged further).
    """
    n = moments.n
    check_samples(n)
    emp_cov = scatter_matrix(moments)
    std = torch.sqrt(torch.clamp(torch.diagonal(emp_cov) / (n - 1), min=0.0))
    emp_cov.div_(n)
    warn_if_no_variance(float(torch.diagonal(emp_cov).sum()), moments.mean)
    shrinkage = ledoit_wolf_shrinkage(emp_cov, moments.centred_quartic(), n)
    precision = cholesky_inverse_(shrink_covariance(emp_cov, shrinkage, inplace=True))
    del emp_cov
    if precision is None or not inverse_is_accurate(
        lambda vectors: covariance_times(moments, shrinkage, vectors), precision
    ):
        del precision
        warn_singular()
        precision = pseudo_inverse(shrunk_covariance(moments, shrinkage))
    return GaussianFit(
        mean=moments.mean, precision=precision, shrinkage=shrinkage, std=std, n=n, moments=moments
    )
