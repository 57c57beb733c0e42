"""The detector file: a run saves it, loading it reproduces the run's scores, it holds no pickles."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from anomaly.cli import main
from anomaly.commands import main as anomaly_main
from anomaly.detector import GaussianDetector, read_detector, save_run_detector
from anomaly.detector.file import VERSION, seal
from anomaly.errors import UserError
from anomaly.methods.gaussian.module import GaussianAD
from anomaly.pooling import GridMaps
from anomaly.stats.gaussian import fit_gaussian
from anomaly.stats.low_rank import LowRankPrecision
from anomaly.stats.moments import RunningMoments
from tests.conftest import FEW_HELD_OUT
from tests.detector.helpers import demo_images, fit_demo_detector

FAST = ["--config", "paper", "--model.backbone", "efficientnet-lite0", "--data.num_workers", "0"]
FAST += ["--data.batch_size", "8"]


@pytest.mark.slow
@FEW_HELD_OUT
def test_run_saves_detector_that_reproduces_scores_csv(tiny_mvtec: Path, tmp_path: Path):
    root = tmp_path / "runs"
    args = ["--data.root", str(tiny_mvtec), "--data.category", "widget", "--model.levels", "[3, 5, 9]",
            "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false"]  # fmt: skip
    assert main([*FAST, *args]) == 0
    run_dir = root / "gaussian" / "efficientnet-lite0_levels-3-5-9" / "widget" / "fold_0"
    meta = json.loads((run_dir / "detector.json").read_text())
    assert meta["backbone"] == "efficientnet-lite0" and meta["levels"] == [3, 5, 9]
    assert meta["weights"]["kind"] == "packaged" and len(meta["weights"]["sha256"]) == 64
    assert meta["preprocessing"]["image_size"] == 224 and meta["decision_score"] == "mahalanobis/sum"
    assert isinstance(meta["threshold"], float)  # the module's working point on its decision score
    tensors, _ = read_detector(run_dir / "detector.safetensors")
    assert not [key for key in tensors if key.startswith("backbone.")]  # weights are referenced, not stored
    precisions = sum(d * d * 8 for d in (24, 80, 1280))
    # little beside them and the streamed moments (a scatter matrix per level, to learn more)
    assert (run_dir / "detector.safetensors").stat().st_size < 2.1 * precisions

    shutil.rmtree(tiny_mvtec / "widget" / "train")  # loading needs no training image
    detector = GaussianDetector.load(run_dir / "detector.safetensors")
    assert detector.threshold_ == meta["threshold"]
    with open(run_dir / "scores.csv") as file:
        rows = list(csv.DictReader(file))
    detector.batch_size = 8  # the run's batch size: identical arithmetic, identical digits
    columns = detector.score_columns([row["path"] for row in rows])
    assert len(columns) == 3 * 4
    for name, values in columns.items():
        assert [row[name.replace("/", "_")] for row in rows] == [f"{v:.10g}" for v in values], name


def test_reduced_projection_round_trip(tmp_path: Path):
    rng = np.random.default_rng(1)
    train = torch.as_tensor(rng.normal(size=(50, 8)))
    detector = GaussianDetector(backbone=None, fpr=None).fit(train.numpy())
    projection = torch.linalg.qr(torch.as_tensor(rng.normal(size=(8, 3))))[0]  # (D, k) as after PCA
    moments = RunningMoments(3)
    moments.update(train @ projection)
    detector.model_.scorers[0].set_fit(fit_gaussian(moments.moments()), projection)
    new = rng.normal(size=(5, 8))
    loaded = GaussianDetector.load(detector.save(tmp_path / "pca.safetensors"))
    scorer = loaded.model_.scorers[0]
    assert (
        scorer.projection.shape == (8, 3) and scorer.mean.shape == (3,) and scorer.precision.shape == (3, 3)
    )
    np.testing.assert_allclose(loaded.score_samples(new), detector.score_samples(new), rtol=1e-12)


def test_file_is_safetensors_with_json_header_and_rejects_pickles(tmp_path: Path):
    detector = GaussianDetector(backbone=None).fit(np.random.default_rng(0).normal(size=(20, 4)))
    path = detector.save(tmp_path / "d.safetensors")
    with safe_open(str(path), framework="pt") as file:
        assert json.loads(file.metadata()["detector"])["format"] == "gaussian-anomaly-detector"
        # an unreduced level's identity projection is left out; tensors are named by level number
        assert sorted(file.keys()) == sorted(
            [f"level.1.{n}" for n in ("mean", "precision", "std", "shrinkage")]
            + [f"moments.1.{n}" for n in ("count", "shift", "sum", "outer", "sqnorm_vec", "quartic")]
        )
    tensors, meta = read_detector(tmp_path / "d.json")  # the readable copy points at the same detector
    assert meta["backbone"] is None and tensors["level.1.mean"].shape == (4,)
    pickled = tmp_path / "evil.safetensors"
    torch.save({"level.0.mean": torch.zeros(4)}, pickled)
    with pytest.raises(UserError, match="not a readable detector file"):
        GaussianDetector.load(pickled)
    with pytest.raises(UserError, match="not found"):
        GaussianDetector.load(tmp_path / "missing.safetensors")


@pytest.mark.slow
def test_weights_are_referenced_checked_or_embedded(tmp_path: Path):
    _, good, _ = demo_images()
    weights = tmp_path / "my_backbone.pth"
    reference = fit_demo_detector()
    torch.save(reference.model_.extractor.net.state_dict(), weights)
    detector = fit_demo_detector(weights=str(weights))
    scores = detector.score_samples(good)
    np.testing.assert_allclose(scores, reference.score_samples(good), rtol=1e-12)

    path = detector.save(tmp_path / "file_ref.safetensors")
    assert read_detector(path)[1]["weights"]["kind"] == "file"
    np.testing.assert_allclose(GaussianDetector.load(path).score_samples(good), scores, rtol=1e-9)

    embedded = detector.save(tmp_path / "embedded.safetensors", embed_weights=True)
    assert embedded.stat().st_size > 10 * path.stat().st_size
    weights.unlink()  # embedded weights need no file
    np.testing.assert_allclose(GaussianDetector.load(embedded).score_samples(good), scores, rtol=1e-9)

    state = reference.model_.extractor.net.state_dict()
    state["_conv_stem.weight"] = state["_conv_stem.weight"] * 1.01
    torch.save(state, weights)  # same path, different weights
    with pytest.raises(UserError, match="differ from those the detector was fitted with"):
        GaussianDetector.load(path)


def without(key: str):
    return lambda meta: meta.pop(key)


def setting(key: str, value):
    return lambda meta: meta.update({key: value})


DAMAGES = {
    "backbone missing": ("'backbone' is missing", without("backbone")),
    "levels missing": ("'levels' is missing", without("levels")),
    "image_size -3": ("'preprocessing.image_size'", lambda meta: meta["preprocessing"].update(image_size=-3)),
    "image_size text": (
        "'preprocessing.image_size'",
        lambda meta: meta["preprocessing"].update(image_size="a"),
    ),
    "no preprocessing": ("'preprocessing'", setting("preprocessing", None)),
    "backbone number": ("'backbone'", setting("backbone", 7)),
    "weights list": ("'weights'", setting("weights", [])),
    "levels empty": ("'levels'", setting("levels", [])),
    "levels text": ("'levels'", setting("levels", ["2", "4"])),
    "score unknown": ("'decision_score'", setting("decision_score", "cosine/sum")),
    "score level not fitted": ("'decision_score'", setting("decision_score", "mahalanobis/7")),
    "threshold text": ("'threshold'", setting("threshold", "high")),
    "fpr out of range": ("'fpr'", setting("fpr", 2.0)),
    "map threshold text": ("'map_threshold'", setting("map_threshold", "hot")),
    "map floor infinite": ("'map_floor'", setting("map_floor", float("inf"))),
    "version text": ("'version'", setting("version", "1")),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_metadata_is_one_user_error_naming_file_and_field(tmp_path: Path, damage: str):
    tensors, meta = read_detector(fit_demo_detector().save(tmp_path / "good.safetensors"))
    field, edit = DAMAGES[damage]
    edit(meta)
    path = tmp_path / "damaged.safetensors"
    save_file(tensors, str(path), metadata={"detector": json.dumps(meta)})
    with pytest.raises(UserError) as info:
        GaussianDetector.load(path)
    message = str(info.value)
    assert str(path) in message and f"field {field}" in message and len(message.splitlines()) == 1


def test_a_run_that_never_fitted_saves_no_detector(tmp_path: Path):
    model = GaussianAD("efficientnet-lite0", levels=[2])
    with pytest.raises(UserError, match="the detector is not fitted"):
        save_run_detector(model, 224, tmp_path)
    assert list(tmp_path.iterdir()) == []


def dense_layout(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A file's tensors as formats 1-4 held them: every precision ``D x D``, every moment ``outer``."""
    dense = {}
    for name, value in tensors.items():
        level, _, field = name.rpartition(".")
        if field == "basis":
            form = LowRankPrecision(
                value, tensors[f"{level}.basis_precision"], tensors[f"{level}.residual_precision"]
            )
            dense[f"{level}.precision"] = form.dense()
        elif field == "rows":
            dense[f"{level}.outer"] = value.T @ value
        elif field not in ("basis_precision", "residual_precision"):
            dense[name] = value
    return dense


