"""A fitted level as an ``nn.Module``: buffers that save, load, move and export."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from anomaly.stats.distances import l2_distance, mahalanobis, standardised_euclidean
from anomaly.stats.gaussian import GaussianFit


class GaussianScorer(nn.Module):
    """Scores feature vectors of one level by Mahalanobis (eq. 2), L2 and SED (eq. 9).

    ``projection`` (D, k) maps features to a reduced space first; without a
    reduction it is an empty (D, 0) tensor that stands for the identity (no
    D x D matrix is stored). The Gaussian's statistics live in that space.
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
        self.precision = fit.precision.to(device)
        self.std = fit.std.to(device)
        self.shrinkage = torch.tensor(fit.shrinkage, dtype=torch.float64, device=device)
        self.fitted = torch.ones((), dtype=torch.bool, device=device)

    def project(self, x: Tensor) -> Tensor:
        """Features in the modelled space (float64): projected after a reduction, else unchanged."""
        x = x.to(torch.float64)
        return x @ self.projection if self.reduced else x

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """``{"mahalanobis", "l2", "sed"}`` distances of the rows of ``x`` (n, D)."""
        z = self.project(x)
        return {
            "mahalanobis": mahalanobis(z, self.mean, self.precision),
            "l2": l2_distance(z, self.mean),
            "sed": standardised_euclidean(z, self.mean, self.std),
        }
