"""Fine cells beside a grid's joint Gaussian: sklearn per-cell distances, exact streaming, the map."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.covariance import LedoitWolf
from torch.nn import functional as F

from anomaly.detector.io import take_buffers
from anomaly.errors import UserError
from anomaly.pooling import Cells, Grid, GridMaps, build_pooling
from anomaly.pooling.grid_maps import resize_maps
from anomaly.stats import grid_fine
from anomaly.stats.cells import cell_moments
from anomaly.stats.grid_fine import GridFineMoments
from anomaly.stats.moments import all_gather_moments, kept_buffers, moment_tensors, moments_like
from tests.stats.test_grid_cells import fitted

K, FINE, CHANNELS = 2, 4, 3


def feature_maps(n: int, seed: int) -> torch.Tensor:
    """(n, C, 8, 8) smooth random maps with correlated channels."""
    generator = torch.Generator().manual_seed(seed)
    maps = torch.randn(n, CHANNELS, 8, 8, generator=generator)
    return maps + 0.5 * maps.roll(1, dims=1) + torch.randn(n, CHANNELS, 1, 1, generator=generator)


#: A map level with fine cells, and a coarse (global) level with fine cells.
FINE_POOLINGS = {
    "map level": GridMaps(K, fine_levels=[4], fine_grid_size=FINE, fine_weight=0.5),
    "coarse level": GridMaps(K, coarse_levels=[4], fine_levels=[4], fine_grid_size=[FINE], fine_weight=0.5),
}


def fine_rows(pooling: GridMaps, maps: torch.Tensor) -> torch.Tensor:
    return pooling.for_level(4).rows_from(lambda k: F.adaptive_avg_pool2d(maps, k))


@pytest.mark.parametrize("case", FINE_POOLINGS)
def test_fine_cells_are_sklearn_ledoit_wolf_per_cell_and_the_joint_part_the_levels_own(case, monkeypatch):
    pooling = FINE_POOLINGS[case]
    level, joint = pooling.for_level(4), GridMaps(K) if case == "map level" else Grid(1)
    joint_cells = K * K if case == "map level" else 1
    map_columns = K * K if case == "map level" else 0
    train_maps, test_maps = feature_maps(50, 0), feature_maps(6, 1)
    train, test = fine_rows(pooling, train_maps), fine_rows(pooling, test_maps)
    assert train.shape[1] == level.modelled_dim(CHANNELS) == (joint_cells + FINE * FINE) * CHANNELS
    scorer = fitted(level, train)
    distances = scorer(test)
    assert distances["mahalanobis"].shape == (6, 1 + map_columns + FINE * FINE)
    monkeypatch.setattr(grid_fine, "CHUNK_ROWS", 4)  # streamed and scored a few rows at a time: the same
    monkeypatch.setattr(grid_fine, "SCORE_CHUNK_BYTES", 4 * FINE * FINE * CHANNELS * 8)
    for kind, values in fitted(level, train)(test).items():
        torch.testing.assert_close(values, distances[kind], rtol=1e-10, atol=1e-10)

    # the first columns are the level's without fine cells (grid_maps, or the coarse grid), every kind
    joint_dim = joint_cells * CHANNELS
    coarse = fitted(joint, train[:, :joint_dim])(test[:, :joint_dim])
    for kind in coarse:
        np.testing.assert_allclose(
            distances[kind][:, : 1 + map_columns], coarse[kind].reshape(6, -1), rtol=1e-10
        )
    np.testing.assert_allclose(level.image_distances(distances["l2"]), joint.image_distances(coarse["l2"]))

    # the fine columns are sklearn's Ledoit-Wolf Mahalanobis distance of each cell (as pooling cells)
    cells = Cells(FINE).arrange(F.adaptive_avg_pool2d(train_maps, FINE)).double().numpy()
    test_cells = Cells(FINE).arrange(F.adaptive_avg_pool2d(test_maps, FINE)).double().numpy()
    fine = distances["mahalanobis"][:, 1 + map_columns :].numpy()
    for j in range(FINE * FINE):
        expected = LedoitWolf().fit(cells[:, j]).mahalanobis(test_cells[:, j])
        np.testing.assert_allclose(fine[:, j] ** 2, expected, rtol=1e-6)

    # the map: the weighted fine cells, plus a map level's coarse cells upsampled bilinearly to f x f
    want = 0.5 * torch.from_numpy(fine).reshape(-1, FINE, FINE)
    if case == "map level":
        coarse_map = distances["mahalanobis"][:, 1 : 1 + K * K].reshape(-1, 1, K, K)
        upsampled = F.interpolate(coarse_map, size=(FINE, FINE), mode="bilinear", align_corners=False)[:, 0]
        want = want + upsampled
        # a level without fine cells gives its map at the same f x f size
        assert pooling.to_map(coarse["mahalanobis"]).shape == (6, FINE, FINE)
        np.testing.assert_allclose(pooling.to_map(coarse["mahalanobis"]), upsampled, rtol=1e-10)
    np.testing.assert_allclose(level.to_map(distances["mahalanobis"]), want, rtol=1e-10)


@pytest.mark.parametrize("case", FINE_POOLINGS)
def test_fine_moments_streamed_merged_and_gathered_equal_one_pass(case):
    pooling = FINE_POOLINGS[case]
    level = pooling.for_level(4)
    rows = fine_rows(pooling, feature_maps(30, 2)).double()
    whole, first, second = (level.accumulator(rows.shape[1]) for _ in range(3))
    whole.update(rows)
    first.update(rows[:11])
    second.update(rows[11:])
    first.merge_(second.moments())
    assert isinstance(whole, GridFineMoments) and first.n == whole.n == 30
    joint, cells = first.moments().joint, whole.moments().joint
    torch.testing.assert_close(joint.mean, cells.mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(joint.scatter(), cells.scatter(), rtol=1e-10, atol=1e-10)
    for j in range(FINE * FINE):
        ours, theirs = cell_moments(first.moments().cells, j), cell_moments(whole.moments().cells, j)
        assert ours.n == theirs.n == 30
        torch.testing.assert_close(ours.mean, theirs.mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ours.scatter(), theirs.scatter(), rtol=1e-10, atol=1e-10)
    # the moments travel between processes as one flat buffer and come back as they were
    value = whole.moments()
    rebuilt = moments_like(value, [t.clone() for t in moment_tensors(value)])
    assert type(rebuilt) is type(value)
    for a, b in zip(moment_tensors(rebuilt), moment_tensors(value), strict=True):
        assert torch.equal(a, b)
    assert all_gather_moments(value) == [value]  # without DDP: as it is
    # the saved buffers are the moment shapes the file layout expects
    buffers = {name: tuple(b.shape) for name, b in kept_buffers(whole).items()}
    assert buffers == level.moment_shapes(rows.shape[1])


def test_fine_levels_options_memory_and_refusals():
    pooling = build_pooling("grid_maps", grid_size=7, fine_levels=[4], fine_grid_size=28, fine_weight=0.5)
    assert pooling.options() == {
        "name": "grid_maps",
        "grid_size": 7,
        "fine_levels": (4,),
        "fine_grid_size": 28,
        "fine_weight": 0.5,
    }
    assert build_pooling(**pooling.options()) == pooling
    assert pooling.map_size == 28 and GridMaps(7).map_size == 7
    # the fine cells cost f^2 C^2 float64 twice (moments and precisions), beside the grid's state
    assert pooling.levels_state_bytes([40], [4]) == GridMaps(7).state_bytes([40]) + 2 * 28**2 * 40**2 * 8
    assert pooling.levels_state_bytes([40], [3]) == GridMaps(7).state_bytes([40])
    # a coarse level with fine cells: its coarse grid's state and its cells'; one fine grid per level
    both = GridMaps(7, coarse_levels=[6], fine_levels=[4, 6], fine_grid_size=[28, 14], fine_weight=0.5)
    assert both.options()["fine_grid_size"] == (28, 14) and build_pooling(**both.options()) == both
    assert both.fine_grid_sizes == {4: 28, 6: 14} and both.map_size == 28 and both.level_makes_maps(6)
    assert (
        both.levels_state_bytes([40, 112], [4, 6])
        == pooling.levels_state_bytes([40], [4]) + Grid(1).state_bytes([112]) + 2 * 14**2 * 112**2 * 8
    )
    assert "fine cells of levels [4, 6]: [28, 14]" in both.describe_size()
    same = GridMaps(7, fine_levels=[3, 4], fine_grid_size=[28, 28])  # one size for all: saved as one
    assert same.options()["fine_grid_size"] == 28 and same == GridMaps(
        7, fine_levels=[3, 4], fine_grid_size=28
    )
    assert GridMaps(7, coarse_levels=[6], fine_levels=[6], fine_grid_size=14).map_size == 14
    with pytest.raises(UserError, match=r"fine_grid_size lists 1 sizes for the 2 fine_levels \[4, 6\]"):
        GridMaps(7, fine_levels=[4, 6], fine_grid_size=[28])
    for size in (0, 65, 2.5, True, [28, "14"]):
        with pytest.raises(UserError, match="must be a whole number of cells per side"):
            GridMaps(7, fine_levels=[4, 6], fine_grid_size=size)
    for weight in (0, -1.0, float("nan"), float("inf"), True, "1"):
        with pytest.raises(UserError, match="fine_weight must be a finite positive number"):
            GridMaps(7, fine_levels=[4], fine_weight=weight)
    with pytest.raises(UserError, match="fine_levels must be increasing"):
        GridMaps(7, fine_levels=[4, 3])


@pytest.mark.parametrize(("source", "size"), [(7, 28), (7, 7), (2, 4), (5, 3), (3, 8)])
def test_resize_maps_is_torch_bilinear_upsampling(source: int, size: int):
    maps = torch.randn(3, source, source, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    want = F.interpolate(maps[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(resize_maps(maps, size), want, rtol=1e-12, atol=1e-12)


def _synchronise_half(rank: int, world: int, init: str, case: str, rows: torch.Tensor, out: str) -> None:
    """One DDP process (gloo): stream its half of ``rows``, synchronise, save what it then holds."""
    import torch.distributed as dist

    from anomaly.stats.moments import synchronise

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        accumulator = FINE_POOLINGS[case].for_level(4).accumulator(rows.shape[1])
        accumulator.update(rows[rank::world])
        synchronise([accumulator])
        torch.save(dict(accumulator.named_buffers()), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("case", FINE_POOLINGS)
def test_fine_moments_synchronised_over_two_processes_equal_one_stream(case, tmp_path):
    import torch.multiprocessing as mp

    pooling = FINE_POOLINGS[case]
    rows = fine_rows(pooling, feature_maps(24, 3)).double()
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_synchronise_half, args=(2, init, case, rows, str(tmp_path)), nprocs=2, join=True)
    whole = pooling.for_level(4).accumulator(rows.shape[1])
    whole.update(rows)
    for rank in range(2):
        with torch.device("meta"):
            held = pooling.for_level(4).accumulator(rows.shape[1])
        take_buffers(held, torch.load(tmp_path / f"rank{rank}.pt"))
        assert held.n == 24 and held.joint.keeps_rows == (held.joint.dim >= 24)
        ours, theirs = held.moments(), whole.moments()
        torch.testing.assert_close(ours.joint.scatter(), theirs.joint.scatter(), rtol=1e-10, atol=1e-10)
        for j in range(FINE * FINE):
            a, b = cell_moments(ours.cells, j), cell_moments(theirs.cells, j)
            torch.testing.assert_close(a.mean, b.mean, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(a.scatter(), b.scatter(), rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(a.centred_quartic(), b.centred_quartic(), rtol=1e-10, atol=1e-10)
