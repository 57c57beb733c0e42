"""Per-cell distances under a grid's joint Gaussian: sklearn Ledoit-Wolf conditionals, the grid's score."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.covariance import LedoitWolf

from anomaly.pooling import Grid, GridMaps, build_pooling
from anomaly.stats.moments import RunningMoments


def grid_vectors(n: int, channels: int, k: int, seed: int) -> torch.Tensor:
    """(n, k^2 C) channel-major grid vectors (as ``Grid.arrange`` gives) with correlated cells."""
    generator = torch.Generator().manual_seed(seed)
    maps = torch.randn(n, channels, k, k, generator=generator)
    maps = maps + 0.5 * maps.roll(1, dims=3) + torch.randn(n, channels, 1, 1, generator=generator)
    return Grid(k).arrange(maps)


def fitted(pooling, x: torch.Tensor, batch: int = 7):
    accumulator, scorer = pooling.accumulator(x.shape[1]), pooling.scorer(x.shape[1])
    for start in range(0, len(x), batch):  # streamed
        accumulator.update(x[start : start + batch])
    pooling.fit(scorer, accumulator.moments())
    return scorer


def test_cell_distances_are_sklearn_ledoit_wolf_conditionals_and_the_image_score_the_grids():
    k, channels, n = 3, 4, 9
    train, test = grid_vectors(60, channels, k, 0), grid_vectors(n, channels, k, 1)
    pooling = GridMaps(k)
    distances = fitted(pooling, train)(test)
    assert {kind: d.shape for kind, d in distances.items()} == dict.fromkeys(distances, (n, 1 + k * k))

    lw = LedoitWolf().fit(train.double().numpy())
    diff = test.double().numpy() - lw.location_
    cov = lw.covariance_
    cell_maps = pooling.to_map(distances["mahalanobis"]).numpy()
    for j in range(k * k):
        cell = np.arange(channels) * k * k + j  # channel-major: channel c of cell j
        rest = np.setdiff1d(np.arange(k * k * channels), cell)
        # the conditional Gaussian of the cell given the rest (Schur complement)
        gain = cov[np.ix_(cell, rest)] @ np.linalg.inv(cov[np.ix_(rest, rest)])
        residual = diff[:, cell] - diff[:, rest] @ gain.T
        cond_cov = cov[np.ix_(cell, cell)] - gain @ cov[np.ix_(rest, cell)]
        expected = np.sqrt(np.einsum("ni,ij,nj->n", residual, np.linalg.inv(cond_cov), residual))
        np.testing.assert_allclose(cell_maps[:, j // k, j % k], expected, rtol=1e-6)
    l2_cells = np.sqrt((diff * diff).reshape(n, channels, k * k).sum(axis=1))
    np.testing.assert_allclose(distances["l2"][:, 1:].numpy(), l2_cells, rtol=1e-10)

    # the image distances are the grid pooling's exactly, for every kind, and sklearn's Mahalanobis
    grid_scores = fitted(Grid(k), train)(test)
    for kind, values in distances.items():
        np.testing.assert_allclose(pooling.image_distances(values), grid_scores[kind], rtol=1e-10)
    np.testing.assert_allclose(
        pooling.image_distances(distances["mahalanobis"]) ** 2,
        lw.mahalanobis(test.double().numpy()),
        rtol=1e-6,
    )


def test_grid_maps_options_memory_and_reduction():
    assert build_pooling("grid_maps", grid_size=2).options() == {"name": "grid_maps", "grid_size": 2}
    pooling = GridMaps(2)
    assert pooling.makes_maps and not pooling.supports_reduction
    assert pooling.state_bytes([8]) == Grid(2).state_bytes([8]) + 4 * 8 * 8 * 8  # + k^2 C x C float64
    with pytest.raises(ValueError, match="no PCA/NPCA"):
        pooling.fit(pooling.scorer(32), RunningMoments(32).moments(), torch.eye(32, 2, dtype=torch.float64))
