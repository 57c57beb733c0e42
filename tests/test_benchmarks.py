"""`anomaly benchmark` runs and writes its table (a smoke test; the numbers are not judged here)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_throughput_and_finalisation_rows(tiny_mvtec: Path, tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    table = out / "table.md"
    done = subprocess.run(
        [sys.executable, "-m", "anomaly", "benchmark", "--root", str(tiny_mvtec), "--category", "widget",
         "--only", "14", "--images", "16", "--batch-size", "8", "--workers", "0", "--out", str(table)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in table.read_text().splitlines() if line.startswith(("| 1 ", "| 4 "))]
    assert len(rows) == 4, rows
    ratios = [float(r) for r in re.findall(r"\*\*([0-9.]+)×\*\*", rows[0] + rows[1])]
    assert len(ratios) == 2 and all(0 < r < 10 for r in ratios)
    assert "1792:" in rows[3]  # efficientnet-b4's widest level
    assert list(out.iterdir()) == [table]


@pytest.mark.slow
def test_the_gpu_recipes_backbone_runs_offline_with_random_weights(tiny_mvtec: Path, tmp_path: Path):
    """efficientnet-b4 at 380 px, as on a GPU, on a machine without the weights download."""
    table = tmp_path / "table.md"
    done = subprocess.run(
        [sys.executable, "-m", "anomaly", "benchmark", "--root", str(tiny_mvtec), "--category", "widget",
         "--backbone", "efficientnet-b4", "--random-weights", "--only", "1", "--images", "4",
         "--batch-size", "4", "--workers", "0", "--out", str(table)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    text = table.read_text()
    assert "efficientnet-b4" in text and "random weights" in text
    assert len([line for line in text.splitlines() if line.startswith("| 1 ")]) == 3


def test_a_wrong_root_or_category_is_one_line(tiny_mvtec: Path, tmp_path: Path, capsys):
    from anomaly.tools.benchmark import main

    assert main(["--root", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: --root '{tmp_path / 'nope'}' does not exist: give the folder holding the MVTec AD categories"
    ]
    assert main(["--root", str(tiny_mvtec), "--category", "nut", "--quick"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: unknown category 'nut'")


def test_out_never_replaces_a_file_of_another_origin(tmp_path: Path, capsys):
    """The table is claimed before any work: a file the command did not write stays as it was."""
    from anomaly.tools.benchmark import main

    notes = tmp_path / "notes.md"
    notes.write_text("my notes\n")
    assert main(["--root", str(tmp_path / "nope"), "--out", str(notes)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "already exists and was not written by anomaly benchmark" in line
    assert notes.read_text() == "my notes\n"
