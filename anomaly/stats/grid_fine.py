"""A level modelled twice: the grid's joint Gaussian, and one Gaussian per cell of a finer grid.

The joint Gaussian of a ``k x k`` grid (:mod:`anomaly.stats.grid_cells`) gives the level's
image score and a ``k x k`` map of conditional distances; it is ``k^2 C``-dimensional, so
``k`` stays small. A finer ``f x f`` grid of the same level's map, one ``C``-dim Ledoit-Wolf
Gaussian per cell (:mod:`anomaly.stats.cells`, PaDiM's per-position model), costs only
``f^2 C^2`` and sees defects the coarse cells average away. The rows of such a level are
the two poolings side by side, ``[k^2 C grid vector, f^2 C cells]``; both models stream
their own exact, mergeable moments, held together as :class:`GridFineMoments`.

A coarse level (pooled to a small ``c x c`` grid, often globally, for the image score only)
can have fine cells too: its rows are ``[c^2 C coarse vector, f^2 C cells]``, its joint
Gaussian gives no map of its own (:class:`CoarseFineScorer`), its fine cells do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from anomaly.stats.cells import CellFits, CellMoments, cell_distances
from anomaly.stats.gaussian import GaussianFit
from anomaly.stats.grid_cells import GridCellScorer
from anomaly.stats.moments import Moments, Rows, RunningMoments
from anomaly.stats.scorer import GaussianScorer

#: Rows whose fine cells are streamed at once (the per-cell moments' temporaries scale with it).
CHUNK_ROWS = 32
#: Bytes of the float64 ``(rows, f^2, C)`` features that scoring the fine cells makes at a time (at
#: least one row): its temporaries are two of them.
SCORE_CHUNK_BYTES = 2 * 2**20


@dataclass(frozen=True)
class GridFineMomentsValue:
    """The streamed moments of a grid-and-fine-cells level: the joint ones and the per-cell ones."""

    joint: Moments | Rows  # the joint accumulator's value (its rows while it keeps them)
    cells: Moments  # every field with a leading axis of f^2 cells


def split_rows(x: Tensor, joint_dim: int, fine_cells: int) -> tuple[Tensor, Tensor]:
    """Rows ``(n, k^2 C + f^2 C)`` -> the grid vectors ``(n, k^2 C)`` and the fine cells ``(n, f^2, C)``."""
    return x[:, :joint_dim], x[:, joint_dim:].reshape(x.shape[0], fine_cells, -1)


class GridFineMoments(nn.Module):
    """The accumulator of a grid-and-fine-cells level (``update``, ``merge_``, ``reset`` as
    :class:`~anomaly.stats.moments.RunningMoments`); buffers ``joint.*`` and ``cells.*``."""

    def __init__(self, cells: int, fine_cells: int, channels: int) -> None:
        super().__init__()
        self.joint = RunningMoments(cells * channels)
        self.cells = CellMoments(fine_cells, channels)

    @property
    def n(self) -> int:
        return self.joint.n

    def moments(self) -> GridFineMomentsValue:
        return GridFineMomentsValue(self.joint.moments(), self.cells.moments())

    def value(self) -> GridFineMomentsValue:
        """What was absorbed, each part in its accumulator's own form (see ``RunningMoments.value``)."""
        return GridFineMomentsValue(self.joint.value(), self.cells.moments())

    def reset(self) -> None:
        self.joint.reset()
        self.cells.reset()

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        """Add a batch of rows ``(n, k^2 C + f^2 C)``."""
        width = self.joint.dim + self.cells.cells * self.cells.dim
        if x.ndim != 2 or x.shape[1] != width:
            raise ValueError(f"expected features of shape (n, {width}), got {tuple(x.shape)}")
        joint, fine = split_rows(x, self.joint.dim, self.cells.cells)
        self.joint.update(joint)
        for rows in fine.split(CHUNK_ROWS):  # bounded float64 temporaries, whatever the batch
            self.cells.update(rows)

    @torch.no_grad()
    def merge_(self, other: GridFineMomentsValue) -> None:
        self.joint.merge_(other.joint)
        self.cells.merge_(other.cells)


