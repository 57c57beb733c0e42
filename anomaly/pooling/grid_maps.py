"""Grid pooling with maps: the grid's one joint Gaussian per level, and each cell's distance given the others.

Image scores are the ``grid`` pooling's exactly (one ``k^2 C`` Gaussian per level); the
anomaly map is each cell's Mahalanobis distance given all other cells
(:mod:`anomaly.stats.grid_cells`), summed over the levels. Unlike ``cells`` (one Gaussian
per cell), the cells are judged together, which keeps the grid's image AUROC.

``coarse_levels`` are pooled to a coarser ``coarse_grid_size`` grid instead (1: globally, as
in the paper) and modelled as by ``grid``: their joint distances add to the image score, not
to the map. Deep levels see the whole part; at the map's grid their ``k^2 C`` Gaussians would
be large, on a coarse grid they are small.

``fine_levels`` are modelled twice: as above (on the map's grid, or on the coarse grid for a
coarse level), and by one Gaussian per cell of a finer ``fine_grid_size`` grid
(:mod:`anomaly.stats.grid_fine`, ``f^2 C^2`` floats a level; one size for all fine levels, or
one per fine level). Their fine cells' distances, times ``fine_weight``, add to the map, which is
then as fine as the finest of them (coarser maps bilinearly upsampled to it); the image score is
unchanged. A coarse level with fine cells thus adds to the map too, through its fine cells only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from anomaly.backbones import FeatureExtractor
from anomaly.backbones.extractor import grid_means
from anomaly.errors import UserError
from anomaly.pooling.base import FLOAT64_BYTES, Pooling, check_grid_size
from anomaly.pooling.grid import Grid
from anomaly.stats.cells import cells_memory_bytes, fit_cells
from anomaly.stats.grid_cells import GridCellScorer
from anomaly.stats.grid_fine import (
    CoarseFineScorer,
    FineCellsScorer,
    GridFineMoments,
    GridFineMomentsValue,
    GridFineScorer,
)
from anomaly.stats.low_rank import fit_streamed
from anomaly.stats.moments import Moments, Rows
from anomaly.stats.scorer import precision_shapes


def check_coarse_levels(levels: object, option: str = "coarse_levels") -> tuple[int, ...]:
    """``coarse_levels`` (or another ``option``) as increasing distinct level numbers (1-based)."""
    if levels is None:
        return ()
    if isinstance(levels, (str, bytes)) or not isinstance(levels, Sequence):
        raise UserError(f"{option} must be a list of level numbers, got {levels!r}")
    if any(isinstance(lv, bool) or not isinstance(lv, int) or lv < 1 for lv in levels):
        raise UserError(f"{option} must be level numbers 1, 2, ..., got {list(levels)!r}")
    if list(levels) != sorted(set(levels)):
        raise UserError(f"{option} must be increasing and distinct, got {list(levels)!r}")
    return tuple(levels)


def check_fine_weight(weight: object) -> float:
    """``fine_weight`` as a finite positive number."""
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < math.inf:
        raise UserError(f"fine_weight must be a finite positive number, got {weight!r}")
    return float(weight)


def check_fine_grid_sizes(fine_levels: Sequence[int], fine_grid_size: object) -> int | tuple[int, ...]:
    """``fine_grid_size`` checked: one size for all fine levels (an int), or a tuple of one per fine level
    (without fine levels, e.g. ``fine_levels: []`` over a config that had some, any sizes are left)."""
    listed = isinstance(fine_grid_size, Sequence) and not isinstance(fine_grid_size, (str, bytes))
    sizes = tuple(
        check_grid_size(size, GridMaps.name) for size in (fine_grid_size if listed else [fine_grid_size])
    )
    if listed and fine_levels and len(sizes) != len(fine_levels):
        raise UserError(
            f"fine_grid_size lists {len(sizes)} sizes for the {len(fine_levels)} fine_levels "
            f"{list(fine_levels)}: give one size for all, or one per fine level"
        )
    return sizes if listed else sizes[0]


def sizes_per_level(fine_levels: Sequence[int], fine_grid_size: int | tuple[int, ...]) -> dict[int, int]:
    """Each fine level's cells per side, from a checked ``fine_grid_size``."""
    if isinstance(fine_grid_size, int):
        return dict.fromkeys(fine_levels, fine_grid_size)
    return dict(zip(fine_levels, fine_grid_size, strict=bool(fine_levels)))


