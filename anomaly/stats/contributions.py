"""Each cell's share of a grid Gaussian's squared distance: an anomaly map from one joint Gaussian.

``pooling: grid`` models a level's ``k x k`` pooled map as one ``k^2 C`` vector ``x``
(channel-major: entry ``c k^2 + j`` is channel c of cell j). Its squared Mahalanobis
distance (eq. 2) is a sum over the entries,

    ``M(x)^2 = (x - mu)^T P (x - mu) = sum_i (x - mu)_i [P (x - mu)]_i``,

so grouping the entries by cell splits it exactly into ``k^2`` per-cell shares
``m_j = sum_c (x - mu)_{c,j} [P (x - mu)]_{c,j}`` with ``sum_j m_j = M(x)^2``. A
cell whose deviation lies along a direction the joint Gaussian finds unlikely
(given how all cells vary together) gets a large share. L2 and SED (eq. 9) split
the same way into per-cell sums of squares. The shares are the anomaly map; the
image score stays the joint distance ``sqrt(sum_j m_j)``, the grid pooling's exactly.
A share can be slightly negative (the cross terms); the sum never is.
"""

from __future__ import annotations

import torch
from torch import Tensor

from anomaly.stats.scorer import GaussianScorer


class CellShareScorer(GaussianScorer):
    """A :class:`GaussianScorer` of ``k^2 C`` grid vectors that returns each cell's squared share.

    ``forward(x)`` gives ``{"mahalanobis", "l2", "sed"}``, each ``(n, k^2)``: the cells'
    shares of the squared distance; their sum over the cells is the squared distance
    the plain scorer gives. No PCA/NPCA projection (it would mix the cells).
    """

    def __init__(self, cells: int, in_dim: int) -> None:
        if cells < 1 or in_dim % cells:
            raise ValueError(f"a {in_dim}-dim grid vector does not split into {cells} cells")
        super().__init__(in_dim)
        self.cells = cells

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        diff = x.to(torch.float64) - self.mean
        n, cells = diff.shape[0], self.cells

        def per_cell(values: Tensor) -> Tensor:
            return values.reshape(n, -1, cells).sum(dim=1)

        alive = self.std > 0
        safe_std = torch.where(alive, self.std, torch.ones_like(self.std))
        standardised = torch.where(alive, diff / safe_std, torch.zeros_like(diff))
        return {
            "mahalanobis": per_cell(diff @ self.precision * diff),
            "l2": per_cell(diff * diff),
            "sed": per_cell(standardised * standardised),
        }


def joint_distance(shares: Tensor) -> Tensor:
    """The distance ``(n,)`` from the cells' squared shares ``(n, k^2)``."""
    return torch.sqrt(torch.clamp(shares.sum(dim=1), min=0.0))


__all__ = ["CellShareScorer", "joint_distance"]
