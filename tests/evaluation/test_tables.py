"""Table layouts and formats, and the paper's numbers stored as data."""

from __future__ import annotations

import csv
import io
import statistics
from pathlib import Path

import pytest
from scipy import stats

from anomaly.evaluation.aggregate import load_run
from anomaly.evaluation.paper_values import paper_level_value, paper_table, paper_tables
from anomaly.evaluation.tables import (
    LevelColumn,
    Stat,
    category_table,
    emit,
    format_table,
    level_table,
    methods_table,
    working_point_table,
)
from tests.evaluation.fake_runs import fake_results, working_point_section, write_fake_run

AUROCS = {("bottle", 0): 0.90, ("bottle", 1): 0.94, ("cable", 0): 0.70, ("cable", 1): 0.80}


def records(tmp_path: Path, **kwargs) -> list:
    return [
        load_run(write_fake_run(tmp_path, fake_results(c, f, v, **kwargs))) for (c, f), v in AUROCS.items()
    ]


def test_level_table_cells_and_paper_column(tmp_path: Path):
    runs = records(tmp_path)
    columns = [
        LevelColumn(label, runs, t, label) for label, t in (("L2", "l2"), ("Mahalanobis", "mahalanobis"))
    ]
    table = level_table("Table I", columns, paper_table="table1")
    assert table.header == ["level", "L2", "L2 (paper)", "Mahalanobis", "Mahalanobis (paper)"]
    assert [row[0] for row in table.rows] == ["1", "2", "3", "sum"]
    per_category = [0.92, 0.75]
    total = table.rows[-1][table.header.index("Mahalanobis")]
    assert total.mean == pytest.approx(100 * statistics.mean(per_category))
    assert total.sem == pytest.approx(100 * stats.sem(per_category)) and total.mark == ""
    assert table.rows[-1][table.header.index("Mahalanobis (paper)")] == Stat(94.8, 1.6)
    assert table.rows[0][table.header.index("L2 (paper)")] == Stat(44.5, 4.8)
    level_2 = table.rows[1][table.header.index("L2")]  # l2 is 0.1 lower, level 2 another 0.02
    assert level_2.mean == pytest.approx(100 * (statistics.mean(per_category) - 0.12))
    assert "2 categories (bottle, cable)" in table.notes[0]


def test_single_category_is_marked(tmp_path: Path):
    runs = [r for r in records(tmp_path) if r.category == "bottle"]
    table = level_table("t", [LevelColumn("M", runs, "mahalanobis")])
    cell = table.rows[-1][1]
    assert cell.mark == "†" and cell.sem == pytest.approx(100 * stats.sem([0.90, 0.94]))
    assert any("SEM is over its folds" in note for note in table.notes)
    assert "92.0 ± 2.0†" in format_table(table, "md")


def test_formats(tmp_path: Path):
    table = level_table("Table I: 5% of it_x", [LevelColumn("Mahalanobis", records(tmp_path), "mahalanobis")])
    markdown = format_table(table, "md")
    assert "| level | Mahalanobis |" in markdown and "| sum | 83.5 ± 8.5 |" in markdown
    rows = list(csv.reader(io.StringIO(format_table(table, "csv"))))
    assert rows[0] == ["level", "Mahalanobis mean", "Mahalanobis sem"]
    assert rows[-1][0] == "sum" and float(rows[-1][1]) == pytest.approx(83.5)
    assert float(rows[-1][2]) == pytest.approx(100 * stats.sem([0.92, 0.75]), abs=1e-4)
    latex = format_table(table, "latex")
    assert r"\begin{tabular}{lr}" in latex and r"$83.5 \pm 8.5$" in latex
    assert r"5\% of it\_x" in latex
    with pytest.raises(ValueError, match="unknown table format"):
        format_table(table, "html")


