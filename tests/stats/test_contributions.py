"""Cell shares of a grid Gaussian's squared distance: exact split, equal to sklearn's Ledoit-Wolf."""

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


def test_cell_shares_equal_sklearn_ledoit_wolf_and_sum_to_the_grid_distance():
    k, channels = 3, 4
    train, test = grid_vectors(60, channels, k, 0), grid_vectors(9, channels, k, 1)
    pooling = GridMaps(k)
    shares = fitted(pooling, train)(test)
    assert {kind: s.shape for kind, s in shares.items()} == dict.fromkeys(shares, (9, k * k))

    lw = LedoitWolf().fit(train.double().numpy())
    diff = test.double().numpy() - lw.location_
    expected = (diff * (diff @ lw.precision_)).reshape(9, channels, k * k).sum(axis=1)
    np.testing.assert_allclose(shares["mahalanobis"].numpy(), expected, rtol=1e-8, atol=1e-8)
    expected_l2 = (diff * diff).reshape(9, channels, k * k).sum(axis=1)
    np.testing.assert_allclose(shares["l2"].numpy(), expected_l2, rtol=1e-10)

    # the image distances are the grid pooling's exactly, for every kind
    grid_scores = fitted(Grid(k), train)(test)
    for kind, values in shares.items():
        np.testing.assert_allclose(pooling.image_distances(values), grid_scores[kind], rtol=1e-10)
    assert pooling.to_map(shares["mahalanobis"]).shape == (9, k, k)
    assert torch.equal(pooling.to_map(shares["mahalanobis"])[:, 1, 2], shares["mahalanobis"][:, 1 * k + 2])


def test_grid_maps_options_and_reduction():
    assert build_pooling("grid_maps", grid_size=2).options() == {"name": "grid_maps", "grid_size": 2}
    pooling = GridMaps(2)
    assert pooling.makes_maps and not pooling.supports_reduction
    assert pooling.state_bytes([8]) == Grid(2).state_bytes([8])
    with pytest.raises(ValueError, match="no PCA/NPCA"):
        pooling.fit(pooling.scorer(8), RunningMoments(8).moments(), torch.eye(8, 2, dtype=torch.float64))
