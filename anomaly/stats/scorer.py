"""A fitted level as an ``nn.Module``: buffers that save, load, move and export."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from anomaly.stats.distances import l2_distance, standardised_euclidean
from anomaly.stats.gaussian import GaussianFit
from anomaly.stats.low_rank import LowRankPrecision

#: The buffers of the precision's low-rank form (:class:`~anomaly.stats.low_rank.LowRankPrecision`).
LOW_RANK_BUFFERS = ("basis", "basis_precision", "residual_precision")


def precision_shapes(dim: int, found: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The shapes of a ``dim``-dimensional Gaussian's saved tensors, its precision in the form found
    (``basis`` of ``r`` columns, or a ``D x D`` ``precision``)."""
    shapes = {"mean": (dim,), "std": (dim,), "shrinkage": ()}
    if "basis" not in found:
        return {**shapes, "precision": (dim, dim)}
    rank = min(found["basis"][-1], dim)  # a basis of more columns than dimensions is refused
    return {**shapes, "basis": (dim, rank), "basis_precision": (rank,), "residual_precision": ()}


class GaussianScorer(nn.Module):
    """Scores feature vectors of one level by Mahalanobis (eq. 2), L2 and SED (eq. 9).

    ``projection`` (D, k) maps features to a reduced space first; without a
    reduction it is an empty (D, 0) tensor that stands for the identity (no
    D x D matrix is stored). The Gaussian's statistics live in that space.

    The precision is either ``precision`` (D, D), or, fitted from fewer rows than dimensions,
    its exact low-rank form (:mod:`anomaly.stats.low_rank`): ``basis`` (D, r),
    ``basis_precision`` (r,) and ``residual_precision`` (a scalar), with ``precision`` empty.
    """

    def __init__(self, in_dim: int, dim: int | None = None) -> None:
        super().__init__()
        dim = in_dim if dim is None else dim
        f64 = {"dtype": torch.float64}
        reduced = torch.eye(in_dim, dim, **f64) if dim != in_dim else torch.zeros(in_dim, 0, **f64)
        self.register_buffer("projection", reduced)
        self.register_buffer("mean", torch.zeros(dim, **f64))
        # set by set_fit: an unfitted scorer holds no D x D matrix (the fit's memory is its own)
        self.register_buffer("precision", torch.zeros(0, 0, **f64))
        self.register_buffer("basis", torch.zeros(dim, 0, **f64))
        self.register_buffer("basis_precision", torch.zeros(0, **f64))
        self.register_buffer("residual_precision", torch.zeros((), **f64))
        self.register_buffer("std", torch.ones(dim, **f64))
        self.register_buffer("shrinkage", torch.zeros((), **f64))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @property
    def dim(self) -> int:
        """The modelled (after a reduction: reduced) dimensionality."""
        return int(self.mean.shape[0])

    @property
    def in_dim(self) -> int:
        """The width of the feature vectors this level scores."""
        return int(self.projection.shape[0])

    @property
    def reduced(self) -> bool:
        return self.projection.shape[1] > 0

    def set_fit(self, fit: GaussianFit, projection: Tensor | None = None) -> None:
        """Store a fit (resizing the buffers if the reduced dimensionality changed)."""
        in_dim = self.projection.shape[0]
        device = self.mean.device
        identity = torch.zeros(in_dim, 0, dtype=torch.float64)
        self.projection = (identity if projection is None else projection.to(torch.float64)).to(device)
        self.mean = fit.mean.to(device)
        self.set_precision(fit.precision)
        self.std = fit.std.to(device)
        self.shrinkage = torch.tensor(fit.shrinkage, dtype=torch.float64, device=device)
        self.fitted = torch.ones((), dtype=torch.bool, device=device)

    def set_precision(self, precision: Tensor | LowRankPrecision) -> None:
        """Store the precision in its form (the other form's buffers become empty)."""
        f64 = {"dtype": torch.float64, "device": self.mean.device}
        if not isinstance(precision, LowRankPrecision):
            self.precision = precision.to(**f64)
            empty = torch.zeros(self.dim, 0, **f64)
            precision = LowRankPrecision(empty, empty[0], torch.zeros((), **f64))
        else:
            self.precision = torch.zeros(0, 0, **f64)
        self.basis = precision.basis.to(**f64)
        self.basis_precision = precision.basis_precision.to(**f64)
        self.residual_precision = precision.residual_precision.to(**f64)

    def set_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Become the fitted scorer of a file's tensors (shapes checked by :func:`precision_shapes`)."""
        self.mean, self.std, self.shrinkage = tensors["mean"], tensors["std"], tensors["shrinkage"]
        if "basis" in tensors:
            self.set_precision(LowRankPrecision(*(tensors[name] for name in LOW_RANK_BUFFERS)))
        else:
            self.set_precision(tensors["precision"])
        self.fitted = torch.ones((), dtype=torch.bool)

    def unused_buffers(self) -> tuple[str, ...]:
        """The buffers of the precision's form not in use (a file leaves them out)."""
        return LOW_RANK_BUFFERS if self.precision.numel() else ("precision",)

    @property
    def low_rank(self) -> LowRankPrecision | None:
        """The precision's low-rank form, or ``None`` where the precision is a ``D x D`` matrix."""
        if self.precision.numel():
            return None
        return LowRankPrecision(self.basis, self.basis_precision, self.residual_precision)

    def precision_matrix(self) -> Tensor:
        """The precision as a ``D x D`` matrix, built from its low-rank form where it has one (for checks
        and comparisons; scoring never builds it)."""
        low_rank = self.low_rank
        return self.precision if low_rank is None else low_rank.dense()

    def whiten(self, diff: Tensor) -> Tensor:
        """``diff @ P`` for rows ``diff`` (n, D) of differences to the mean."""
        low_rank = self.low_rank
        return diff @ self.precision if low_rank is None else low_rank.times(diff)

    def squared_mahalanobis(self, diff: Tensor) -> Tensor:
        """Eq. (2) squared, ``diff^T P diff``, for each row of ``diff`` (n, D) (clamped at 0)."""
        low_rank = self.low_rank
        squared = ((diff @ self.precision) * diff).sum(dim=1) if low_rank is None else low_rank.squared(diff)
        return torch.clamp(squared, min=0.0)

    def project(self, x: Tensor) -> Tensor:
        """Features in the modelled space (float64): projected after a reduction, else unchanged."""
        x = x.to(torch.float64)
        return x @ self.projection if self.reduced else x

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """``{"mahalanobis", "l2", "sed"}`` distances of the rows of ``x`` (n, D)."""
        z = self.project(x)
        return {
            "mahalanobis": torch.sqrt(self.squared_mahalanobis(z - self.mean)),
            "l2": l2_distance(z, self.mean),
            "sed": standardised_euclidean(z, self.mean, self.std),
        }