class FineCellsScorer:
    """What a level's scorer adds for its fine cells (a mixin before the joint scorer's class): one
    Gaussian per fine cell (buffers ``fine_*``), whose distances follow the joint scorer's columns."""

    def add_fine_cells(self, fine_cells: int, channels: int) -> None:
        f64 = {"dtype": torch.float64}
        self.register_buffer("fine_mean", torch.zeros(fine_cells, channels, **f64))
        # set by set_fit: unfitted, the cells hold no C x C matrices (f^2 C^2 floats, e.g. 10 MB at 28x28)
        self.register_buffer("fine_precision", torch.zeros(fine_cells, 0, 0, **f64))
        self.register_buffer("fine_std", torch.ones(fine_cells, channels, **f64))
        self.register_buffer("fine_shrinkage", torch.zeros(fine_cells, **f64))

    @property
    def fine_cells(self) -> int:
        return int(self.fine_mean.shape[0])

    @property
    def in_dim(self) -> int:
        return int(self.projection.shape[0] + self.fine_mean.numel())

    def set_fit(self, fit: tuple[GaussianFit, CellFits], projection: Tensor | None = None) -> None:
        """Store the joint fit and the fine cells' fits (:func:`~anomaly.stats.cells.fit_cells`; their
        tensors, not copies, on the same device)."""
        joint, fine = fit
        super().set_fit(joint, projection)
        device = self.mean.device
        self.fine_mean, self.fine_precision = fine.mean.to(device), fine.precision.to(device)
        self.fine_std, self.fine_shrinkage = fine.std.to(device), fine.shrinkage.to(device)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        joint, fine = split_rows(x, int(self.projection.shape[0]), self.fine_cells)
        coarse = {kind: value.reshape(x.shape[0], -1) for kind, value in super().forward(joint).items()}
        # a few rows at a time: the per-cell float64 temporaries stay small whatever the batch
        # (a traced export scores its batch in one piece, so that the batch size can change)
        per_chunk = max(1, SCORE_CHUNK_BYTES // (self.fine_mean.numel() * self.fine_mean.element_size()))
        chunks = [fine] if torch.jit.is_tracing() else fine.split(per_chunk)
        parts = [cell_distances(rows, self.fine_mean, self.fine_precision, self.fine_std) for rows in chunks]
        cells = {kind: torch.cat([part[kind] for part in parts]) for kind in coarse}
        return {kind: torch.cat([coarse[kind], cells[kind]], dim=1) for kind in coarse}


def split_channels(cells: int, fine_cells: int, in_dim: int) -> int:
    """The channels of rows of ``cells`` joint and ``fine_cells`` fine cells, ``in_dim`` wide."""
    if fine_cells < 1 or in_dim % (cells + fine_cells):
        raise ValueError(f"a {in_dim}-dim row does not split into {cells} + {fine_cells} cells")
    return in_dim // (cells + fine_cells)


class GridFineScorer(FineCellsScorer, GridCellScorer):
    """Scores grid-and-fine-cells rows: ``{"mahalanobis", "l2", "sed"}``, each ``(n, 1 + k^2 + f^2)``.

    Column 0 is the joint distance of the grid vector, columns ``1 .. k^2`` each coarse cell's
    distance given the other cells (:class:`~anomaly.stats.grid_cells.GridCellScorer`), the
    last ``f^2`` each fine cell's distance to its own Gaussian.
    """

    def __init__(self, cells: int, fine_cells: int, in_dim: int) -> None:
        channels = split_channels(cells, fine_cells, in_dim)
        super().__init__(cells, cells * channels)
        self.add_fine_cells(fine_cells, channels)


class CoarseFineScorer(FineCellsScorer, GaussianScorer):
    """Scores the rows of a coarse level with fine cells: ``{"mahalanobis", "l2", "sed"}``, each
    ``(n, 1 + f^2)``: column 0 the joint distance of the coarse ``c^2 C`` grid vector (the
    ``grid`` pooling's score), the last ``f^2`` each fine cell's distance to its own Gaussian."""

    def __init__(self, cells: int, fine_cells: int, in_dim: int) -> None:
        channels = split_channels(cells, fine_cells, in_dim)
        super().__init__(cells * channels)
        self.add_fine_cells(fine_cells, channels)


__all__ = [
    "CoarseFineScorer",
    "FineCellsScorer",
    "GridFineMoments",
    "GridFineMomentsValue",
    "GridFineScorer",
    "split_rows",
]
