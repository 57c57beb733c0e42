"""Grid pooling with maps: the grid's one joint Gaussian per level, each cell's share of it a map.

Image scores are the ``grid`` pooling's exactly (one ``k^2 C`` Gaussian per level); the
anomaly map is each cell's share of the squared distance (:mod:`anomaly.stats.contributions`),
summed over the levels. Unlike ``cells`` (one Gaussian per cell), every cell is judged
together with all others, which keeps the grid's image AUROC.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from anomaly.pooling.grid import Grid
from anomaly.stats.contributions import CellShareScorer, joint_distance
from anomaly.stats.gaussian import fit_gaussian
from anomaly.stats.moments import Moments


class GridMaps(Grid):
    """``grid`` pooling whose levels also give a ``k x k`` map: each cell's share of the squared distance."""

    name = "grid_maps"
    makes_maps = True
    supports_reduction = False  # a projection mixes the cells

    def scorer(self, dim: int) -> CellShareScorer:
        return CellShareScorer(self.grid_size**2, dim)

    def fit(self, scorer: nn.Module, moments: Moments, projection: Tensor | None = None) -> None:
        if projection is not None:
            raise ValueError("pooling grid_maps has no PCA/NPCA reduction")
        scorer.set_fit(fit_gaussian(moments))

    def expected_shapes(self, in_dim: int, tensors: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        return {"mean": (in_dim,), "precision": (in_dim, in_dim), "std": (in_dim,), "shrinkage": ()}

    def scorer_from_tensors(self, tensors: dict[str, Tensor], in_dim: int) -> CellShareScorer:
        scorer = CellShareScorer(self.grid_size**2, self.grid_size**2)  # placeholders, replaced below
        for name in ("mean", "precision", "std", "shrinkage"):
            setattr(scorer, name, tensors[name].clone())
        scorer.projection = torch.zeros(in_dim, 0, dtype=torch.float64)
        scorer.fitted = torch.ones((), dtype=torch.bool)
        return scorer

    def image_distances(self, distances: Tensor) -> Tensor:
        return joint_distance(distances)

    def to_map(self, distances: Tensor) -> Tensor:
        return distances.reshape(-1, self.grid_size, self.grid_size)


__all__ = ["GridMaps"]
