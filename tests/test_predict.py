"""predict.py: a folder, a glob or one file in; one CSV row per image out, corrupt files included."""

from __future__ import annotations

import csv
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from anomaly.console import Terminated
from anomaly.detector.model import DetectorModel
from anomaly.detector.predict import predict_files
from predict import main
from tests.detector.helpers import demo_images, fit_demo_detector

# The input folders hold a text file on purpose: predict skips it, with a warning.
pytestmark = pytest.mark.filterwarnings("ignore:.*skipped 1 file\\(s\\) that are not readable images")


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


#: A CSV of an earlier run, which a rerun may replace.
EARLIER = "path,score,decision,error\nold.png,1.0,0,\n"


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
    expected = detector.decision_function([row["path"] for row in scored])
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
    assert main(["--detector", str(detector_file), "--input", str(new_images / "part_0.png"),
                 "--out", str(one), "--no-progress"]) == 0  # fmt: skip
    (row,) = read_rows(one)
    assert row["score"] and not row["error"]


def test_excluded_names_are_left_out(detector_file: Path, new_images: Path, tmp_path: Path):
    """E.g. masks stored beside the images (Magnetic-Tile-Defect: X.jpg with its mask X.png)."""
    out = tmp_path / "some.csv"
    assert main(["--detector", str(detector_file), "--input", str(new_images), "--exclude", "*corrupt*",
                 "--exclude", "part_[0-3].png", "--out", str(out), "--no-progress"]) == 0  # fmt: skip
    names = sorted(Path(row["path"]).name for row in read_rows(out))
    assert names == [f"part_{i}.png" for i in range(4, 8)]


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
        predict_files(detector.model_, paths, out, batch_size=2, progress=False)
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 + 2 and all(line.split(",")[1] for line in lines[1:])


def test_bad_detector_path_is_one_line(tmp_path: Path, capsys):
    assert main(["--detector", str(tmp_path / "none.safetensors"), "--input", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: detector file not found") and "Traceback" not in err


def assert_one_line_error(capsys, *fragments: str) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in captured.err, lines
    assert all(fragment in lines[0] for fragment in fragments), lines[0]
    assert captured.out == ""
    return lines[0]


def assert_no_output(folder: Path) -> None:
    """Neither the CSV nor a temporary file beside it."""
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize(
    ("device", "fragments"),
    [("cuda", ("'cuda'", "--device cpu")), ("cuda:0", ("'cuda:0'", "--device cpu")), ("gpu!", ("'gpu!'",))],
)
def test_unavailable_or_malformed_device_is_one_line(
    detector_file: Path, new_images: Path, tmp_path: Path, capsys, monkeypatch, device, fragments
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on a machine with a GPU
    out = tmp_path / "out" / "scores.csv"
    args = ["--detector", str(detector_file), "--input", str(new_images), "--out", str(out)]
    assert main([*args, "--device", device]) == 2
    assert_one_line_error(capsys, *fragments)
    assert not out.parent.exists()


@pytest.mark.parametrize(
    ("option", "value"), [("--batch-size", "0"), ("--batch-size", "-1"), ("--num-workers", "-2")]
)
def test_bad_loader_options_are_one_line_and_leave_no_file(
    detector_file: Path, new_images: Path, tmp_path: Path, capsys, option, value
):
    out = tmp_path / "out" / "scores.csv"
    args = ["--detector", str(detector_file), "--input", str(new_images), "--out", str(out)]
    assert main([*args, option, value]) == 2
    assert_one_line_error(capsys, option, value)
    assert not out.parent.exists()


def test_empty_input_leaves_no_file(detector_file: Path, tmp_path: Path, capsys):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out" / "scores.csv"
    args = ["--detector", str(detector_file), "--input", str(tmp_path / "empty"), "--out", str(out)]
    assert main(args) == 2
    assert_one_line_error(capsys, "no image files found")
    assert_no_output(out.parent)


def test_nothing_readable_is_an_error(detector_file: Path, new_images: Path, tmp_path: Path, capsys):
    only_bad = tmp_path / "only_bad"
    only_bad.mkdir()
    (only_bad / "a.png").write_bytes(b"not a png")
    shutil.copy(new_images / "part_5_corrupt.png", only_bad / "b.png")
    out = tmp_path / "out" / "scores.csv"
    base = ["--detector", str(detector_file), "--no-progress", "--out", str(out)]
    assert main([*base, "--input", str(only_bad), "--batch-size", "1"]) == 2
    assert_one_line_error(capsys, "no image could be scored", "all 2 input file(s)", "a.png", "cannot read")
    assert_no_output(out.parent)
    assert main([*base, "--input", str(new_images / "notes.txt")]) == 2
    assert_one_line_error(capsys, "all 1 input file(s)", "notes.txt", "not an image file")
    assert_no_output(out.parent)
    # to standard output: not even the header
    assert main(["--detector", str(detector_file), "--no-progress", "--input", str(only_bad)]) == 2
    assert_one_line_error(capsys, "all 2 input file(s)")


def fail_on_batch_two(monkeypatch, error: BaseException) -> None:
    score_images, calls = DetectorModel.score_images, []

    def failing(self, images):
        calls.append(1)
        if len(calls) == 2:
            raise error
        return score_images(self, images)

    monkeypatch.setattr(DetectorModel, "score_images", failing)


def test_failure_midway_leaves_earlier_output_untouched(
    detector_file: Path, new_images: Path, tmp_path: Path, monkeypatch
):
    fail_on_batch_two(monkeypatch, RuntimeError("device lost"))
    out = tmp_path / "out" / "scores.csv"
    out.parent.mkdir()
    out.write_text(EARLIER)
    args = ["--detector", str(detector_file), "--input", str(new_images), "--out", str(out)]
    with pytest.raises(RuntimeError, match="device lost"):
        main([*args, "--batch-size", "2"])
    assert out.read_text() == EARLIER
    assert list(out.parent.iterdir()) == [out]  # no temporary file left behind


@pytest.mark.parametrize("stop", [KeyboardInterrupt(), Terminated()], ids=["ctrl-c", "sigterm"])
def test_interrupt_keeps_the_rows_already_scored_beside_an_earlier_result(
    detector_file: Path, new_images: Path, tmp_path: Path, monkeypatch, capsys, stop
):
    fail_on_batch_two(monkeypatch, stop)
    out = tmp_path / "out" / "scores.csv"
    out.parent.mkdir()
    out.write_text(EARLIER)
    args = ["--detector", str(detector_file), "--input", str(new_images), "--out", str(out)]
    assert main([*args, "--batch-size", "2"]) == (130 if isinstance(stop, KeyboardInterrupt) else 143)
    assert out.read_text() == EARLIER  # a partial run never takes a complete result's name
    partial = out.with_name("scores.csv.partial")
    rows = read_rows(partial)
    assert len(rows) == 2 and all(row["score"] for row in rows)
    assert sorted(out.parent.iterdir()) == [out, partial]  # no temporary file left behind
    assert "interrupted: the rows scored so far are in --out's .partial file" in capsys.readouterr().err