def test_category_and_methods_tables(tmp_path: Path):
    runs = records(tmp_path)
    label = "Mahalanobis All Features (EN-B4)"
    table = category_table("VIII", [LevelColumn(label, runs, None, label)], paper_table="table8")
    assert table.header == ["category", label, f"{label} (paper)"]
    assert table.rows[0][:3] == ["bottle", Stat(92.0), Stat(99.8)]
    assert table.rows[-1][0] == "mean ± SEM" and table.rows[-1][2] == Stat(95.2, 1.5)
    methods = methods_table("V", [LevelColumn(label, runs, None, label)])
    assert methods.rows[0][0] == label and methods.rows[0][2] == Stat(95.2, 1.5)
    assert methods.rows[0][1].mean == pytest.approx(83.5)
    assert methods.rows[1][0].startswith("GeoTrans")


def test_working_point_table(tmp_path: Path):
    runs = records(tmp_path, working_point=working_point_section(0.2, 0.9))
    column = LevelColumn("EN-B0 All Features", runs, "mahalanobis", "EN-B0 All Features")
    table = working_point_table("IV", [column], level="7", paper_table="table4")
    assert table.header[:4] == ["n", "target FPR", "EN-B0 All Features FPR", "EN-B0 All Features TPR"]
    names = [row[0] for row in table.rows]
    assert names == ["1", "2", "FPR 1%", "AUROC"]
    assert table.rows[1][2].mean == pytest.approx(10.0)  # chi2 FPR 0.2 / n at n = 2
    assert table.rows[0][4] == Stat(30.4) and table.rows[0][5] == Stat(89.1)
    assert table.rows[-1][4] == Stat(93.2)


def test_paper_tables_are_consistent():
    tables = paper_tables()
    assert set(tables) == {"table1", "table2", "table3", "table4", "table5", "table7", "table8"}
    for name in ("table1", "table2", "table3", "table7"):
        for column, cells in tables[name]["columns"].items():
            levels = [lv for lv in cells if lv != "sum"]
            assert levels == [str(i) for i in range(1, len(levels) + 1)] and "sum" in cells, (name, column)
    # the same experiment appears in three tables
    assert tables["table1"]["columns"]["Mahalanobis"] == tables["table2"]["columns"]["EfficientNet-B4"]
    assert tables["table1"]["columns"]["Mahalanobis"] == tables["table3"]["columns"]["No compression"]
    # Table VIII: mean and SEM follow from the 15 (rounded) categories, and match Table V
    table5 = {(r["approach"], r["architecture"]): (r["mean"], r["sem"]) for r in tables["table5"]["rows"]}
    for column, entry in tables["table8"]["columns"].items():
        values = list(entry["per_category"].values())
        assert len(values) == 15, column
        assert statistics.mean(values) == pytest.approx(entry["mean"], abs=0.1), column
        assert stats.sem(values) == pytest.approx(entry["sem"], abs=0.1), column
        assert (entry["mean"], entry["sem"]) in table5.values(), column
    # spot checks against the text
    assert paper_level_value("table1", "SED", "sum") == (79.5, 6.6)
    assert paper_level_value("table2", "EfficientNet-B7", "7") == (96.3, 1.6)
    assert paper_level_value("table3", "NPCA 0.01%", "1") == (69.9, 6.2)
    assert paper_level_value("table7", "ResNet-34", "4") == (90.4, 3.6)
    assert paper_table("table4")["columns"]["EN-B4 NPCA 1%"]["fpr"]["3"] == 18.9
    assert paper_table("table4")["columns"]["EN-B4 All Features"]["auroc"] == 97.1
    assert tables["table8"]["columns"]["oc-SVM EN-B0"]["per_category"]["screw"] == 19.5
    assert paper_level_value("table1", "L2", "10") is None


def test_emit_creates_the_folders_of_out(tmp_path: Path, capsys):
    out = tmp_path / "missing" / "deeper" / "tables.tex"
    emit("a table", ["a gap"], str(out))
    assert out.read_text() == "a table\n"
    captured = capsys.readouterr()
    assert captured.out == "a table\n" and captured.err == "warning: a gap\n"
