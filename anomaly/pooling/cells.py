"""Cells pooling: one Gaussian per cell of a k x k grid and level; the cells' distances form a map."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from anomaly.pooling.base import KGrid, Pooling
from anomaly.stats.cells import CellGaussianScorer, CellMoments, cells_memory_bytes, fit_cells
from anomaly.stats.moments import Moments, RunningMoments


class Cells(KGrid, Pooling):
    """Each level's map pooled to ``k x k`` cells, every cell's C-dim feature with its own Gaussian.

    A level's image score is its largest cell distance; the per-cell distances
    (summed over levels by the detector) are a coarse ``k x k`` anomaly map.
    """

    name = "cells"
    makes_maps = True
    supports_reduction = False
    chi2_calibratable = False  # a max over cells is not chi-squared distributed

    @property
    def cells(self) -> int:
        return self.grid_size**2

    def arrange(self, grid: Tensor) -> Tensor:
        """A level's ``(B, C, k, k)`` pooled map as modelled: ``(B, k^2, C)``, cell ``i * k + j`` is
        row i, column j of the grid."""
        return grid.flatten(2).transpose(1, 2)

    def modelled_dim(self, channels: int) -> int:
        return channels

    def state_bytes(self, channels: Sequence[int], samples: int | None = None) -> int:
        """Per-cell moments and precisions, whatever the samples (the cells keep no rows)."""
        return sum(cells_memory_bytes(self.cells, c) for c in channels)

    def accumulator(self, dim: int) -> RunningMoments:
        return CellMoments(self.cells, dim)

    def moment_shapes(self, dim: int, kept_rows: int | None = None) -> dict[str, tuple[int, ...]]:
        """Every field with a leading cell axis (per-cell accumulators keep no rows)."""
        return {name: (self.cells, *shape) for name, shape in super().moment_shapes(dim).items()}

    def scorer(self, dim: int) -> CellGaussianScorer:
        return CellGaussianScorer(self.cells, dim)

    def fit(self, scorer: nn.Module, moments: Moments, projection: Tensor | None = None) -> None:
        if projection is not None:
            raise ValueError("pooling cells has no PCA/NPCA reduction")
        scorer.set_fit(fit_cells(moments))

    def expected_shapes(self, in_dim: int, tensors: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        k, c = self.cells, in_dim
        return {"mean": (k, c), "precision": (k, c, c), "std": (k, c), "shrinkage": (k,)}

    def scorer_from_tensors(self, tensors: dict[str, Tensor], in_dim: int) -> CellGaussianScorer:
        scorer = CellGaussianScorer(1, 1)
        for name in ("mean", "precision", "std", "shrinkage"):
            setattr(scorer, name, tensors[name])
        scorer.fitted = torch.ones((), dtype=torch.bool)
        return scorer

    def image_distances(self, distances: Tensor) -> Tensor:
        return distances.amax(dim=1)

    def to_map(self, distances: Tensor) -> Tensor:
        return distances.reshape(-1, self.grid_size, self.grid_size)


__all__ = ["Cells"]
