"""What every pooling strategy answers: how a level's feature map becomes the vectors a Gaussian models.

A pooling turns each level's ``(B, C, H, W)`` map into the rows the level's
Gaussian(s) model, says how wide they are and how much float64 state their fit
needs, builds the level's accumulator and scorer, and turns the scorer's
distances into the level's image score and, when it can, an anomaly map.
Adding a pooling is one new module with a :class:`Pooling` subclass, and its
name in :data:`anomaly.pooling.POOLINGS`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import ClassVar

from torch import Tensor, nn

from anomaly.backbones import FeatureExtractor
from anomaly.errors import UserError
from anomaly.stats.moments import Moments, RunningMoments

GIB = 1024**3
FLOAT64_BYTES = 8
MAX_GRID_SIZE = 64  # cells per side; beyond it every backbone level is smaller than its grid


def check_grid_size(grid_size: object, pooling: str) -> int:
    """``grid_size`` as a whole number of cells per side in ``1..MAX_GRID_SIZE``."""
    if isinstance(grid_size, bool) or not isinstance(grid_size, int) or not 1 <= grid_size <= MAX_GRID_SIZE:
        raise UserError(
            f"grid_size of pooling {pooling} must be a whole number of cells per side in "
            f"1..{MAX_GRID_SIZE}, got {grid_size!r}"
        )
    return grid_size


def check_memory_budget(budget_gb: object) -> float:
    """``memory_budget_gb`` as a finite positive number of GiB."""
    if isinstance(budget_gb, bool) or not isinstance(budget_gb, (int, float)) or not math.isfinite(budget_gb):
        raise UserError(f"memory_budget_gb must be a finite positive number of GiB, got {budget_gb!r}")
    if budget_gb <= 0:
        raise UserError(f"memory_budget_gb must be a finite positive number of GiB, got {budget_gb!r}")
    return float(budget_gb)


class Pooling(ABC):
    """A level's feature map -> the vectors its Gaussian(s) model -> image score (and map)."""

    #: The name used in configs (``pooling: grid``) and in the detector file.
    name: ClassVar[str]
    #: Whether :meth:`to_map` gives a spatial anomaly map.
    makes_maps: ClassVar[bool] = False
    #: Whether PCA/NPCA (Table III) can project the modelled vectors.
    supports_reduction: ClassVar[bool] = True
    #: Whether a level's Mahalanobis score is chi-squared distributed (eq. 8).
    chi2_calibratable: ClassVar[bool] = True

    def options(self) -> dict:
        """The constructor's arguments, as saved in the detector file (``name`` included): immutable
        values, checked once by the constructor (sequences as tuples, which the file's JSON stores as
        lists and the constructor turns back), so that equal poolings compare and hash equal."""
        return {"name": self.name}

    def for_level(self, level: int) -> Pooling:
        """The pooling that models backbone level ``level`` (itself, unless levels are pooled differently)."""
        return self

    def level_makes_maps(self, level: int) -> bool:
        """Whether level ``level``'s distances add to the anomaly map."""
        return self.for_level(level).makes_maps

    # ---------------------------------------------------------------- features
    @abstractmethod
    def pool(self, extractor: FeatureExtractor, images: Tensor, levels: Sequence[int]) -> list[Tensor]:
        """The modelled rows of each level for a batch of images."""

    @abstractmethod
    def modelled_dim(self, channels: int) -> int:
        """The width of the vectors a level of ``channels`` channels gives."""

    @abstractmethod
    def state_bytes(self, channels: Sequence[int], samples: int | None = None) -> int:
        """Float64 bytes of the streamed second moments and the precisions of levels of these widths;
        with ``samples``, the rows a fit of that many keeps instead where they take less (a level of
        ``D`` dimensions that sees ``n <= D`` rows keeps them and an ``n``-column basis: ``2 n D``)."""

    def levels_state_bytes(
        self, channels: Sequence[int], levels: Sequence[int] | None = None, samples: int | None = None
    ) -> int:
        """:meth:`state_bytes` of levels of these widths, each pooled as :meth:`for_level` says."""
        if levels is None:
            return self.state_bytes(channels, samples)
        return sum(
            self.for_level(lv).state_bytes([c], samples) for lv, c in zip(levels, channels, strict=True)
        )

    def check_budget(
        self,
        channels: Sequence[int],
        budget_gb: float,
        levels: Sequence[int] | None = None,
        samples: int | None = None,
    ) -> None:
        """:class:`UserError` naming the need and the fix when the fit would exceed ``budget_gb`` (of
        ``samples`` rows, or of any number of them)."""
        budget_gb = check_memory_budget(budget_gb)
        need = self.levels_state_bytes(channels, levels, samples) / GIB
        if need > budget_gb:
            rows = f" and {samples:,} training samples" if samples is not None else ""
            raise UserError(
                f"pooling {self.name}{self.describe_size()} needs {need:.3g} GiB of statistics for "
                f"levels of widths {list(channels)}{rows}, over memory_budget_gb {budget_gb:g}: lower "
                "grid_size, choose fewer or narrower levels, or raise memory_budget_gb"
            )

    def describe_size(self) -> str:
        return ""

    # ---------------------------------------------------------------- the fit
    @abstractmethod
    def accumulator(self, dim: int) -> RunningMoments:
        """An empty streamed accumulator for one level of modelled width ``dim``."""

    def moment_shapes(self, dim: int, kept_rows: int | None = None) -> dict[str, tuple[int, ...]]:
        """The shape of each field of a level's streamed moments (:meth:`accumulator`'s buffers, as a
        file holds them): ``kept_rows`` rows instead of ``outer`` while the accumulator keeps them."""
        second = {"outer": (dim, dim)} if kept_rows is None else {"rows": (kept_rows, dim)}
        return {"count": (), "shift": (dim,), "sum": (dim,), **second, "sqnorm_vec": (dim,), "quartic": ()}

    @abstractmethod
    def scorer(self, dim: int) -> nn.Module:
        """An unfitted scorer for one level (``forward(rows) -> {kind: distances}``)."""

    @abstractmethod
    def fit(self, scorer: nn.Module, moments: Moments, projection: Tensor | None = None) -> None:
        """Fit ``scorer`` from a level's streamed moments (in the projected space, if given)."""

    @abstractmethod
    def scorer_from_tensors(self, tensors: dict[str, Tensor], in_dim: int) -> nn.Module:
        """A fitted scorer from the saved tensors (shapes already checked by :meth:`expected_shapes`)."""

    @abstractmethod
    def expected_shapes(self, in_dim: int, tensors: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        """The shape each saved tensor of a level must have, given the shapes found (``tensors``)."""

    # ---------------------------------------------------------------- scoring
    def image_distances(self, distances: Tensor) -> Tensor:
        """A level's image score from the scorer's distances of one kind (``(B,)`` here)."""
        return distances

    def to_map(self, distances: Tensor) -> Tensor:
        """An anomaly map ``(B, h, w)`` from the scorer's distances of one kind (map-capable poolings)."""
        raise UserError(f"pooling {self.name} gives no anomaly maps: use pooling cells or grid_maps")

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.options().items() if k != "name")
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        """Poolings are values: equal when of one kind with equal options (``sklearn.base.clone`` copies)."""
        return type(self) is type(other) and self.options() == other.options()

    def __hash__(self) -> int:
        return hash((type(self), tuple(sorted(self.options().items()))))


class KGrid:
    """What the poolings over a ``k x k`` grid share: the option, its description and the pooling
    itself (adaptive average pooling of each level's map); ``arrange`` says how it is modelled."""

    name: str

    def __init__(self, grid_size: int = 4) -> None:
        self.grid_size = check_grid_size(grid_size, self.name)

    def options(self) -> dict:
        return {"name": self.name, "grid_size": self.grid_size}

    def describe_size(self) -> str:
        return f" with grid_size {self.grid_size}"

    def pool(self, extractor: FeatureExtractor, images: Tensor, levels: Sequence[int]) -> list[Tensor]:
        return [self.arrange(grid) for grid in extractor(images, levels, grid=self.grid_size)]

    def arrange(self, grid: Tensor) -> Tensor:
        raise NotImplementedError

    def rows_from(self, grid_of: Callable[[int], Tensor]) -> Tensor:
        """A level's modelled rows, given ``grid_of(k)``: its map average-pooled to ``(B, C, k, k)``."""
        return self.arrange(grid_of(self.grid_size))


__all__ = ["GIB", "MAX_GRID_SIZE", "KGrid", "Pooling", "check_grid_size", "check_memory_budget"]
