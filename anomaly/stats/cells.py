"""A grid of Gaussians, one per spatial cell, streamed and scored in one batched pass.

The ``cells`` pooling of :mod:`anomaly.methods.spatial` pools each level's
feature map to ``k x k`` cells and models every cell's ``C``-dim feature with
its own Ledoit-Wolf Gaussian (eqs. 2 and 6 of the paper, applied per cell).
Nothing here is new maths: the single-Gaussian pieces of
:mod:`anomaly.stats.moments`, :mod:`anomaly.stats.gaussian` and
:mod:`anomaly.stats.distances` are batched over the cell axis (batched matrix
products, one batched Cholesky, :func:`torch.vmap` for merges and distances), so
one batch of ``(n, K, C)`` features updates all ``K = k^2`` accumulators at once.
Memory is ``K * C^2`` float64 per level.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from anomaly.stats.gaussian import (
    INVERSE_CHUNK_BYTES,
    GaussianFit,
    batched_inverse_,
    check_samples,
    fit_gaussian,
    ledoit_wolf_shrinkages,
    total_is_rounding,
)
from anomaly.stats.moments import Moments, RunningMoments, merge_moments

FLOAT64_BYTES = 8


def _fields(m: Moments) -> tuple[Tensor, ...]:
    return tuple(getattr(m, name) for name in RunningMoments.FIELDS)


def _merge_fields(a: tuple[Tensor, ...], b: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return _fields(merge_moments(Moments(*a), Moments(*b)))


#: Merge of two per-cell :class:`Moments` (all fields with a leading K axis).
_cell_merge = torch.vmap(_merge_fields)


def merge_cell_moments(a: Moments, b: Moments) -> Moments:
    """:func:`~anomaly.stats.moments.merge_moments` for every cell at once."""
    return Moments(*_cell_merge(_fields(a), _fields(b)))


def cell_moments(m: Moments, cell: int) -> Moments:
    """One cell's :class:`Moments` out of per-cell moments."""
    return Moments(*(field[cell] for field in _fields(m)))


def cells_memory_bytes(cells: int, dim: int) -> int:
    """Bytes of one level's per-cell state: the streamed second moments and the precisions."""
    return 2 * cells * dim * dim * FLOAT64_BYTES


class CellMoments(RunningMoments):
    """:class:`RunningMoments` of ``K`` cells at once; every buffer has a leading K axis."""

    KEEPS_ROWS = False  # C-dimensional cells: their moments are small, and a batched fit needs them

    def __init__(self, cells: int, dim: int) -> None:
        super().__init__(dim)
        self.cells = cells
        for name in self.FIELDS:
            buffer = getattr(self, name)
            self.register_buffer(name, buffer.new_zeros((cells, *buffer.shape)))

    @property
    def n(self) -> int:
        return int(self.count[0].item())

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        """Add a batch ``x`` (n, K, D): cell k's vectors are ``x[:, k]``."""
        if x.ndim != 3 or x.shape[1:] != (self.cells, self.dim):
            raise ValueError(
                f"expected features of shape (n, {self.cells}, {self.dim}), got {tuple(x.shape)}"
            )
        if x.shape[0] == 0:
            return
        if self.n == 0:
            self.shift.copy_(x.to(torch.float64).mean(dim=0))
        # about the accumulator's own shift the batch's moments add in place (as RunningMoments.update)
        y = (x.to(torch.float64) - self.shift).transpose(0, 1)  # (K, n, D)
        squares = (y * y).sum(dim=2)  # (K, n)
        self.count += y.shape[1]
        self.sum += y.sum(dim=1)
        self.outer.baddbmm_(y.mT, y)
        self.sqnorm_vec += torch.bmm(squares[:, None, :], y)[:, 0]
        self.quartic += (squares * squares).sum(dim=1)

    @torch.no_grad()
    def merge_(self, other: Moments) -> None:
        """Add another accumulator's per-cell moments (e.g. from another process)."""
        if other.count[0].item() == 0:
            return
        self.load_moments(other if self.n == 0 else merge_cell_moments(self.moments(), other))