def test_an_older_format_loads_as_it_was_and_a_newer_one_asks_for_an_upgrade(tmp_path: Path, capsys):
    """Files are written in format VERSION (5: a level's precision in low-rank form and its rows
    instead of its second moments, where it saw fewer images than dimensions); a format 3 file (a
    level both coarse and fine, a list of fine grid sizes: format 4) with every precision and moment
    dense loads and scores as before, and learns the same; a file of a format newer than the
    reader's is refused with one line asking for an upgrade, not with an error about its content."""
    pooling = GridMaps(2, coarse_levels=[4], fine_levels=[2, 4], fine_grid_size=[3, 2], fine_weight=0.5)
    detector = fit_demo_detector(pooling=pooling)
    tensors, meta = read_detector(detector.save(tmp_path / "now.safetensors"))
    assert VERSION == 5 and meta["version"] == VERSION
    assert meta["pooling"]["coarse_levels"] == [4] and meta["pooling"]["fine_grid_size"] == [3, 2]
    assert {"level.2.basis", "moments.2.joint.rows"} <= set(tensors) and "level.2.precision" not in tensors
    tensors = dense_layout(tensors)

    def written_as(version: int) -> Path:
        path = tmp_path / f"v{version}.safetensors"
        save_file(
            tensors, str(path), metadata={"detector": json.dumps(seal({**meta, "version": version}, tensors))}
        )
        return path

    old = GaussianDetector.load(written_as(3))
    assert old.model_.pooling == pooling and old.model_.scorers[0].low_rank is None
    _, good, bad = demo_images()
    np.testing.assert_allclose(old.score_samples(good + bad), detector.score_samples(good + bad), rtol=1e-9)
    np.testing.assert_allclose(
        old.partial_fit(bad[:2]).score_samples(good),
        detector.partial_fit(bad[:2]).score_samples(good),
        rtol=1e-9,
    )

    newer = written_as(VERSION + 1)
    with pytest.raises(UserError) as info:
        GaussianDetector.load(newer)
    assert str(info.value) == f"{newer} was written by a newer version (format {VERSION + 1}): upgrade"
    out = tmp_path / "predicted.csv"
    args = ["predict", "--detector", str(newer), "--input", str(good[0]), "--out", str(out)]
    assert anomaly_main(args) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"error: {info.value}"] and not out.exists()


