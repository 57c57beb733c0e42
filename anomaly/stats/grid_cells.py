"""Per-cell distances under one joint Gaussian of a grid: an anomaly map that keeps the grid's score.

``pooling: grid`` models a level's ``k x k`` pooled map as one ``k^2 C`` vector ``x``
(channel-major: entry ``c k^2 + j`` is channel c of cell j) with one Ledoit-Wolf
Gaussian ``N(mu, Sigma)``, precision ``P = Sigma^-1`` (eqs. 2 and 6). For the map, each
cell ``j`` is scored by its Mahalanobis distance *given all other cells*: the
conditional Gaussian of ``x_j`` given the rest has covariance ``(P_jj)^-1`` and mean
``mu_j - (P_jj)^-1 P_j,rest (x_rest - mu_rest)``, so with ``w = P (x - mu)``

    ``M_j(x)^2 = w_j^T (P_jj)^-1 w_j``.

A cell that its neighbours (and its own past) do not predict scores high, whatever
the image's global appearance; unlike one Gaussian per cell (``pooling: cells``) the
cells are judged jointly. The image score stays the joint distance ``M(x)``, the grid
pooling's exactly. L2 and SED (eq. 9) have diagonal covariances, for which the
conditional distance of a cell is the norm of its own entries.
"""

from __future__ import annotations

import torch
from torch import Tensor

from anomaly.stats.gaussian import GaussianFit, batched_inverse_, invert_spd
from anomaly.stats.low_rank import LowRankPrecision
from anomaly.stats.scorer import GaussianScorer


def cell_blocks(precision: Tensor | LowRankPrecision, cells: int) -> Tensor:
    """``(k^2, C, C)``: the precision's diagonal blocks ``P_jj``, one per cell."""
    if isinstance(precision, LowRankPrecision):
        return precision.cell_blocks(cells)
    channels = precision.shape[0] // cells
    blocks = precision.reshape(channels, cells, channels, cells).diagonal(dim1=1, dim2=3)  # (C, C, K)
    return blocks.permute(2, 0, 1).contiguous()


def cell_conditional_covariances(precision: Tensor | LowRankPrecision, cells: int) -> Tensor:
    """``(k^2, C, C)``: each cell's covariance given all other cells, ``(P_jj)^-1``."""
    blocks = cell_blocks(precision, cells)
    batched_inverse_(blocks, fallback=invert_spd)  # an inaccurate one: its pseudo-inverse, and a warning
    return blocks


class GridCellScorer(GaussianScorer):
    """A :class:`GaussianScorer` of ``k^2 C`` grid vectors that also scores every cell.

    ``forward(x)`` gives ``{"mahalanobis", "l2", "sed"}``, each ``(n, 1 + k^2)``: column 0
    the joint distance of the whole vector (the grid pooling's score), columns ``1 + j``
    cell j's distance given the other cells. No PCA/NPCA projection (it would mix the cells).
    """

    def __init__(self, cells: int, in_dim: int) -> None:
        if cells < 1 or in_dim % cells:
            raise ValueError(f"a {in_dim}-dim grid vector does not split into {cells} cells")
        super().__init__(in_dim)
        self.cells = cells
        # set by set_fit, as the precision: unfitted, no C x C matrix per cell
        self.register_buffer("cell_covariance", torch.zeros(cells, 0, 0, dtype=torch.float64))

    def set_fit(self, fit: GaussianFit, projection: Tensor | None = None) -> None:
        if projection is not None:
            raise ValueError("a grid's per-cell distances need unprojected features")
        super().set_fit(fit)
        self.cell_covariance = cell_conditional_covariances(fit.precision, self.cells).to(self.mean.device)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        diff = x.to(torch.float64) - self.mean
        n, cells = diff.shape[0], self.cells
        whitened = self.whiten(diff)  # w = P (x - mu)
        per_cell = whitened.reshape(n, -1, cells).transpose(1, 2)  # (n, K, C)
        conditional = torch.einsum("nkc,kcd,nkd->nk", per_cell, self.cell_covariance, per_cell)
        alive = self.std > 0
        safe_std = torch.where(alive, self.std, torch.ones_like(self.std))
        standardised = torch.where(alive, diff / safe_std, torch.zeros_like(diff))

        def scored(joint_squared: Tensor, cells_squared: Tensor) -> Tensor:
            both = torch.cat([joint_squared[:, None], cells_squared], dim=1)
            return torch.sqrt(torch.clamp(both, min=0.0))

        def own(squares: Tensor) -> Tensor:
            return squares.reshape(n, -1, cells).sum(dim=1)

        return {
            "mahalanobis": scored((whitened * diff).sum(dim=1), conditional),
            "l2": scored((diff * diff).sum(dim=1), own(diff * diff)),
            "sed": scored((standardised * standardised).sum(dim=1), own(standardised * standardised)),
        }


__all__ = ["GridCellScorer", "cell_conditional_covariances"]
