"""The recommended detector: grid_maps with coarse levels, the default of `anomaly fit` and of the API."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from sklearn.covariance import LedoitWolf

from anomaly.backbones import backbone_spec
from anomaly.commands import main
from anomaly.configs import CONFIG_DIR
from anomaly.detector.model import GaussianDetectorModel
from anomaly.errors import UserError
from anomaly.pooling import RECOMMENDED_LEVELS, Grid, GridMaps, build_pooling, recommended_pooling
from anomaly.pooling.grid_maps import fine_levels_among, resize_maps
from anomaly.stats.gaussian import fit_gaussian
from anomaly.stats.moments import RunningMoments


def fitted_model(levels, channels, pooling, rows):
    model = GaussianDetectorModel.for_fitting(None, levels, channels, pooling)
    model.update(rows)
    model.finalise()
    return model


def test_coarse_levels_score_as_their_own_grid_and_leave_the_map_to_the_others():
    generator = torch.Generator().manual_seed(0)
    k, train, test = 2, 40, 6
    fine = [torch.randn(train + test, 3 * k * k, generator=generator)]  # level 1: a 2x2 grid of 3 channels
    coarse = [torch.randn(train + test, 5, generator=generator)]  # level 2: pooled globally, 5 channels
    pooling = GridMaps(k, coarse_levels=[2], coarse_grid_size=1)
    assert pooling.for_level(2) == Grid(1) and pooling.for_level(1) is pooling
    assert pooling.options() == {
        "name": "grid_maps",
        "grid_size": 2,
        "coarse_levels": (2,),
        "coarse_grid_size": 1,
    }
    both = fitted_model([1, 2], [3, 5], pooling, [fine[0][:train], coarse[0][:train]])
    alone = fitted_model([1], [3], GridMaps(k), [fine[0][:train]])
    grid = fitted_model([2], [5], Grid(1), [coarse[0][:train]])
    columns, maps = both.score([fine[0][train:], coarse[0][train:]])
    fine_columns, fine_maps = alone.score([fine[0][train:]])
    coarse_columns, coarse_maps = grid.score([coarse[0][train:]])
    assert coarse_maps is None and maps.shape == (test, k, k)
    torch.testing.assert_close(maps, fine_maps)  # the map: level 1 only
    torch.testing.assert_close(columns["mahalanobis/1"], fine_columns["mahalanobis/1"])
    torch.testing.assert_close(columns["mahalanobis/2"], coarse_columns["mahalanobis/2"])
    torch.testing.assert_close(
        columns["mahalanobis/sum"], fine_columns["mahalanobis/sum"] + coarse_columns["mahalanobis/sum"]
    )

    # the coarse level with 3x3 fine cells (rows [5 global, 9 x 5 cells]): the same image scores, and
    # the map gains half its cells' Ledoit-Wolf distances (sklearn), the map then 3x3
    cells = torch.randn(train + test, 9 * 5, generator=generator)
    with_cells = [fine[0], torch.cat([coarse[0], cells], dim=1)]
    pooling = GridMaps(k, coarse_levels=[2], fine_levels=[2], fine_grid_size=3, fine_weight=0.5)
    model = fitted_model([1, 2], [3, 5], pooling, [rows[:train] for rows in with_cells])
    assert model.in_dims == [3 * k * k, 5 + 9 * 5]
    cell_columns, cell_maps = model.score([rows[train:] for rows in with_cells])
    for name in columns:
        torch.testing.assert_close(cell_columns[name], columns[name], rtol=1e-12, atol=1e-12)
    per_cell = cells.reshape(train + test, 9, 5).double().numpy()
    squared = [LedoitWolf().fit(per_cell[:train, j]).mahalanobis(per_cell[train:, j]) for j in range(9)]
    own = torch.from_numpy(np.sqrt(np.stack(squared, axis=1))).reshape(test, 3, 3)
    torch.testing.assert_close(cell_maps, resize_maps(maps, 3) + 0.5 * own, rtol=1e-6, atol=1e-8)


def test_coarse_levels_are_checked():
    with pytest.raises(UserError, match="increasing"):
        GridMaps(7, coarse_levels=[8, 7])
    with pytest.raises(UserError, match="level numbers"):
        GridMaps(7, coarse_levels=["7"])
    with pytest.raises(UserError, match="leave at least one level"):
        GaussianDetectorModel.for_fitting(None, [2], [5], GridMaps(2, coarse_levels=[2]))
    assert build_pooling("grid_maps", grid_size=7).options() == {"name": "grid_maps", "grid_size": 7}


def test_the_recommended_config_is_the_api_default():
    init = yaml.safe_load((CONFIG_DIR / "recommended.yaml").read_text())["model"]["init_args"]
    keys = ("grid_size", "coarse_levels", "coarse_grid_size", "fine_levels", "fine_grid_size", "fine_weight")
    options = {k: init[k] for k in keys}
    assert build_pooling(init["pooling"], **options) == recommended_pooling()
    assert tuple(init["levels"]) == RECOMMENDED_LEVELS


def test_poolings_from_lists_and_from_tuples_are_one_hashable_value():
    """Options given as YAML/JSON lists or as tuples make equal poolings, with equal hashes, of options
    held as tuples; so do the levels' own poolings; the options survive JSON as the file stores them."""
    init = yaml.safe_load((CONFIG_DIR / "recommended.yaml").read_text())["model"]["init_args"]
    keys = ("grid_size", "coarse_levels", "coarse_grid_size", "fine_levels", "fine_grid_size", "fine_weight")
    from_lists = build_pooling(init["pooling"], **{k: init[k] for k in keys})
    assert isinstance(init["fine_grid_size"], list) and isinstance(init["coarse_levels"], list)
    from_tuples = GridMaps(7, (6, 7, 8, 9), 1, (4, 6), (28, 14), 0.5)
    assert from_lists == from_tuples and hash(from_lists) == hash(from_tuples)
    assert len({from_lists, from_tuples, recommended_pooling()}) == 1
    assert from_lists.options() == {
        "name": "grid_maps",
        "grid_size": 7,
        "coarse_levels": (6, 7, 8, 9),
        "coarse_grid_size": 1,
        "fine_levels": (4, 6),
        "fine_grid_size": (28, 14),
        "fine_weight": 0.5,
    }
    assert build_pooling(**json.loads(json.dumps(from_lists.options()))) == from_lists
    for level in RECOMMENDED_LEVELS:
        assert hash(from_lists.for_level(level)) == hash(from_tuples.for_level(level))
        assert from_lists.for_level(level) == from_tuples.for_level(level)
    assert from_lists.for_level(4) != from_lists.for_level(6)  # 28x28 and 14x14 fine cells
    # a list of equal sizes is one size; the levels kept by a config keep their sizes, as tuples
    assert GridMaps(7, fine_levels=[3, 4], fine_grid_size=[28, 28]) == GridMaps(7, fine_levels=(3, 4))
    assert fine_levels_among([3, 6], [4, 6], [28, 14]) == ((6,), (14,))


