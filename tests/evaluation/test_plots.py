"""The run's PNGs: ROC curves, per-level AUROC bars, score distributions with thresholds."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.patches import StepPatch
from PIL import Image
from pytorch_lightning.loggers import TensorBoardLogger
from sklearn.metrics import roc_auc_score
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from anomaly.evaluation.plots import (
    AUROC_BARS_FILE,
    DISTRIBUTION_FILE,
    ROC_FILE,
    auroc_bar_figure,
    plot_run_dir,
    render_figure,
    roc_figure,
    score_distribution_figure,
    working_point_thresholds,
    write_run_plots,
)
from anomaly.evaluation.results import write_results, write_scores_csv
from anomaly.evaluation.tensorboard import report_run
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


def test_histograms_are_one_filled_outline_per_class_with_numpys_counts():
    labels, rows = scored_run()
    figure = score_distribution_figure(labels, rows, {"primary_score": "mahalanobis/sum"})
    (axes,) = figure.axes
    patches = [p for p in axes.patches if isinstance(p, StepPatch)]
    assert [p.get_label() for p in patches] == ["normal (20)", "anomalous (30)"]
    bins = np.histogram_bin_edges(rows["mahalanobis/sum"], bins=30)
    for patch, label in zip(patches, (0, 1), strict=True):
        expected, _ = np.histogram(rows["mahalanobis/sum"][labels == label], bins=bins)
        np.testing.assert_array_equal(patch.get_data().values, expected)
        np.testing.assert_allclose(patch.get_data().edges, bins)
    assert axes.get_ylim()[0] == 0


@pytest.mark.parametrize("scale, copies", [(1.0, 1), (1e5, 200)])
def test_no_label_is_cut_off_or_runs_into_the_next_panel(scale: float, copies: int):
    """Fixed margins leave room for the labels: large scores, and counts of four digits."""
    labels, rows = scored_run()
    labels = np.tile(labels, copies)
    rows = {name: np.tile(values * scale, copies) for name, values in rows.items()}
    results = fake_results("bottle", 0, 0.9, working_point=working_point_section(0.2 * scale, 0.8 * scale))
    for figure in (
        roc_figure(labels, {"7": rows["mahalanobis/7"], "sum": rows["mahalanobis/sum"]}, "a title"),
        auroc_bar_figure(results, "a title"),
        score_distribution_figure(labels, rows, results),
    ):
        render_figure(figure)
        renderer = figure.canvas.get_renderer()
        page = figure.bbox
        boxes = [axes.get_tightbbox(renderer) for axes in figure.axes]  # what is drawn: labels, ticks, title
        for box in boxes:
            assert page.x0 <= box.x0 and box.x1 <= page.x1 and page.y0 <= box.y0 and box.y1 <= page.y1
        for previous, axes in zip(boxes[:-1], figure.axes[1:], strict=True):  # clear of the next y labels
            assert previous.x1 < axes.yaxis.get_tightbbox(renderer).x0


def test_tensorboard_logs_the_pixels_of_the_png_drawn_once(tmp_path: Path, monkeypatch):
    labels, rows = scored_run()
    results = fake_results("bottle", 0, 0.9)
    draws = []
    draw = FigureCanvasAgg.draw
    monkeypatch.setattr(FigureCanvasAgg, "draw", lambda canvas: draws.append(canvas) or draw(canvas))
    logger = TensorBoardLogger(str(tmp_path), name="", version="")
    module = SimpleNamespace(loggers=[logger], datamodule=None, global_step=0, hparams={})
    rows_t = {name: torch.as_tensor(values) for name, values in rows.items()}
    written = report_run(module, results, tmp_path, torch.as_tensor(labels), rows_t)
    assert [p.name for p in written] == [ROC_FILE, AUROC_BARS_FILE, DISTRIBUTION_FILE]
    assert len(draws) == 3  # one draw a figure, for its PNG and TensorBoard
    events = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    events.Reload()
    for tag, name in (("test/roc", ROC_FILE), ("test/auroc_per_level", AUROC_BARS_FILE)):
        (event,) = events.Images(tag)
        logged = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))
        np.testing.assert_array_equal(logged, np.asarray(Image.open(tmp_path / name).convert("RGB")))
