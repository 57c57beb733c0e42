"""predict.py: a folder, a glob or one file in; one CSV row per image out, corrupt files included."""

from __future__ import annotations

import csv
import io
import shutil
from pathlib import Path

import numpy as np
import pytest

from anomaly.detector.predict import predict_files
from predict import main
from tests.detector.helpers import demo_images, fit_demo_detector


@pytest.fixture(scope="module")
def detector_file(tmp_path_factory) -> Path:
    return fit_demo_detector().save(tmp_path_factory.mktemp("detector") / "detector.safetensors")


@pytest.fixture
def new_images(tmp_path: Path) -> Path:
    _, good, bad = demo_images()
    folder = tmp_path / "incoming"
    (folder / "line2").mkdir(parents=True)
    for i, path in enumerate(good + bad):
        shutil.copy(path, folder / ("line2" if i % 2 else "") / f"part_{i}.png")
    (folder / "part_5_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (folder / "notes.txt").write_text("not an image")
    return folder


def read_rows(path: Path) -> list[dict]:
    with open(path) as file:
        return list(csv.DictReader(file))


def test_folder_with_corrupt_file(detector_file: Path, new_images: Path, tmp_path: Path, capsys):
    out = tmp_path / "scores.csv"
    code = main(["--detector", str(detector_file), "--input", str(new_images), "--out", str(out),
                 "--batch-size", "3"])  # fmt: skip
    assert code == 0
    rows = read_rows(out)
    assert list(rows[0]) == ["path", "score", "mahalanobis_2", "mahalanobis_4", "decision", "error"]
    assert len(rows) == 9  # 8 images + the corrupt one; notes.txt is not an image
    corrupt = [row for row in rows if Path(row["path"]).name == "part_5_corrupt.png"]
    assert len(corrupt) == 1 and corrupt[0]["score"] == "" and "cannot read image" in corrupt[0]["error"]
    scored = [row for row in rows if not row["error"]]
    from anomaly.detector import GaussianDetector

    detector = GaussianDetector.load(detector_file)
    expected = detector.score_samples([row["path"] for row in scored])
    scores = np.array([float(row["score"]) for row in scored])
    np.testing.assert_allclose(scores, expected, rtol=1e-6)
    levels = np.array([[float(row["mahalanobis_2"]), float(row["mahalanobis_4"])] for row in scored])
    np.testing.assert_allclose(levels.sum(axis=1), scores, rtol=1e-6)
    assert [int(row["decision"]) for row in scored] == list((scores > detector.threshold_).astype(int))
    err = capsys.readouterr().err
    assert "8 images" in err and "1 unreadable" in err and "threshold" in err


def test_glob_and_single_file(detector_file: Path, new_images: Path, tmp_path: Path):
    out = tmp_path / "glob.csv"
    assert main(["--detector", str(detector_file), "--input", str(new_images / "**" / "part_[0-3].png"),
                 "--out", str(out), "--no-progress"]) == 0  # fmt: skip
    assert sorted(Path(row["path"]).name for row in read_rows(out)) == [f"part_{i}.png" for i in range(4)]
    one = tmp_path / "one.csv"
    assert main(["--detector", str(detector_file), "--input", str(new_images / "notes.txt"),
                 "--out", str(one), "--no-progress"]) == 0  # fmt: skip
    (row,) = read_rows(one)
    assert row["score"] == "" and "not an image file" in row["error"]


def test_detector_without_threshold_leaves_decision_empty(tmp_path: Path, new_images: Path, capsys):
    detector = fit_demo_detector(fpr=None)
    path = detector.save(tmp_path / "no_threshold.safetensors")
    out = tmp_path / "scores.csv"
    assert main(["--detector", str(path), "--input", str(new_images / "line2"), "--out", str(out)]) == 0
    assert {row["decision"] for row in read_rows(out)} == {""}
    assert "no threshold" in capsys.readouterr().err


def test_rows_already_scored_survive_a_failure(detector_file: Path, new_images: Path):
    from anomaly.detector import GaussianDetector

    detector = GaussianDetector.load(detector_file)
    score_images, calls = detector.model_.score_images, []

    def fail_on_second_batch(images):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("device lost")
        return score_images(images)

    detector.model_.score_images = fail_on_second_batch
    out = io.StringIO()
    paths = sorted(new_images.glob("*.png"))
    with pytest.raises(RuntimeError, match="device lost"):
        predict_files(detector, paths, out, batch_size=2, progress=False)
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 + 2 and all(line.split(",")[1] for line in lines[1:])


def test_bad_detector_path_is_one_line(tmp_path: Path, capsys):
    assert main(["--detector", str(tmp_path / "none.safetensors"), "--input", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: detector file not found") and "Traceback" not in err