def test_every_spatial_config_over_the_recommended_one_builds_its_pooling():
    """``anomaly fit --config NAME`` reads NAME over the recommended config: options NAME leaves out
    (e.g. the fine grid sizes where it has no fine levels) must not make its own invalid."""
    recommended = yaml.safe_load((CONFIG_DIR / "recommended.yaml").read_text())["model"]
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        model = (yaml.safe_load(path.read_text()) or {}).get("model") or {}
        if model.get("class_path") != recommended["class_path"]:
            continue
        init = {**recommended["init_args"], **model.get("init_args", {})}
        levels = init["levels"] or range(1, 10)
        fine_levels, fine_grid_size = fine_levels_among(levels, init["fine_levels"], init["fine_grid_size"])
        pooling = build_pooling(
            init["pooling"],
            grid_size=init["grid_size"],
            coarse_levels=init["coarse_levels"],
            fine_levels=fine_levels,
            fine_grid_size=fine_grid_size,
            fine_weight=init["fine_weight"],
        )
        assert pooling.name == init["pooling"], path.name


@pytest.mark.parametrize(
    ("configs", "class_path"),
    [
        ([], "anomaly.methods.spatial.SpatialGaussianAD"),
        (["--config", "paper"], "anomaly.methods.gaussian.GaussianAD"),
    ],
)
def test_anomaly_fit_defaults_to_the_recommended_detector_and_the_paper_is_one_option_away(
    configs, class_path, capsys
):
    with pytest.raises(SystemExit):
        main(["fit", *configs, "--print_config"])
    model = yaml.safe_load(capsys.readouterr().out)["model"]
    assert model["class_path"] == class_path
    if configs:
        assert model["init_args"]["levels"] is None  # every level, globally pooled: the paper
    else:
        assert model["init_args"]["pooling"] == "grid_maps" and model["init_args"]["coarse_levels"] == [
            6,
            7,
            8,
            9,
        ]


