"""The Ledoit-Wolf Gaussian of fewer rows than dimensions, in its exact low-rank form.

With ``n`` rows in ``D >= n`` dimensions the empirical covariance ``S = Xc^T Xc / n`` has rank
``r < n``: ``S = U diag(lambda) U^T`` with ``U`` (D, r) the orthonormal right singular vectors of
the centred rows and ``lambda = sigma^2 / n``. The shrunk covariance of eq. (6),
``Sigma = (1 - rho) S + rho mu I`` (``mu = tr(S) / D``), and its inverse are then

    ``Sigma = U diag((1 - rho) lambda + rho mu) U^T + rho mu (I - U U^T)``
    ``P = U diag(1 / ((1 - rho) lambda + rho mu)) U^T + (I - U U^T) / (rho mu)``

so that the Mahalanobis distance of eq. (2) is, with ``z = x - mean`` and ``c = U^T z``,

    ``d^2 = sum_k c_k^2 / ((1 - rho) lambda_k + rho mu) + ||z - U c||^2 / (rho mu)``:

``n D`` floats for the rows and as many for ``U``, instead of ``D^2`` each for the moments and
the precision, and ``n D`` flops a row instead of ``D^2``. The closed form of the shrinkage
needs only ``tr(S)``, ``||S||_F^2 = sum sigma^4 / n^2`` and ``sum_i ||x_i - mu||^4`` (the rows'
squared norms), as sklearn computes it. Without shrinkage (``rho mu = 0``) the second term is
left out: the pseudo-inverse, as ``scipy.linalg.pinvh`` (and sklearn's ``precision_``) gives.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from anomaly.stats.gaussian import (
    GaussianFit,
    check_samples,
    fit_gaussian,
    shrinkages_from_sums,
    warn_if_no_variance,
    warn_singular,
)
from anomaly.stats.moments import Moments, Rows

#: Bytes of the weighted basis that :meth:`LowRankPrecision.cell_blocks` makes at a time.
CHUNK_BYTES = 2**20


@dataclass(frozen=True)
class LowRankPrecision:
    """``P = U diag(basis_precision) U^T + residual_precision (I - U U^T)`` (see the module docstring)."""

    basis: Tensor  # (D, r), orthonormal columns
    basis_precision: Tensor  # (r,)
    residual_precision: Tensor  # scalar; 0 for the pseudo-inverse

    def squared(self, diff: Tensor) -> Tensor:
        """``diff_i^T P diff_i`` for each row of ``diff`` (n, D)."""
        inside = diff @ self.basis
        residual = diff - inside @ self.basis.T
        outside = (residual * residual).sum(dim=1)
        return (inside * inside) @ self.basis_precision + self.residual_precision * outside

    def times(self, diff: Tensor) -> Tensor:
        """``diff @ P`` (P is symmetric), rows ``(n, D)``."""
        inside = diff @ self.basis
        residual = diff - inside @ self.basis.T
        return (inside * self.basis_precision) @ self.basis.T + self.residual_precision * residual

    def cell_blocks(self, cells: int, chunk_bytes: int = CHUNK_BYTES) -> Tensor:
        """``(K, C, C)``: the diagonal blocks ``P_jj`` of K cells of C channels, channel-major
        (entry ``c K + j`` is channel c of cell j)."""
        channels, rank = self.basis.shape[0] // cells, self.basis.shape[1]
        per_cell = self.basis.reshape(channels, cells, rank).transpose(0, 1)  # (K, C, r)
        weights = self.basis_precision - self.residual_precision
        blocks = self.basis.new_empty(cells, channels, channels)
        # a few cells at a time: the weighted basis (K, C, r), as large as the basis, is made in chunks
        step = max(1, chunk_bytes // max(1, channels * rank * self.basis.element_size()))
        for start in range(0, cells, step):
            part = per_cell[start : start + step]
            blocks[start : start + step] = torch.einsum("kcr,r,kdr->kcd", part, weights, part)
        blocks.diagonal(dim1=-2, dim2=-1).add_(self.residual_precision)
        return blocks

    def dense(self) -> Tensor:
        """``P`` as a ``D x D`` matrix (for checks; scoring never builds it)."""
        identity = torch.eye(self.basis.shape[0], dtype=self.basis.dtype, device=self.basis.device)
        return self.times(identity)


def fit_rows(rows: Rows) -> GaussianFit:
    """Mean, Ledoit-Wolf shrinkage and the low-rank precision from the rows themselves (``n <= D``)."""
    n, dim = rows.n, rows.rows.shape[1]
    check_samples(n)
    offset = rows.rows.mean(dim=0)
    centred = rows.rows - offset
    _, sigma, right = torch.linalg.svd(centred, full_matrices=False)
    squares = centred.mul_(centred)  # the centred rows are not needed any more: their squares in place
    squared_norms = squares.sum(dim=1)
    std = torch.sqrt(squares.sum(dim=0) / (n - 1))
    del centred, squares
    variances = sigma * sigma / n  # the nonzero eigenvalues of S
    trace = squared_norms.sum() / n
    mean = rows.shift + offset
    warn_if_no_variance(float(trace), mean)
    frob = (variances * variances).sum()
    quartic = (squared_norms * squared_norms).sum()
    shrinkage = float(shrinkages_from_sums(trace[None], frob[None], quartic[None], n, dim)[0])
    residual = shrinkage * trace / dim  # rho mu: Sigma's eigenvalue outside the rows' span
    eigenvalues = (1.0 - shrinkage) * variances + residual  # Sigma's inside it
    # as scipy's pinvh (and sklearn's precision_): eigenvalues of Sigma below this count as 0
    eps = dim * torch.finfo(torch.float64).eps
    cutoff = max(float(eigenvalues.max()), float(residual)) * eps
    # a direction of rounding-size variance (the centred rows' null one) is outside the span
    keep = (eigenvalues > cutoff) & (variances > variances.max() * eps)
    if residual <= cutoff and int(keep.sum()) < dim:
        warn_singular()
    basis = right.T[:, keep].contiguous()  # the kept right singular vectors as columns, in one copy
    del right
    precision = LowRankPrecision(
        basis=basis,
        basis_precision=1.0 / eigenvalues[keep],
        residual_precision=1.0 / residual if residual > cutoff else torch.zeros((), dtype=torch.float64),
    )
    return GaussianFit(mean=mean, precision=precision, shrinkage=shrinkage, std=std, n=n, moments=rows)


def fit_streamed(value: Moments | Rows) -> GaussianFit:
    """A level's Gaussian from an accumulator's :meth:`~anomaly.stats.moments.RunningMoments.value`:
    the low-rank form from its rows while it keeps them, the dense one from its moments."""
    return fit_rows(value) if isinstance(value, Rows) else fit_gaussian(value)


__all__ = ["LowRankPrecision", "fit_rows", "fit_streamed"]
