"""Grid pooling with maps: the grid's one joint Gaussian per level, and each cell's distance given the others.

Image scores are the ``grid`` pooling's exactly (one ``k^2 C`` Gaussian per level); the
anomaly map is each cell's Mahalanobis distance given all other cells
(:mod:`anomaly.stats.grid_cells`), summed over the levels. Unlike ``cells`` (one Gaussian
per cell), the cells are judged together, which keeps the grid's image AUROC.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from anomaly.pooling.base import FLOAT64_BYTES
from anomaly.pooling.grid import Grid
from anomaly.stats.gaussian import fit_gaussian
from anomaly.stats.grid_cells import GridCellScorer
from anomaly.stats.moments import Moments


class GridMaps(Grid):
    """``grid`` pooling whose levels also give a ``k x k`` map: each cell's distance given the others."""

    name = "grid_maps"
    makes_maps = True
    supports_reduction = False  # a projection mixes the cells

    def scorer(self, dim: int) -> GridCellScorer:
        return GridCellScorer(self.grid_size**2, dim)

    def state_bytes(self, channels: Sequence[int]) -> int:
        """The grid's state plus the cells' conditional covariances (``k^2 C^2`` float64 a level)."""
        return super().state_bytes(channels) + sum(
            FLOAT64_BYTES * self.grid_size**2 * c * c for c in channels
        )

    def fit(self, scorer: nn.Module, moments: Moments, projection: Tensor | None = None) -> None:
        if projection is not None:
            raise ValueError("pooling grid_maps has no PCA/NPCA reduction")
        scorer.set_fit(fit_gaussian(moments))

    def expected_shapes(self, in_dim: int, tensors: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        cells = self.grid_size**2
        channels = max(in_dim // cells, 1)
        return {
            "mean": (in_dim,),
            "precision": (in_dim, in_dim),
            "std": (in_dim,),
            "shrinkage": (),
            "cell_covariance": (cells, channels, channels),
        }

    def scorer_from_tensors(self, tensors: dict[str, Tensor], in_dim: int) -> GridCellScorer:
        cells = self.grid_size**2
        scorer = GridCellScorer(cells, cells)  # placeholders, replaced below
        for name in ("mean", "precision", "std", "shrinkage", "cell_covariance"):
            setattr(scorer, name, tensors[name].clone())
        scorer.projection = torch.zeros(in_dim, 0, dtype=torch.float64)
        scorer.fitted = torch.ones((), dtype=torch.bool)
        return scorer

    def image_distances(self, distances: Tensor) -> Tensor:
        return distances[:, 0]

    def to_map(self, distances: Tensor) -> Tensor:
        return distances[:, 1:].reshape(-1, self.grid_size, self.grid_size)


__all__ = ["GridMaps"]