def fine_levels_among(
    levels: Sequence[int], fine_levels: object, fine_grid_size: object
) -> tuple[tuple[int, ...], int | tuple[int, ...]]:
    """``fine_levels`` and ``fine_grid_size`` (checked) for those fine levels that are among ``levels``
    (a list of sizes keeps the kept levels' sizes), so that ``levels`` can be changed alone."""
    fine_levels = check_coarse_levels(fine_levels, "fine_levels")
    fine_grid_size = check_fine_grid_sizes(fine_levels, fine_grid_size)
    if isinstance(fine_grid_size, int):
        return tuple(lv for lv in fine_levels if lv in levels), fine_grid_size
    kept = {lv: size for lv, size in sizes_per_level(fine_levels, fine_grid_size).items() if lv in levels}
    return tuple(kept), tuple(kept.values())


def bilinear_matrix(size: int, source: int) -> Tensor:
    """``(size, source)`` float64: 1-D bilinear resampling as ``F.interpolate`` does it with
    ``align_corners=False`` (source position ``(i + 0.5) source / size - 0.5``, clamped at 0)."""
    matrix = torch.zeros(size, source, dtype=torch.float64)
    for i in range(size):
        position = max((i + 0.5) * source / size - 0.5, 0.0)
        low = min(int(position), source - 1)
        high = min(low + 1, source - 1)
        weight = position - low
        matrix[i, low] += 1.0 - weight
        matrix[i, high] += weight
    return matrix


def resize_maps(maps: Tensor, size: int) -> Tensor:
    """``(B, h, w)`` maps bilinearly resized to ``(B, size, size)`` (``F.interpolate``'s ``bilinear``,
    written as two constant matrix products so that it exports in float64; unchanged when already
    that size)."""
    height, width = int(maps.shape[-2]), int(maps.shape[-1])
    if (height, width) == (size, size):
        return maps
    rows = bilinear_matrix(size, height).to(maps)
    cols = bilinear_matrix(size, width).to(maps)
    return rows @ maps @ cols.T


