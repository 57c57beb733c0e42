"""Grid pooling: each level's map averaged to k x k cells, the k^2 C vector modelled by one Gaussian."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from anomaly.backbones import FeatureExtractor
from anomaly.pooling.base import check_grid_size
from anomaly.pooling.global_ import VectorPooling


class Grid(VectorPooling):
    """Adaptive average pooling to ``k x k`` cells; PCA/NPCA work as for global pooling."""

    name = "grid"

    def __init__(self, grid_size: int = 4) -> None:
        self.grid_size = check_grid_size(grid_size, self.name)

    def options(self) -> dict:
        return {"name": self.name, "grid_size": self.grid_size}

    def describe_size(self) -> str:
        return f" with grid_size {self.grid_size}"

    def pool(self, extractor: FeatureExtractor, images: Tensor, levels: Sequence[int]) -> list[Tensor]:
        return [self.arrange(grid) for grid in extractor(images, levels, grid=self.grid_size)]

    def arrange(self, grid: Tensor) -> Tensor:
        """A level's ``(B, C, k, k)`` pooled map as modelled: ``(B, k^2 C)``."""
        return grid.flatten(1)

    def modelled_dim(self, channels: int) -> int:
        return self.grid_size**2 * channels


__all__ = ["Grid"]
