"""A real run logs its figures, histograms, hparams and extreme images to TensorBoard, and writes PNGs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from anomaly.cli import main
from anomaly.evaluation.results import AUROC_BARS_FILE, DISTRIBUTION_FILE, ROC_FILE, RUN_FIGURES
from anomaly.evaluation.tensorboard import (
    HPARAMS_METRIC,
    N_EXTREME_IMAGES,
    THUMBNAIL_SIZE,
    extreme_indices,
)
from tests.conftest import DEFAULT_SWITCHES, FEW_HELD_OUT

pytestmark = [FEW_HELD_OUT, DEFAULT_SWITCHES]


def run_cli(tiny_mvtec: Path, root: Path, capsys, *extra: str) -> Path:
    code = main(
        ["--config", "paper", "--model.backbone", "efficientnet-lite0", "--model.levels", "[2, 4]",
         "--data.root", str(tiny_mvtec),
         "--data.category", "widget", "--data.fold", "0", "--data.num_workers", "0", "--data.batch_size", "8",
         "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false", *extra]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    return root / "gaussian" / "efficientnet-lite0_levels-2-4" / "widget" / "fold_0"


def test_run_logs_expected_tags(tiny_mvtec: Path, tmp_path: Path, capsys):
    run_dir = run_cli(tiny_mvtec, tmp_path / "runs", capsys)
    for name in (ROC_FILE, AUROC_BARS_FILE, DISTRIBUTION_FILE):
        assert (run_dir / name).stat().st_size > 1000, name

    events = EventAccumulator(str(run_dir), size_guidance={"images": 0, "histograms": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    for score_type in ("mahalanobis", "l2", "sed"):
        for level in ("2", "4", "sum"):
            assert f"test/auroc/{score_type}/{level}" in tags["scalars"]
        for name in ("normal", "anomalous"):
            assert f"test/scores/{score_type}/sum/{name}" in tags["histograms"]
    for image in (
        "test/roc",
        "test/auroc_per_level",
        "test/images/highest_scores",
        "test/images/lowest_scores",
    ):
        assert image in tags["images"], image
    assert "test/images/ranking/text_summary" in tags["tensors"]
    assert HPARAMS_METRIC in tags["scalars"]
    hparams = events.PluginTagToContent("hparams")
    assert "_hparams_/experiment" in hparams and "_hparams_/session_start_info" in hparams
    assert b"model/backbone" in hparams["_hparams_/session_start_info"]
    assert b"data/category" in hparams["_hparams_/session_start_info"]

    results = json.loads((run_dir / "results.json").read_text())
    (metric,) = events.Scalars(HPARAMS_METRIC)
    assert metric.value == np.float32(results["image_auroc"])
    normal = events.Histograms("test/scores/mahalanobis/sum/normal")[0].histogram_value
    assert normal.num == results["n_test"] - results["n_test_anomalous"]
    (highest,) = events.Images("test/images/highest_scores")  # the thumbnails side by side
    assert (highest.width, highest.height) == (N_EXTREME_IMAGES * THUMBNAIL_SIZE, THUMBNAIL_SIZE)


@pytest.mark.slow
def test_without_figures_a_run_keeps_results_histograms_and_hparams_but_draws_nothing(
    tiny_mvtec: Path, tmp_path: Path, capsys
):
    root = tmp_path / "runs"
    with_figures = run_cli(tiny_mvtec, root, capsys)
    assert (with_figures / ROC_FILE).is_file()
    run_dir = run_cli(tiny_mvtec, root, capsys, "--figures", "false")  # the same folder, run again
    assert run_dir == with_figures
    assert not [name for name in RUN_FIGURES if (run_dir / name).exists()], "stale figures were kept"
    results = json.loads((run_dir / "results.json").read_text())
    assert results["n_test"] == 8 and (run_dir / "scores.csv").is_file()
    events = EventAccumulator(str(run_dir), size_guidance={"images": 0, "histograms": 0})
    events.Reload()
    tags = events.Tags()
    assert tags["images"] == []
    assert "test/scores/mahalanobis/sum/normal" in tags["histograms"]
    assert "test/auroc/mahalanobis/sum" in tags["scalars"] and HPARAMS_METRIC in tags["scalars"]


def test_extreme_indices():
    scores = np.array([0.3, 0.9, 0.1, 0.5, 0.7])
    assert extreme_indices(scores, 2) == ([1, 4], [2, 0])
    assert extreme_indices(scores[:1], 4) == ([0], [0])