class GridMaps(Grid):
    """``grid`` pooling whose levels also give a ``k x k`` map: each cell's distance given the others.

    Args:
        grid_size: k, the map's cells per side.
        coarse_levels: levels pooled to ``coarse_grid_size`` cells per side instead, for the
            image score only (their joint distance under one Gaussian, as ``grid``).
        coarse_grid_size: the coarse levels' cells per side (1: global average pooling).
        fine_levels: levels (map or coarse levels) also modelled by one Gaussian per cell of a
            ``fine_grid_size`` grid, whose distances add to the map.
        fine_grid_size: f, the fine cells per side: one for all fine levels, or a list of one per
            fine level (the map is then as fine as the finest).
        fine_weight: the fine cells' distances' weight in the map.

    Level lists (and a list of fine grid sizes) are held as tuples, whatever sequence was given.
    """

    name = "grid_maps"
    makes_maps = True
    supports_reduction = False  # a projection mixes the cells

    def __init__(
        self,
        grid_size: int = 4,
        coarse_levels: Sequence[int] = (),
        coarse_grid_size: int = 1,
        fine_levels: Sequence[int] = (),
        fine_grid_size: int | Sequence[int] = 28,
        fine_weight: float = 1.0,
    ) -> None:
        super().__init__(grid_size)
        self.coarse_levels = check_coarse_levels(coarse_levels)
        self.coarse_grid_size = check_grid_size(coarse_grid_size, self.name)
        self.coarse = Grid(self.coarse_grid_size)
        self.fine_levels = check_coarse_levels(fine_levels, "fine_levels")
        sizes = check_fine_grid_sizes(self.fine_levels, fine_grid_size)
        #: Each fine level's cells per side.
        self.fine_grid_sizes = sizes_per_level(self.fine_levels, sizes)
        shared = set(self.fine_grid_sizes.values())
        #: ``fine_grid_size`` as saved: one size (an int) where all fine levels share it, else a tuple of
        #: one per fine level.
        self.fine_grid_size = shared.pop() if len(shared) == 1 else sizes
        self.fine_weight = check_fine_weight(fine_weight)
        #: The map's cells per side: the finest fine grid's, where there are fine levels.
        self.map_size = max([self.grid_size, *self.fine_grid_sizes.values()])

    def options(self) -> dict:
        options = super().options()
        if self.coarse_levels:  # files without coarse levels keep their options as they were
            options.update(coarse_levels=self.coarse_levels, coarse_grid_size=self.coarse_grid_size)
        if self.fine_levels:  # likewise without fine levels
            options.update(
                fine_levels=self.fine_levels,
                fine_grid_size=self.fine_grid_size,
                fine_weight=self.fine_weight,
            )
        return options

    def describe_size(self) -> str:
        coarse = self.coarse_levels and f" (levels {list(self.coarse_levels)}: {self.coarse_grid_size})"
        sizes = self.fine_grid_size if isinstance(self.fine_grid_size, int) else list(self.fine_grid_size)
        fine = self.fine_levels and f" (fine cells of levels {list(self.fine_levels)}: {sizes})"
        return super().describe_size() + (coarse or "") + (fine or "")

    def for_level(self, level: int) -> Pooling:
        coarse = level in self.coarse_levels
        if level not in self.fine_levels:
            return self.coarse if coarse else self
        joint = self.coarse if coarse else GridMaps(self.grid_size)  # the map level's k x k maps
        return GridFineCells(joint, self.fine_grid_sizes[level], self.fine_weight, self.map_size)

    def pool(self, extractor: FeatureExtractor, images: Tensor, levels: Sequence[int]) -> list[Tensor]:
        """One backbone pass; each level pooled to its own grid(s)."""

        def rows(maps: list[Tensor]) -> list[Tensor]:
            return [
                self.for_level(level).rows_from(lambda k, fmap=fmap: grid_means(fmap.float(), k))
                for level, fmap in zip(levels, maps, strict=True)
            ]

        return extractor.feature_maps(images, levels, rows)

    def scorer(self, dim: int) -> GridCellScorer:
        return GridCellScorer(self.grid_size**2, dim)

    def state_bytes(self, channels: Sequence[int], samples: int | None = None) -> int:
        """The grid's state plus the cells' conditional covariances (``k^2 C^2`` float64 a level)."""
        return super().state_bytes(channels, samples) + sum(
            FLOAT64_BYTES * self.grid_size**2 * c * c for c in channels
        )

    def fit(self, scorer: nn.Module, moments: Moments | Rows, projection: Tensor | None = None) -> None:
        if projection is not None:
            raise ValueError("pooling grid_maps has no PCA/NPCA reduction")
        scorer.set_fit(fit_streamed(moments))

    def expected_shapes(self, in_dim: int, tensors: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        cells = self.grid_size**2
        channels = max(in_dim // cells, 1)
        return {**precision_shapes(in_dim, tensors), "cell_covariance": (cells, channels, channels)}

    def scorer_from_tensors(self, tensors: dict[str, Tensor], in_dim: int) -> GridCellScorer:
        cells = self.grid_size**2
        scorer = GridCellScorer(cells, cells)  # placeholders, replaced below
        scorer.projection = torch.zeros(in_dim, 0, dtype=torch.float64)
        scorer.set_tensors(tensors)
        scorer.cell_covariance = tensors["cell_covariance"]
        return scorer

    def image_distances(self, distances: Tensor) -> Tensor:
        return distances[:, 0]

    def to_map(self, distances: Tensor) -> Tensor:
        """The coarse cells' distances as a ``(B, k, k)`` map, resized to the map's size."""
        cells = distances[:, 1 : 1 + self.grid_size**2]
        return resize_maps(cells.reshape(-1, self.grid_size, self.grid_size), self.map_size)


class GridFineCells(Pooling):
    """How :class:`GridMaps` models one of its ``fine_levels``: its ``joint`` pooling (the map's
    ``k x k`` grid with conditional cell maps, or a coarse level's ``c x c`` grid) and one Gaussian
    per cell of an ``f x f`` grid (rows ``[joint vector, f^2 C fine cells]``)."""

    name = "grid_maps"
    makes_maps = True
    supports_reduction = False

    def __init__(self, joint: Grid, fine_grid_size: int, fine_weight: float, map_size: int) -> None:
        self.joint, self.fine_grid_size, self.fine_weight = joint, fine_grid_size, fine_weight
        self.map_size = map_size
        self.grid_size = joint.grid_size

    def options(self) -> dict:
        return {
            "name": self.name,
            "joint": self.joint,
            "fine_grid_size": self.fine_grid_size,
            "fine_weight": self.fine_weight,
            "map_size": self.map_size,
        }

    @property
    def joint_cells(self) -> int:
        return self.grid_size**2

    @property
    def fine_cells(self) -> int:
        return self.fine_grid_size**2

    @property
    def joint_map_columns(self) -> int:
        """The joint scorer's map columns after its column 0 (none for a coarse level)."""
        return self.joint_cells if self.joint.makes_maps else 0

    def pool(self, extractor: FeatureExtractor, images: Tensor, levels: Sequence[int]) -> list[Tensor]:
        def rows(maps: list[Tensor]) -> list[Tensor]:
            return [self.rows_from(lambda k, fmap=fmap: grid_means(fmap.float(), k)) for fmap in maps]

        return extractor.feature_maps(images, levels, rows)

    def rows_from(self, grid_of: Callable[[int], Tensor]) -> Tensor:
        fine = grid_of(self.fine_grid_size).flatten(2).transpose(1, 2).flatten(1)  # cell-major, as Cells
        return torch.cat([self.joint.rows_from(grid_of), fine], dim=1)

    def modelled_dim(self, channels: int) -> int:
        return (self.joint_cells + self.fine_cells) * channels

    def channels(self, dim: int) -> int:
        return max(dim // (self.joint_cells + self.fine_cells), 1)

    def state_bytes(self, channels: Sequence[int], samples: int | None = None) -> int:
        return self.joint.state_bytes(channels, samples) + sum(
            cells_memory_bytes(self.fine_cells, c) for c in channels
        )

    def accumulator(self, dim: int) -> GridFineMoments:
        return GridFineMoments(self.joint_cells, self.fine_cells, self.channels(dim))

    def moment_shapes(self, dim: int, kept_rows: int | None = None) -> dict[str, tuple[int, ...]]:
        channels = self.channels(dim)
        joint = self.joint.moment_shapes(self.joint_cells * channels, kept_rows)  # the cells keep no rows
        cells = super().moment_shapes(channels)
        return {
            **{f"joint.{name}": shape for name, shape in joint.items()},
            **{f"cells.{name}": (self.fine_cells, *shape) for name, shape in cells.items()},
        }

    def scorer(self, dim: int) -> FineCellsScorer:
        kind = GridFineScorer if self.joint.makes_maps else CoarseFineScorer
        return kind(self.joint_cells, self.fine_cells, dim)

    def fit(self, scorer: nn.Module, moments: GridFineMomentsValue, projection: Tensor | None = None) -> None:
        if projection is not None:
            raise ValueError("pooling grid_maps has no PCA/NPCA reduction")
        scorer.set_fit((fit_streamed(moments.joint), fit_cells(moments.cells)))

    def expected_shapes(self, in_dim: int, tensors: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        channels, cells = self.channels(in_dim), self.fine_cells
        return {
            **self.joint.expected_shapes(self.joint_cells * channels, tensors),
            "fine_mean": (cells, channels),
            "fine_precision": (cells, channels, channels),
            "fine_std": (cells, channels),
            "fine_shrinkage": (cells,),
        }

    def scorer_from_tensors(
        self, tensors: dict[str, Tensor], in_dim: int
    ) -> GridFineScorer | CoarseFineScorer:
        joint = self.joint.scorer_from_tensors(tensors, self.joint_cells * self.channels(in_dim))
        scorer = self.scorer(self.joint_cells + self.fine_cells)  # placeholders, replaced below
        for name, value in joint.named_buffers():
            setattr(scorer, name, value)
        for name in ("fine_mean", "fine_precision", "fine_std", "fine_shrinkage"):
            setattr(scorer, name, tensors[name])
        return scorer

    def image_distances(self, distances: Tensor) -> Tensor:
        return distances[:, 0]

    def to_map(self, distances: Tensor) -> Tensor:
        """``fine_weight`` times the fine cells' distances, plus the joint cells' map (a map level's)."""
        fine_columns = distances[:, 1 + self.joint_map_columns :]
        fine = resize_maps(fine_columns.reshape(-1, self.fine_grid_size, self.fine_grid_size), self.map_size)
        if not self.joint.makes_maps:
            return self.fine_weight * fine
        joint = self.joint.to_map(distances[:, : 1 + self.joint_map_columns])
        return resize_maps(joint, self.map_size) + self.fine_weight * fine


#: The recommended detector (configs/recommended.yaml): levels 3-5 on a 7x7 grid with maps, levels
#: 6-9 pooled globally for the image score; level 4 also as 28x28 cells and level 6 as 14x14 cells,
#: at half weight in the map.
RECOMMENDED_LEVELS = (3, 4, 5, 6, 7, 8, 9)
RECOMMENDED_GRID_SIZE = 7
RECOMMENDED_COARSE_LEVELS = (6, 7, 8, 9)
RECOMMENDED_FINE_LEVELS = (4, 6)
RECOMMENDED_FINE_GRID_SIZE = (28, 14)
RECOMMENDED_FINE_WEIGHT = 0.5


def recommended_pooling(levels: Sequence[int] = RECOMMENDED_LEVELS) -> GridMaps:
    """The recommended detector's pooling for ``levels`` (the coarse ones among them stay coarse, the
    fine ones keep their fine cells)."""
    fine_levels, fine_grid_size = fine_levels_among(
        levels, RECOMMENDED_FINE_LEVELS, RECOMMENDED_FINE_GRID_SIZE
    )
    return GridMaps(
        RECOMMENDED_GRID_SIZE,
        coarse_levels=[lv for lv in RECOMMENDED_COARSE_LEVELS if lv in levels],
        coarse_grid_size=1,
        fine_levels=fine_levels,
        fine_grid_size=fine_grid_size,
        fine_weight=RECOMMENDED_FINE_WEIGHT,
    )


__all__ = [
    "RECOMMENDED_LEVELS",
    "GridFineCells",
    "GridMaps",
    "check_coarse_levels",
    "check_fine_grid_sizes",
    "fine_levels_among",
    "recommended_pooling",
    "resize_maps",
]
