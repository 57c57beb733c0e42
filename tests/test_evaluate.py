"""evaluate.py: tables of mean ± SEM from a folder of runs, warnings for gaps and bad files."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from anomaly.evaluation.evaluate import main
from tests.evaluation.fake_runs import fake_results, working_point_section, write_fake_run

AUROCS = {("bottle", 0): 0.90, ("bottle", 1): 0.94, ("cable", 0): 0.70, ("cable", 1): 0.80}


def make_runs(root: Path) -> None:
    for (category, fold), auroc in AUROCS.items():
        write_fake_run(root, fake_results(category, fold, auroc))


def test_markdown_tables(tmp_path: Path, capsys):
    make_runs(tmp_path)
    assert main([str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert "**gaussian/efficientnet-lite0: image AUROC (± SEM, %) per level**" in out
    assert "| level | mahalanobis | l2 | sed |" in out
    assert "| sum | 83.5 ± 8.5 | 73.5 ± 8.5 | 63.5 ± 8.5 |" in out  # per-category means 92.0 and 75.0
    assert "| bottle | 92.0 |" in out and "| cable | 75.0 |" in out
    assert err == ""


def test_warnings_for_gaps_and_bad_files(tmp_path: Path, capsys):
    make_runs(tmp_path)
    write_fake_run(tmp_path, fake_results("grid", 0, 0.5))
    broken = tmp_path / "gaussian" / "efficientnet-lite0" / "screw" / "fold_0" / "results.json"
    broken.parent.mkdir(parents=True)
    broken.write_text("{not json")
    assert main([str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert f"warning: skipped {broken}: unreadable" in err
    assert "warning: gaussian/efficientnet-lite0: grid lacks folds 1 (its mean is over folds 0 only)" in err
    assert "grid lacks folds 1" in out  # also under the table


def test_groups_by_settings_and_formats(tmp_path: Path, capsys):
    make_runs(tmp_path)
    wp = working_point_section(0.2, 0.9)
    for (category, fold), auroc in AUROCS.items():
        results = fake_results(category, fold, auroc - 0.1, settings={"reduction": "npca"}, working_point=wp)
        write_fake_run(tmp_path, results, "efficientnet-lite0_npca-0.99")
    out_file = tmp_path / "tables.csv"
    assert main([str(tmp_path), "--format", "csv", "--out", str(out_file)]) == 0
    out = capsys.readouterr().out
    assert out_file.read_text() == "# written by anomaly evaluate\n" + out
    blocks = out.split("\n\n")
    assert blocks[1].startswith("# gaussian/efficientnet-lite0_npca-0.99: image AUROC")
    rows = list(csv.reader(io.StringIO(blocks[1].split("\n", 1)[1])))
    assert rows[0][:3] == ["level", "mahalanobis mean", "mahalanobis sem"]
    assert rows[-1][0] == "sum" and float(rows[-1][1]) == 73.5
    assert main([str(tmp_path), "--format", "latex", "--working-points"]) == 0
    latex = capsys.readouterr().out
    assert latex.count(r"\begin{tabular}") == 4  # two level tables, one working-point table, one per category
    assert "working points at level 7" in latex


def test_no_results_is_one_line(tmp_path: Path, capsys):
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no complete results.json below") and len(err.splitlines()) == 1
    assert main([str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("fold", "one", 'fold is "one", not an integer or null'),
        ("fold", True, "fold is true, not an integer or null"),
        ("fold", -1, "fold is -1, not a fold number"),
        ("category", 7, "category is 7, not a string"),
        ("image_auroc", "0.9", 'image_auroc is "0.9", not a number or null'),
        ("scores", {"mahalanobis": {"sum": "x", "per_level": {}}}, "scores.mahalanobis.sum is"),
        ("scores", {"mahalanobis": {"sum": 0.9, "per_level": {"7": [1]}}}, "scores.mahalanobis.per_level.7"),
        ("settings", "fast", "settings is"),
        ("working_point", {"levels": {"7": {"rows": [{"target_fpr": "1%"}]}}}, "target_fpr is"),
    ],
)
def test_fields_of_the_wrong_type_skip_the_file_with_a_warning(tmp_path: Path, capsys, field, value, reason):
    make_runs(tmp_path)
    path = write_fake_run(tmp_path, fake_results("grid", 0, 0.5))
    path.write_text(json.dumps({**json.loads(path.read_text()), field: value}))
    assert main([str(tmp_path), "--working-points"]) == 0
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "grid" not in out
    (line,) = [line for line in err.splitlines() if "skipped" in line]
    assert line.startswith(f"warning: skipped {path}: ") and reason in line
    assert "| sum | 83.5 ± 8.5 |" in out  # the good runs are still tabled


START = {"md": "<!-- written by anomaly evaluate -->\n", "csv": "# written by anomaly evaluate\n"}
START["latex"] = "% written by anomaly evaluate\n"


@pytest.mark.parametrize("fmt", ["md", "csv", "latex"])
def test_out_is_replaced_on_a_rerun_in_any_format(tmp_path: Path, capsys, fmt):
    runs, out_file = tmp_path / "runs", tmp_path / "tables.txt"
    make_runs(runs)
    assert main([str(runs), "--format", "md", "--out", str(out_file)]) == 0  # an earlier table
    out_file.write_text(out_file.read_text() + "a line the rerun drops\n")
    capsys.readouterr()
    assert main([str(runs), "--format", fmt, "--out", str(out_file)]) == 0
    printed = capsys.readouterr().out
    assert out_file.read_text() == START[fmt] + printed  # the printout after one comment line


def test_out_refuses_a_file_it_did_not_write(tmp_path: Path, capsys):
    runs, notes = tmp_path / "runs", tmp_path / "notes.md"
    make_runs(runs)
    notes.write_text("# my notes\n")
    assert main([str(runs), "--out", str(notes)]) == 2
    out, err = capsys.readouterr()
    assert err == f"error: --out {notes} already exists and was not written by anomaly evaluate: " \
        "give another name, or --overwrite to replace it\n"  # fmt: skip
    assert out == "" and notes.read_text() == "# my notes\n"  # refused before any table was made
    assert main([str(runs), "--format", "latex", "--out", str(notes), "--overwrite"]) == 0
    assert notes.read_text() == START["latex"] + capsys.readouterr().out


def test_out_is_never_a_results_json_it_reads(tmp_path: Path, capsys):
    make_runs(tmp_path)
    results = next(tmp_path.rglob("results.json"))
    (tmp_path / "link.json").symlink_to(results)
    before = results.read_bytes()
    for out in (results, tmp_path / "link.json"):
        assert main([str(tmp_path), "--out", str(out), "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --out {out} is ") and "never writes over its input" in err
        assert len(err.splitlines()) == 1 and results.read_bytes() == before
