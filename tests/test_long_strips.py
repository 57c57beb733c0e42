"""benchmarks/long_strips.py: the folders it fills and the runs it compares (``anomaly fit`` stubbed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import load_benchmark, make_mvtec_category

long_strips = load_benchmark("long_strips")


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_build_fills_a_new_folder_whole_and_never_one_of_other_files(tmp_path: Path, capsys):
    mvtec = make_mvtec_category(tmp_path / "mvtec", category="bottle", n_train=2, n_good=1, n_bad=2)
    bottle = mvtec / "bottle"
    argv = ["build", "--bottle", str(bottle), "--out", str(tmp_path / "strips"), "--strip-height", "16"]
    assert long_strips.main(argv) == 0
    base = tmp_path / "strips" / "bottle_strips"
    assert capsys.readouterr().out.startswith(f"wrote {base}: 6 train, ")
    assert [p.name for p in (tmp_path / "strips").iterdir()] == ["bottle_strips"]  # no temporary beside it
    before = snapshot(base)
    assert len(before) > 6
    assert long_strips.main(argv) == 2
    assert capsys.readouterr().err == (
        f"error: --out {base} already exists and is not empty: benchmarks/long_strips.py build fills only a "
        "new or empty folder; give another name, or remove it\n"
    )
    assert snapshot(base) == before


def test_subset_into_a_folder_it_filled_before_is_one_line(tmp_path: Path, capsys):
    """A second ``subset`` into the same folder was a traceback (FileExistsError) after half its links."""
    for folder in ("MT_Free", "MT_Blowhole"):
        for name in ("a", "b"):
            (tmp_path / "mt" / folder / "Imgs").mkdir(parents=True, exist_ok=True)
            (tmp_path / "mt" / folder / "Imgs" / f"{folder}_{name}.jpg").write_bytes(b"jpg")
    argv = ["subset", "--source", str(tmp_path / "mt"), "--out", str(tmp_path / "small"), "--every", "1", "2"]
    assert long_strips.main(argv) == 0
    links = sorted(str(p.relative_to(tmp_path / "small")) for p in (tmp_path / "small").rglob("*.jpg"))
    assert links == [
        "MT_Blowhole/Imgs/MT_Blowhole_a.jpg", "MT_Free/Imgs/MT_Free_a.jpg", "MT_Free/Imgs/MT_Free_b.jpg",
    ]  # fmt: skip
    capsys.readouterr()
    assert long_strips.main(argv) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: --out {tmp_path / 'small'} already exists and is not empty")


@pytest.fixture
def fits(monkeypatch) -> list[list[str]]:
    """``anomaly fit`` stubbed: it logs a line and writes its results.json; returns the commands run."""
    commands = []

    def call(command: list[str], stdout, stderr, cwd) -> int:
        commands.append(command)
        root = Path(command[command.index("--trainer.default_root_dir") + 1])
        (root / "gaussian" / "fold_0").mkdir(parents=True, exist_ok=True)
        results = {"image_auroc": 0.9, "pixel_auroc": None, "n_train": 8, "n_test": 4, "n_test_anomalous": 2}
        (root / "gaussian" / "fold_0" / "results.json").write_text(json.dumps(results))
        stdout.write(f"fitted {root.name}\n")
        return 0

    monkeypatch.setattr(long_strips.subprocess, "call", call)
    return commands


def test_compare_reruns_into_its_own_runs_folder(fits, tmp_path: Path, capsys):
    runs = tmp_path / "runs"
    argv = ["compare", "--root", str(tmp_path), "--configs", "default", "--runs", str(runs), "--layouts"]
    assert long_strips.main([*argv, "stretch"]) == 0
    assert long_strips.main([*argv, "stretch", "pad"]) == 0  # a rerun replaces its own runs and logs
    written = json.loads((runs / "comparison.json").read_text())
    assert written["written_by"] == "benchmarks/long_strips.py compare"
    assert [(r["layout"], r["image_auroc"]) for r in written["rows"]] == [("stretch", 0.9), ("pad", 0.9)]
    assert (runs / "default-stretch.log").read_text() == "fitted default-stretch\n"
    assert sorted(p.name for p in runs.iterdir() if not p.name.startswith(".")) == [
        "comparison.json", "default-pad", "default-pad.log", "default-stretch", "default-stretch.log",
    ]  # fmt: skip
    assert len(fits) == 3


def test_compare_never_writes_into_a_folder_of_other_files(fits, tmp_path: Path, capsys):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "comparison.json").write_text("my notes\n")
    argv = ["compare", "--root", str(tmp_path), "--configs", "default", "--runs", str(tmp_path / "runs")]
    assert long_strips.main(argv) == 2
    assert capsys.readouterr().err == (
        f"error: --runs {tmp_path / 'runs'} holds files that benchmarks/long_strips.py compare did not write "
        "(e.g. comparison.json): give a new or empty folder\n"
    )
    assert snapshot(tmp_path / "runs") == {"comparison.json": b"my notes\n"} and fits == []