def test_a_loaded_detector_holds_one_copy_of_its_statistics_that_the_file_cannot_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The loaded detector's matrices are the tensors read from the file, not copies of them (a
    second copy doubled the memory of ``anomaly predict``), and they are its own memory, not a
    mapping of the file: the file overwritten in place (``cp`` onto it) changes nothing in a
    loaded detector, and learning more changes the model, never the file."""
    import anomaly.detector.io as detector_io

    pooling = GridMaps(2, coarse_levels=[4], fine_levels=[2, 4], fine_grid_size=[3, 2], fine_weight=0.5)
    path = fit_demo_detector(pooling=pooling).save(tmp_path / "detector.safetensors")
    written = path.read_bytes()
    read: list[tuple[dict[str, torch.Tensor], dict]] = []
    original = detector_io.read_detector
    monkeypatch.setattr(detector_io, "read_detector", lambda p: read.append(original(p)) or read[-1])
    loaded = GaussianDetector.load(path)
    file_memory = {t.data_ptr() for t in read[-1][0].values()}
    statistics = [
        (name, t)
        for name, t in loaded.model_.named_buffers()
        if t.ndim >= 2 and t.numel() > 0 and name.startswith(("scorers.", "moments."))
    ]
    assert any(name.startswith("moments.") for name, _ in statistics)
    assert any(name.endswith("fine_precision") for name, _ in statistics)
    copies = [name for name, t in statistics if t.data_ptr() not in file_memory]
    assert not copies, f"copied on loading: {copies}"
    _, good, bad = demo_images()
    before = loaded.score_samples(good + bad)
    with open(path, "r+b") as file:  # in place, as cp does: the same inode, zeros for the statistics
        file.seek(len(written) // 2)
        file.write(bytes(len(written) - len(written) // 2))
    np.testing.assert_array_equal(loaded.score_samples(good + bad), before)
    path.write_bytes(written)
    loaded.partial_fit(good[:2])
    assert path.read_bytes() == written