@dataclass(frozen=True)
class CellFits(Sequence[GaussianFit]):
    """The Ledoit-Wolf fits of ``K`` cells, batched (each field with a leading K axis); ``fits[k]`` is
    cell k's :class:`GaussianFit` (views, no copies)."""

    mean: Tensor  # (K, D)
    precision: Tensor  # (K, D, D)
    shrinkage: Tensor  # (K,)
    std: Tensor  # (K, D)
    n: int
    moments: Moments  # what the fits were made from, per cell

    def __len__(self) -> int:
        return int(self.mean.shape[0])

    def __getitem__(self, cell: int) -> GaussianFit:
        if not -len(self) <= cell < len(self):
            raise IndexError(f"cell {cell} out of {len(self)}")
        mean, precision, std = self.mean[cell], self.precision[cell], self.std[cell]
        moments = cell_moments(self.moments, cell)
        return GaussianFit(mean, precision, float(self.shrinkage[cell]), std, self.n, moments)


def fit_cells(moments: Moments, chunk_bytes: int = INVERSE_CHUNK_BYTES) -> CellFits:
    """One Ledoit-Wolf fit per cell: :func:`fit_gaussian` on each cell's moments, computed for all cells
    at once (batched Cholesky); a cell whose covariance does not invert accurately is fitted alone
    (:func:`fit_gaussian`'s pseudo-inverse and warning).

    One ``(K, D, D)`` tensor becomes the scatter, the empirical and the shrunk covariances and the
    precisions in turn; beyond it, the inversion copies at most ``chunk_bytes`` of covariances at a
    time (:func:`batched_inverse_`)."""
    cells, n = moments.count.shape[0], int(moments.count[0].item())
    check_samples(n)
    mean_y = moments.sum / moments.count[:, None]
    scaled = mean_y[:, None, :] * -moments.count[:, None, None]
    matrices = torch.baddbmm(moments.outer, mean_y[:, :, None], scaled)
    std = torch.sqrt(torch.clamp(torch.diagonal(matrices, dim1=-2, dim2=-1) / (n - 1), min=0.0))
    matrices.div_(n)
    shrinkage = ledoit_wolf_shrinkages(matrices, _cell_centred_quartic(*_fields(moments)), n)
    target = torch.diagonal(matrices, dim1=-2, dim2=-1).mean(dim=-1)
    matrices.mul_((1.0 - shrinkage)[:, None, None])
    matrices.diagonal(dim1=-2, dim2=-1).add_((shrinkage * target)[:, None])
    mean, totals = moments.shift + mean_y, torch.diagonal(matrices, dim1=-2, dim2=-1).sum(dim=-1)
    rounding = torch.tensor([total_is_rounding(float(totals[k]), mean[k]) for k in range(cells)])
    quiet = floor_quiet_cells_(matrices, std, rounding, totals)
    accurate = batched_inverse_(matrices, chunk_bytes=chunk_bytes)  # the precisions from here on
    for k in torch.nonzero(~accurate).flatten().tolist():
        with warnings.catch_warnings():  # one warning below for all cells
            warnings.simplefilter("ignore", RuntimeWarning)
            alone = fit_gaussian(cell_moments(moments, k))
        mean[k], matrices[k], shrinkage[k], std[k] = alone.mean, alone.precision, alone.shrinkage, alone.std
    warn_degenerate_cells(int(quiet.sum()), int((~accurate).sum()), cells, floored=not bool(rounding.all()))
    return CellFits(mean, matrices, shrinkage, std, n, moments)


#: The least variance a cell's features are given, as a fraction of the median cell's mean variance
#: (cf. PaDiM's 0.01 I).
QUIET_CELL_FLOOR = 0.01


def floor_quiet_cells_(covariances: Tensor, std: Tensor, rounding: Tensor, totals: Tensor) -> Tensor:
    """Add ``floor I`` to the covariances of the cells whose features vary less than ``floor`` (their
    mean variance), ``floor`` being :data:`QUIET_CELL_FLOOR` times the median cell's mean variance, and
    ``floor`` to their variances (``std``); returns which cells were quiet. Such cells are a constant
    background: the inverse of their covariance, float rounding or little more, would turn rounding in
    a new image's features (another batch size, another device) into large distances, while a change
    the size of the other cells' variation would go unseen. ``rounding`` marks the cells whose variance
    is rounding only; nothing is done when no cell varies (there is no median cell to go by)."""
    if bool(rounding.all()):
        return rounding
    dim = covariances.shape[-1]
    variances = totals / dim
    floor = QUIET_CELL_FLOOR * float(variances[~rounding].median())
    quiet = rounding | (variances < floor)
    covariances[quiet] += floor * torch.eye(dim, dtype=covariances.dtype, device=covariances.device)
    std[quiet] = (std[quiet].square() + floor).sqrt()
    return quiet


