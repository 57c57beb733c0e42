"""CCA scorer on hand-made maps, against a brute-force scipy sweep, and the min-anomaly-size command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from anomaly.errors import UserError
from anomaly.evaluation.connected_components import (
    CCAScorer,
    cca_score,
    largest_component,
    min_anomaly_fraction,
    min_component_pixels,
    read_min_anomaly_size,
)
from anomaly.tools.min_anomaly_size import main as min_size_main
from tests.conftest import BOTTLE, make_mvtec_category, require


def hand_made_map() -> np.ndarray:
    """Background 0.1; a 2x2 block at 0.9 (4 px); a 3x3 block at 0.5 (9 px); a 5-pixel diagonal at 0.7."""
    m = np.full((12, 12), 0.1, np.float32)
    m[1:3, 1:3] = 0.9
    m[6:9, 1:4] = 0.5
    for i in range(5):
        m[1 + i, 6 + i] = 0.7  # only 8-connected: no two pixels share an edge
    return m


def test_largest_component_uses_8_connectivity():
    diagonal = np.eye(5, dtype=bool)
    assert largest_component(diagonal) == 5  # one component, not five
    assert largest_component(np.zeros((4, 4), bool)) == 0
    two = np.zeros((6, 6), bool)
    two[0, 0:2] = True
    two[3:6, 3:6] = True
    assert largest_component(two) == 9


@pytest.mark.parametrize(
    ("min_pixels", "expected"), [(1, 0.9), (4, 0.9), (5, 0.7), (6, 0.5), (9, 0.5), (10, 0.1), (144, 0.1)]
)
def test_cca_score_on_hand_made_map(min_pixels: int, expected: float):
    assert cca_score(hand_made_map(), min_pixels) == pytest.approx(expected)


def brute_force_cca(error_map: np.ndarray, min_pixels: int) -> float:
    """Sweep every distinct value from the maximum down; scipy labels with a full 3x3 structure."""
    for threshold in np.unique(error_map)[::-1]:
        labels, count = ndimage.label(error_map >= threshold, structure=np.ones((3, 3)))
        if count and np.bincount(labels.ravel())[1:].max() >= min_pixels:
            return float(threshold)
    raise AssertionError("unreachable: the lowest threshold selects the whole map")


def test_cca_score_equals_a_full_threshold_sweep():
    rng = np.random.default_rng(0)
    for trial in range(20):
        error_map = rng.random((16, 16)).astype(np.float32) ** 3
        if trial % 2:
            error_map = np.round(error_map, 1)  # ties
        for min_pixels in (1, 3, 10, 40, 256):
            assert cca_score(error_map, min_pixels) == brute_force_cca(error_map, min_pixels)


def test_cca_scorer_scores_a_batch_with_a_fractional_size():
    maps = torch.from_numpy(np.stack([hand_made_map(), hand_made_map() * 2]))
    scorer = CCAScorer(9 / 144)
    assert min_component_pixels(9 / 144, 12, 12) == 9
    np.testing.assert_allclose(scorer(maps).numpy(), [0.5, 1.0], rtol=1e-6)
    with pytest.raises(UserError, match="fraction"):
        CCAScorer(0.0)


def test_min_anomaly_fraction_takes_the_smallest_largest_component():
    big = np.zeros((10, 10), bool)
    big[0:4, 0:4] = True  # 16 px
    big[9, 9] = True  # a separate speck does not count
    diagonal = np.zeros((10, 10), bool)
    diagonal[range(5), range(5)] = True  # 5 px, 8-connected
    fraction, n = min_anomaly_fraction([big, diagonal, np.zeros((10, 10), bool)])
    assert (fraction, n) == (pytest.approx(0.05), 2)


def test_command_writes_the_size_from_generated_masks(tmp_path: Path, capsys):
    root = make_mvtec_category(tmp_path / "mvtec", n_bad=3, size=48)
    # replace one mask: components of 30 and 10 pixels -> largest 30, the smallest over all masks
    mask = np.zeros((48, 48), np.uint8)
    mask[0:3, 0:10] = 255
    mask[20:22, 20:25] = 255
    Image.fromarray(mask).save(root / "widget" / "ground_truth" / "square" / "001_mask.png")
    output = tmp_path / "sizes" / "{category}.json"
    assert (
        min_size_main(["--data.root", str(root), "--data.category", "widget", "--output", str(output)]) == 0
    )
    written = tmp_path / "sizes" / "widget.json"
    record = json.loads(written.read_text())
    assert record["min_anomaly_fraction"] == pytest.approx(30 / (48 * 48))
    assert record["n_masks"] == 3
    assert read_min_anomaly_size(written, "widget") == pytest.approx(30 / (48 * 48))
    with pytest.raises(UserError, match="not 'other'"):
        read_min_anomaly_size(written, "other")
    assert "widget.json" in capsys.readouterr().out


def test_command_replaces_only_its_own_file(tmp_path: Path, capsys):
    """``--output`` is claimed before the masks are read: a user's file stays, an earlier size file
    is replaced, ``--overwrite`` replaces any file but never writes into a folder."""
    root = make_mvtec_category(tmp_path / "mvtec", n_train=2, n_good=1, n_bad=2)
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": 1}\n')
    argv = ["--data.root", str(root), "--data.category", "widget", "--output"]
    assert min_size_main([*argv, str(notes)]) == 2
    assert capsys.readouterr().err == (
        f"error: --output {notes} already exists and was not written by anomaly min-anomaly-size: give "
        "another name, or --overwrite to replace it\n"
    )
    assert notes.read_text() == '{"mine": 1}\n'
    assert min_size_main([*argv, str(notes), "--overwrite"]) == 0
    assert json.loads(notes.read_text())["n_masks"] == 2
    assert min_size_main([*argv, str(notes)]) == 0  # a rerun replaces the file it wrote
    assert min_size_main([*argv, str(tmp_path)]) == 2
    assert f"--output {tmp_path} is a folder" in capsys.readouterr().err


def test_command_without_masks_names_the_manual_option(tmp_path: Path, capsys):
    root = make_mvtec_category(tmp_path / "mvtec", masks=False)
    code = min_size_main(
        ["--data.root", str(root), "--data.category", "widget", "--output", str(tmp_path / "x")]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "no ground-truth masks" in err and "--model.min_anomaly_size" in err
    assert not (tmp_path / "x").exists()


def test_missing_size_file_says_how_to_create_it(tmp_path: Path):
    with pytest.raises(UserError, match=r"anomaly\.tools\.min_anomaly_size.*--model\.min_anomaly_size"):
        read_min_anomaly_size(tmp_path / "none.json", "widget")


@pytest.mark.real_data
def test_bottle_copy_without_masks_gives_the_manual_option(tmp_path: Path, capsys):
    bottle = require(BOTTLE)
    copy = tmp_path / "mvtec" / "bottle"
    copy.mkdir(parents=True)
    for split in ("train", "test"):  # the real images, without ground_truth/
        (copy / split).symlink_to(bottle / split, target_is_directory=True)
    code = min_size_main(
        ["--data.root", str(copy.parent), "--data.category", "bottle", "--output", str(tmp_path / "b")]
    )
    assert code == 2 and "--model.min_anomaly_size" in capsys.readouterr().err


@pytest.mark.real_data
def test_bottle_masks_give_a_minimum_anomaly_size(tmp_path: Path):
    root = require(BOTTLE).parent
    out = tmp_path / "b"
    assert min_size_main(["--data.root", str(root), "--data.category", "bottle", "--output", str(out)]) == 0
    assert read_min_anomaly_size(out, "bottle") > 0
