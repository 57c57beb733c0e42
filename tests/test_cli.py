"""The command line: one fit+test run, and one clear line for each kind of bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import anomaly
from anomaly.cli import main, run_dir_parts
from anomaly.console import format_warning
from anomaly.data import MVTecDataModule
from anomaly.data.augment import AugmentOptions
from anomaly.evaluation.results import OVERLAYS_DIR
from anomaly.methods.gaussian import GaussianAD
from anomaly.runfolder import PREVIOUS_RUN
from tests.conftest import DEFAULT_SWITCHES, FEW_HELD_OUT

pytestmark = [FEW_HELD_OUT, DEFAULT_SWITCHES]

# the paper's detector (these tests read its run folders and messages), small and quick; no figures
# (drawn in tests/evaluation/test_tensorboard.py)
FAST = ["--config", "paper", "--model.backbone", "efficientnet-lite0", "--data.num_workers", "0",
        "--data.batch_size", "8", "--figures", "false"]  # fmt: skip


def run(args: list[str], capsys) -> tuple[int, str, str]:
    code = main([*FAST, *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_fit_and_test_writes_results(tiny_mvtec: Path, tmp_path: Path, capsys, monkeypatch):
    root = tmp_path / "runs"
    args = ["--data.root", str(tiny_mvtec), "--data.category", "widget", "--data.fold", "1",
            "--model.levels", "[3, 5, 9]", "--trainer.default_root_dir", str(root)]  # fmt: skip
    code, out, err = run(args, capsys)
    assert code == 0, err
    run_dir = root / "gaussian" / "efficientnet-lite0_levels-3-5-9" / "widget" / "fold_1"
    results = json.loads((run_dir / "results.json").read_text())
    assert results["method"] == "gaussian" and results["category"] == "widget" and results["fold"] == 1
    assert results["n_train"] == 9 and results["n_test"] == 8
    assert set(results["per_level"]) == {"3", "5", "9"}
    assert set(results["scores"]) == {"mahalanobis", "l2", "sed"}
    assert 0.0 <= results["image_auroc"] <= 1.0
    assert results["image_auroc"] == results["scores"]["mahalanobis"]["sum"]
    lines = (run_dir / "scores.csv").read_text().splitlines()
    assert len(lines) == 1 + 8
    assert lines[0].startswith("path,label,defect,mahalanobis_3,")
    assert list(run_dir.glob("events.out.tfevents.*")), "TensorBoard events are missing"
    stale = run_dir / "events.out.tfevents.0.stale"
    stale.write_bytes(b"")
    (run_dir / OVERLAYS_DIR).mkdir()
    (run_dir / OVERLAYS_DIR / "00_old.png").write_bytes(b"")  # overlays of an earlier spatial run
    assert run(args, capsys)[0] == 0  # a rerun replaces the earlier run's files
    assert not stale.exists() and (run_dir / "results.json").is_file()
    assert not (run_dir / OVERLAYS_DIR).exists()
    assert "sum" in out and str(run_dir) in out
    kept = {name: (run_dir / name).read_bytes() for name in ("detector.safetensors", "results.json")}
    monkeypatch.setattr("anomaly.cli.fit", interrupted)
    assert run(args, capsys)[0] == 130  # an interrupted rerun: the earlier run stays as it was
    assert {name: (run_dir / name).read_bytes() for name in kept} == kept
    assert not (run_dir / PREVIOUS_RUN).exists()


def interrupted(*args) -> None:
    raise KeyboardInterrupt


BAD_INPUT = [
    "missing root",
    "root is a file",
    "unknown category",
    "empty train",
    "unreadable",
    "one image",
    "repeated epochs",
    "unreadable test image",
    "no epochs",
    "fast dev run",
    "limited test",
    "workers",
    "empty config",
    "broken config",
    "levels not a list",
    "image size",
    "fold",
    "levels",
    "weights",
    "unknown option",
    "unknown data option",
    "no close option",
    "trainer value",
    "trainer devices",
    "wrong type",
    "not a bool",
    "stray argument",
]


def bad(tmp_path: Path, tiny_mvtec: Path) -> dict[str, tuple[list[str], str]]:
    widget = ["--data.root", str(tiny_mvtec), "--data.category", "widget"]
    empty = tmp_path / "empty_root" / "widget" / "train" / "good"
    empty.mkdir(parents=True)
    (empty.parent.parent / "test" / "good").mkdir(parents=True)
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "broken.yaml").write_text("model:\n  levels: [5, 7\n")
    single = tmp_path / "single_root" / "widget"
    shutil.copytree(tiny_mvtec / "widget" / "test", single / "test")
    (single / "train" / "good").mkdir(parents=True)
    first = sorted((tiny_mvtec / "widget" / "train" / "good").iterdir())[0]
    shutil.copy(first, single / "train" / "good" / first.name)
    test_broken = tmp_path / "test_broken_root" / "widget"
    shutil.copytree(tiny_mvtec / "widget", test_broken, ignore=shutil.ignore_patterns("999.png"))
    (test_broken / "test" / "good" / "998.png").write_bytes(b"not a png either")
    broken = tiny_mvtec / "widget" / "train" / "good" / "999.png"
    broken.write_bytes(b"not a png")
    return {
        "missing root": (["--data.root", str(tmp_path / "nowhere"), "--data.category", "x"], "not exist"),
        "root is a file": (["--data.root", str(tmp_path / "empty.yaml")], "is a file, not a folder"),
        "unknown category": (["--data.root", str(tiny_mvtec), "--data.category", "nut"], "category 'nut'"),
        "empty train": (["--data.root", str(tmp_path / "empty_root"), "--data.category", "widget"],
                        "no training images"),
        "unreadable": ([*widget, "--data.fold", "null"], "999.png"),
        "one image": (["--data.root", str(single.parent), "--data.category", "widget", "--data.fold", "null"],
                      "at least 2 training images, got 1"),
        "repeated epochs": ([*widget, "--trainer.max_epochs", "3"], "max_epochs 3 without augmentation"),
        "unreadable test image": (["--data.root", str(test_broken.parent), "--data.category", "widget"],
                                  "998.png"),
        "no epochs": ([*widget, "--trainer.max_epochs", "0"], "max_epochs 0 gives no fit"),
        "fast dev run": ([*widget, "--trainer.fast_dev_run", "true"], "fast_dev_run"),
        "limited test": ([*widget, "--trainer.limit_test_batches", "2"], "limit_test_batches 2 would leave"),
        "workers": ([*widget, "--data.num_workers", "-1"], "num_workers must be 0"),
        "image size": ([*widget, "--data.image_size", "0"], "image_size must be a positive"),
        "levels not a list": (["--model.levels", "7"], 'e.g. "[7]" or "[5, 7]" (given: 7)'),
        "empty config": (["--config", str(tmp_path / "empty.yaml")], "empty.yaml is empty: it must map"),
        "broken config": ([f"--config={tmp_path / 'broken.yaml'}"], "broken.yaml: line 3, column 1"),
        "fold": ([*widget, "--data.fold", "7"], "fold"),
        "levels": ([*widget, "--model.levels", "[0, 12]"], "levels"),
        "weights": (["--data.root", str(tiny_mvtec), "--data.category", "widget",
                     "--model.weights", str(tmp_path / "missing.pth")], "missing.pth"),
        "unknown option": (["--model.backbon", "resnet18"],
                           "--model.backbon is not an option of GaussianAD (did you mean --model.backbone?)"),
        "unknown data option": (["--data.fodl", "1"],
                                "--data.fodl is not an option of MVTecDataModule (did you mean --data.fold"),
        "no close option": (["--model.zzz", "1"], "--model.zzz is not an option of GaussianAD; see --help"),
        "trainer value": (["--trainer.max_epochs", "-2"], "--trainer: `max_epochs` must be a non-negative"),
        "trainer devices": (["--trainer.devices", "0"], "--trainer: `Trainer(devices='0')` value is not"),
        "wrong type": (["--data.fold", "two"], "--data.fold: Expected a <class 'int'> (given: two)"),
        "not a bool": (["--figures", "maybe"], "--figures: Expected a <class 'bool'>"),
        "stray argument": (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    }  # fmt: skip


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_gives_one_line_and_no_results(case, tmp_path: Path, tiny_mvtec: Path, capsys):
    args, expected = bad(tmp_path, tiny_mvtec)[case]
    root = tmp_path / "runs"
    code, _, err = run([*args, "--trainer.default_root_dir", str(root)], capsys)
    assert code != 0
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and expected in lines[0], err
    assert "Traceback" not in err and "usage:" not in err
    assert not list(root.rglob("results.json")) and not list(root.rglob("scores.csv"))
    assert not list(root.rglob("detector.*"))  # a fit that could not be tested is not a detector
    assert not root.exists() or not any(root.iterdir())  # not even empty run folders


def test_runs_folder_that_is_a_file_is_one_line(tmp_path: Path, capsys):
    runs = tmp_path / "runs"
    runs.write_text("")
    code, _, err = run(["--trainer.default_root_dir", str(runs)], capsys)
    assert code == 2 and "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert "is a file: give a folder" in line


def test_downloadable_weights_missing_offline_name_the_file(
    tiny_mvtec: Path, tmp_path: Path, monkeypatch, capsys
):
    def offline(url: str, *args, **kwargs) -> None:
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    code, _, err = run(
        ["--data.root", str(tiny_mvtec), "--data.category", "widget", "--model.backbone", "efficientnet-b0",
         "--trainer.default_root_dir", str(tmp_path / "runs")], capsys)  # fmt: skip
    assert code == 2 and "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert "efficientnet-b0" in line and str(tmp_path / "torch") in line and "--model.weights" in line


def test_test_set_of_one_class_warns_and_still_writes_its_scores(tiny_mvtec: Path, tmp_path: Path, capsys):
    only_good = tmp_path / "only_good" / "widget"
    shutil.copytree(tiny_mvtec / "widget", only_good)
    for folder in (only_good / "test").iterdir():
        if folder.name != "good":
            shutil.rmtree(folder)
    root = tmp_path / "runs"
    args = ["--data.root", str(only_good.parent), "--data.category", "widget", "--data.fold", "null",
            "--trainer.default_root_dir", str(root)]  # fmt: skip
    with pytest.warns(UserWarning) as caught:
        code, out, _ = run(args, capsys)
    assert code == 0 and "fold all |" in out
    messages = [str(w.message) for w in caught]
    assert any("only normal images: AUROC is undefined" in m for m in messages), messages
    assert any("no held-out images (fold: null)" in m for m in messages), messages
    run_dir = root / "gaussian" / "efficientnet-lite0" / "widget" / "fold_all"
    assert json.loads((run_dir / "results.json").read_text())["image_auroc"] is None
    assert (run_dir / "scores.csv").is_file()


def test_the_packages_warnings_print_as_one_line():
    inside = str(Path(anomaly.__file__).parent / "methods" / "base.py")
    assert format_warning(UserWarning("no AUROC"), UserWarning, inside, 10) == "warning: no AUROC\n"
    outside = format_warning(UserWarning("other"), UserWarning, "/elsewhere/lib.py", 3)
    assert outside.startswith("/elsewhere/lib.py:3: UserWarning: other")


def test_run_folders_name_what_changes_the_numbers(tmp_path: Path):
    def name(model=None, epochs=1, precision=None, **data) -> str:
        model = model or GaussianAD("efficientnet-lite0", levels=[5, 7])
        dm = MVTecDataModule(str(tmp_path), "widget", **data)
        return run_dir_parts(model, dm, epochs, precision)[0].split("/")[1]

    assert name() == "efficientnet-lite0_levels-5-7"
    assert name(image_size=224) == "efficientnet-lite0_levels-5-7"  # lite0's own resolution
    assert name(image_size=160) == "efficientnet-lite0_levels-5-7_160px"
    assert name(precision="bf16-mixed") == "efficientnet-lite0_levels-5-7_bf16-mixed"
    assert name(precision="32-true") == "efficientnet-lite0_levels-5-7"
    assert name(epochs=100, augment=True) == "efficientnet-lite0_levels-5-7_augment100"
    assert name(epochs=100, augment=True, seed=3) == "efficientnet-lite0_levels-5-7_augment100_seed3"
    switches = AugmentOptions(rotate90=False, max_rotation=15.0)
    assert (
        name(epochs=100, augment=True, augment_options=switches)
        == "efficientnet-lite0_levels-5-7_augment100_max_rotation-15_rotate90-false"
    )
    random = GaussianAD("efficientnet-lite0", pretrained=False)
    assert name(random) == "efficientnet-lite0_random-init"