def warn_degenerate_cells(quiet: int, singular: int, cells: int, floored: bool = True) -> None:
    """One warning for the cells without variance or with a singular covariance (a constant background
    is common: one cell is not the whole image, as :func:`warn_if_no_variance` says of a level)."""
    parts = []
    if quiet:
        floor = f" (less than {QUIET_CELL_FLOOR:g} of the median cell's, which is added to theirs)"
        parts.append(f"{quiet} of {cells} cells had (almost) no variance on the training images")
        parts[-1] += floor if floored else ""
    if singular:
        parts.append(f"{singular} of {cells} cells a singular covariance (the pseudo-inverse is used)")
    if parts:
        warnings.warn(
            " and ".join(parts) + ": a constant background or constant features there? Those cells' "
            "distances rest on little or no variation",
            RuntimeWarning,
            stacklevel=3,
        )


def _centred_quartic(*fields: Tensor) -> Tensor:
    return Moments(*fields).centred_quartic()


_cell_centred_quartic = torch.vmap(_centred_quartic)


class CellGaussianScorer(nn.Module):
    """Scores ``(n, K, D)`` features per cell: Mahalanobis (eq. 2), L2 and SED (eq. 9), each ``(n, K)``."""

    def __init__(self, cells: int, dim: int) -> None:
        super().__init__()
        f64 = {"dtype": torch.float64}
        self.register_buffer("mean", torch.zeros(cells, dim, **f64))
        self.register_buffer("precision", torch.zeros(cells, 0, 0, **f64))  # set by set_fit
        self.register_buffer("std", torch.ones(cells, dim, **f64))
        self.register_buffer("shrinkage", torch.zeros(cells, **f64))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @property
    def cells(self) -> int:
        return int(self.mean.shape[0])

    @property
    def dim(self) -> int:
        return int(self.mean.shape[1])

    @property
    def in_dim(self) -> int:
        """The width of each cell's feature (no reduction: the modelled width)."""
        return self.dim

    def set_fit(self, fits: CellFits) -> None:
        """Store the per-cell fits of :func:`fit_cells` (their tensors, not copies, on the same device)."""
        device = self.mean.device
        self.mean, self.precision = fits.mean.to(device), fits.precision.to(device)
        self.std, self.shrinkage = fits.std.to(device), fits.shrinkage.to(device)
        self.fitted = torch.ones((), dtype=torch.bool, device=device)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """``{"mahalanobis", "l2", "sed"}``: ``(n, K)`` distances of each cell's feature to its Gaussian."""
        return cell_distances(x, self.mean, self.precision, self.std)


def cell_distances(x: Tensor, mean: Tensor, precision: Tensor, std: Tensor) -> dict[str, Tensor]:
    """``{"mahalanobis", "l2", "sed"}``: ``(n, K)`` distances of features ``(n, K, D)`` to per-cell
    Gaussians (``mean`` and ``std`` ``(K, D)``, ``precision`` ``(K, D, D)``), one batched product.

    SED is the L2 distance after dividing by the per-feature std; features with
    zero training variance are left out, as in
    :func:`~anomaly.stats.distances.standardised_euclidean`.
    """
    diff = x.to(torch.float64) - mean
    # two (n, K, D) tensors at a time: the products and the standardised features are made in place
    squared = torch.einsum("nkc,kcd->nkd", diff, precision).mul_(diff).sum(dim=2)
    l2 = torch.linalg.vector_norm(diff, dim=2)
    alive = std > 0
    standardised = diff.div_(torch.where(alive, std, torch.ones_like(std))).masked_fill_(~alive, 0.0)
    return {
        "mahalanobis": torch.sqrt(torch.clamp(squared, min=0.0)),
        "l2": l2,
        "sed": torch.linalg.vector_norm(standardised, dim=2),
    }
