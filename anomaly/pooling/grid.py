"""Grid pooling: each level's map averaged to k x k cells, the k^2 C vector modelled by one Gaussian."""

from __future__ import annotations

from torch import Tensor

from anomaly.pooling.base import KGrid
from anomaly.pooling.global_ import VectorPooling


class Grid(KGrid, VectorPooling):
    """Adaptive average pooling to ``k x k`` cells; PCA/NPCA work as for global pooling."""

    name = "grid"

    def arrange(self, grid: Tensor) -> Tensor:
        """A level's ``(B, C, k, k)`` pooled map as modelled: ``(B, k^2 C)``."""
        return grid.flatten(1)

    def modelled_dim(self, channels: int) -> int:
        return self.grid_size**2 * channels


__all__ = ["Grid"]
