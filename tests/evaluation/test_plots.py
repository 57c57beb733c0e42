"""The run's PNGs: ROC curves, per-level AUROC bars, score distributions with thresholds."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from anomaly.evaluation.plots import (
    AUROC_BARS_FILE,
    DISTRIBUTION_FILE,
    ROC_FILE,
    plot_run_dir,
    roc_figure,
    score_distribution_figure,
    working_point_thresholds,
    write_run_plots,
)
from anomaly.evaluation.results import write_results, write_scores_csv
from tests.evaluation.fake_runs import fake_results, working_point_section


def scored_run(seed: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    labels = np.array([0] * 20 + [1] * 30)
    rows = {}
    for level in ("1", "7"):
        rows[f"mahalanobis/{level}"] = rng.normal(size=50) + labels * (2.0 if level == "7" else 0.3)
    rows["mahalanobis/sum"] = rows["mahalanobis/1"] + rows["mahalanobis/7"]
    return labels, rows


def test_png_files_with_and_without_working_points(tmp_path):
    labels, rows = scored_run()
    for name, results in (
        ("plain", fake_results("bottle", 0, 0.9)),
        ("thresholds", fake_results("bottle", 0, 0.9, working_point=working_point_section(0.2, 0.8))),
    ):
        paths = write_run_plots(tmp_path / name, labels, rows, results)
        assert [p.name for p in paths] == [ROC_FILE, AUROC_BARS_FILE, DISTRIBUTION_FILE]
        for path in paths:
            with Image.open(path) as image:
                assert image.format == "PNG" and image.width >= 300 and image.height >= 200
    # the level-7 panel with its thresholds makes the distribution figure wider
    with (
        Image.open(tmp_path / "plain" / DISTRIBUTION_FILE) as a,
        Image.open(tmp_path / "thresholds" / DISTRIBUTION_FILE) as b,
    ):
        assert b.width > a.width


def test_thresholds_are_read_from_the_working_point_section():
    assert working_point_thresholds(fake_results("bottle", 0, 0.9)) == {}
    found = working_point_thresholds({"working_point": working_point_section(0.2, 0.8, level="7")})
    chi2 = [t for t in found["mahalanobis/7"] if t.kind == "chi2"]
    assert [(t.n_sigma, t.value) for t in chi2] == [(1, 11.0), (2, 12.0)]
    target = [t for t in found["mahalanobis/7"] if t.n_sigma is None]
    assert [(t.kind, t.value, t.label) for t in target] == [("empirical", 12.5, "empirical FPR 1%")]
    labels, rows = scored_run()
    results = {"primary_score": "mahalanobis/sum", "working_point": working_point_section(0.2, 0.8)}
    figure = score_distribution_figure(labels, rows, results)
    level_axes = figure.axes[1]
    assert level_axes.get_title() == "mahalanobis/7"
    marked = sorted(line.get_xdata()[0] for line in level_axes.get_lines())
    assert marked == pytest.approx([11.0, 12.0, 12.5])


def test_roc_legend_reports_sklearn_auroc():
    labels, rows = scored_run()
    figure = roc_figure(labels, {"7": rows["mahalanobis/7"], "sum": rows["mahalanobis/sum"]}, "t")
    texts = [t.get_text() for t in figure.axes[0].get_legend().get_texts()]
    assert texts[0] == f"level 7 ({100 * roc_auc_score(labels, rows['mahalanobis/7']):.1f})"
    assert texts[1] == f"sum (AUROC {100 * roc_auc_score(labels, rows['mahalanobis/sum']):.1f})"
    single = roc_figure(np.zeros(5, int), {"sum": np.arange(5.0)}, "one class")
    assert "undefined" in single.axes[0].texts[0].get_text()


def test_plots_redrawn_from_a_run_directory(tmp_path):
    labels, rows = scored_run()
    columns = {"path": [f"{i}.png" for i in range(50)], "label": labels.tolist(), "defect": ["x"] * 50}
    columns |= {name.replace("/", "_"): values.tolist() for name, values in rows.items()}
    write_scores_csv(tmp_path, columns)
    write_results(tmp_path, fake_results("bottle", 0, 0.9))
    assert [p.name for p in plot_run_dir(tmp_path)] == [ROC_FILE, AUROC_BARS_FILE, DISTRIBUTION_FILE]