def test_the_fit_leaves_the_streamed_moments_as_they_were():
    """The fit works on copies: the moments stay exact for later updates and merges."""
    accumulator = RunningMoments(6)
    accumulator.update(torch.randn(30, 6, generator=torch.Generator().manual_seed(1)))
    before = {name: getattr(accumulator, name).clone() for name in RunningMoments.FIELDS}
    fit_gaussian(accumulator.moments())
    for name, value in before.items():
        assert torch.equal(getattr(accumulator, name), value), name


def test_a_model_for_fitting_holds_no_matrix_before_its_fit_and_none_of_D_x_D_below_D_rows():
    """Before its fit a level holds no placeholder matrix at all; with fewer rows than dimensions
    it keeps the rows and fits the precision's low-rank form, ``2 n D`` floats instead of ``2 D^2``;
    with more, the ``D x D`` moments and precision (80 dimensions, 120 rows)."""
    pooling = GridMaps(7, coarse_levels=[2])
    model = GaussianDetectorModel.for_fitting(None, [1, 2], [24, 80], pooling)
    held = sum(b.numel() for part in (*model.moments, *model.scorers) for b in part.buffers())
    assert held < 8 * 49 * 24
    model.update([torch.randn(120, 49 * 24), torch.randn(120, 80)])
    model.finalise()
    joint, coarse = model.scorers
    assert joint.precision.numel() == 0 and tuple(joint.basis.shape) == (49 * 24, 119)
    assert tuple(model.moments[0].rows.shape) == (120, 49 * 24) and model.moments[0].outer.numel() == 0
    assert tuple(coarse.precision.shape) == (80, 80) and coarse.basis.numel() == 0
    assert tuple(model.moments[1].outer.shape) == (80, 80) and model.moments[1].rows.numel() == 0


def test_unfitted_scorers_of_the_recommended_detector_hold_no_per_cell_matrices():
    """Before the fit a level's scorer holds vectors only: no identity C x C per cell (the 28x28 fine
    cells of level 4 alone were 784 x 40^2 floats), as the joint precision is empty until fitted."""
    spec = backbone_spec("efficientnet-lite0")
    pooling, held = recommended_pooling(), 0
    for level in RECOMMENDED_LEVELS:
        level_pooling = pooling.for_level(level)
        dim = level_pooling.modelled_dim(spec.level_dims[level - 1])
        scorer = level_pooling.scorer(dim)
        numel = sum(b.numel() for b in scorer.buffers())
        assert numel < 3 * dim, level  # mean and std of the joint vector and of every fine cell
        held += numel
    assert held * 8 < 2**20  # under 1 MiB of float64 for all seven levels

    # fitted, every cell has its matrices; saved and loaded, the same
    generator = torch.Generator().manual_seed(0)
    pooling = GridMaps(2, coarse_levels=[2], fine_levels=[1, 2], fine_grid_size=[3, 2])
    rows = [
        torch.randn(50, (4 + 9) * 3, generator=generator),
        torch.randn(50, (1 + 4) * 5, generator=generator),
    ]
    model = GaussianDetectorModel.for_fitting(None, [1, 2], [3, 5], pooling)
    assert [tuple(s.fine_precision.shape) for s in model.scorers] == [(9, 0, 0), (4, 0, 0)]
    model.update(rows)
    model.finalise()
    assert [tuple(s.fine_precision.shape) for s in model.scorers] == [(9, 3, 3), (4, 5, 5)]
    assert tuple(model.scorers[0].cell_covariance.shape) == (4, 3, 3)
