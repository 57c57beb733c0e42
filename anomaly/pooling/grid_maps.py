"""Grid pooling with maps: the grid's one joint Gaussian per level, and each cell's distance given the others.

Image scores are the ``grid`` pooling's exactly (one ``k^2 C`` Gaussian per level); the
anomaly map is each cell's Mahalanobis distance given all other cells
(:mod:`anomaly.stats.grid_cells`), summed over the levels. Unlike ``cells`` (one Gaussian
per cell), the cells are judged together, which keeps the grid's image AUROC.

``coarse_levels`` are pooled to a coarser ``coarse_grid_size`` grid instead (1: globally, as
in the paper) and modelled as by ``grid``: their joint distances add to the image score, not
to the map. Deep levels see the whole part; at the map's grid their ``k^2 C`` Gaussians would
be large, on a coarse grid they are small.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from anomaly.backbones import FeatureExtractor
from anomaly.backbones.extractor import grid_means
from anomaly.errors import UserError
from anomaly.pooling.base import FLOAT64_BYTES, check_grid_size
from anomaly.pooling.grid import Grid
from anomaly.stats.gaussian import fit_gaussian
from anomaly.stats.grid_cells import GridCellScorer
from anomaly.stats.moments import Moments


def check_coarse_levels(levels: object) -> tuple[int, ...]:
    """``coarse_levels`` as increasing distinct level numbers (1-based)."""
    if levels is None:
        return ()
    if isinstance(levels, (str, bytes)) or not isinstance(levels, Sequence):
        raise UserError(f"coarse_levels must be a list of level numbers, got {levels!r}")
    if any(isinstance(lv, bool) or not isinstance(lv, int) or lv < 1 for lv in levels):
        raise UserError(f"coarse_levels must be level numbers 1, 2, ..., got {list(levels)!r}")
    if list(levels) != sorted(set(levels)):
        raise UserError(f"coarse_levels must be increasing and distinct, got {list(levels)!r}")
    return tuple(levels)


class GridMaps(Grid):
    """``grid`` pooling whose levels also give a ``k x k`` map: each cell's distance given the others.

    Args:
        grid_size: k, the map's cells per side.
        coarse_levels: levels pooled to ``coarse_grid_size`` cells per side instead, for the
            image score only (their joint distance under one Gaussian, as ``grid``).
        coarse_grid_size: the coarse levels' cells per side (1: global average pooling).
    """

    name = "grid_maps"
    makes_maps = True
    supports_reduction = False  # a projection mixes the cells

    def __init__(
        self, grid_size: int = 4, coarse_levels: Sequence[int] = (), coarse_grid_size: int = 1
    ) -> None:
        super().__init__(grid_size)
        self.coarse_levels = check_coarse_levels(coarse_levels)
        self.coarse_grid_size = check_grid_size(coarse_grid_size, self.name)
        self.coarse = Grid(self.coarse_grid_size)

    def options(self) -> dict:
        options = super().options()
        if self.coarse_levels:  # files without coarse levels keep their options as they were
            options.update(coarse_levels=list(self.coarse_levels), coarse_grid_size=self.coarse_grid_size)
        return options

    def describe_size(self) -> str:
        coarse = self.coarse_levels and f" (levels {list(self.coarse_levels)}: {self.coarse_grid_size})"
        return super().describe_size() + (coarse or "")

    def for_level(self, level: int) -> Grid:
        return self.coarse if level in self.coarse_levels else self

    def pool(self, extractor: FeatureExtractor, images: Tensor, levels: Sequence[int]) -> list[Tensor]:
        """One backbone pass; each level pooled to its own grid."""
        maps = extractor.feature_maps(images, levels)
        return [
            self.for_level(level).arrange(grid_means(fmap.float(), self.for_level(level).grid_size))
            for level, fmap in zip(levels, maps, strict=True)
        ]

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


#: The recommended detector (configs/recommended.yaml): levels 3-5 on a 7x7 grid with maps,
#: levels 6-9 pooled globally for the image score.
RECOMMENDED_LEVELS = (3, 4, 5, 6, 7, 8, 9)
RECOMMENDED_GRID_SIZE = 7
RECOMMENDED_COARSE_LEVELS = (6, 7, 8, 9)


def recommended_pooling(levels: Sequence[int] = RECOMMENDED_LEVELS) -> GridMaps:
    """The recommended detector's pooling for ``levels`` (the coarse ones among them stay coarse)."""
    coarse = [lv for lv in RECOMMENDED_COARSE_LEVELS if lv in levels]
    return GridMaps(RECOMMENDED_GRID_SIZE, coarse_levels=coarse, coarse_grid_size=1)


__all__ = ["RECOMMENDED_LEVELS", "GridMaps", "check_coarse_levels", "recommended_pooling"]
