"""What a finished test adds to TensorBoard and to the run directory.

Beside the AUROC scalars (``test/auroc/<type>/<level>``, logged by
:class:`~anomaly.evaluation.callback.RunReport`),
a run logs the ROC curve and the per-level AUROC bars as figures, histograms of
the normal and anomalous test scores, its hyperparameters with the image AUROC
as the hparams metric, and the test images with the highest and lowest scores;
it also writes the PNGs of :mod:`anomaly.evaluation.plots`. Each figure is drawn
once: the PNG and TensorBoard get the same pixels.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch import Tensor

from anomaly.data.images import load_rgb
from anomaly.data.transforms import resize_square
from anomaly.evaluation.aggregate import SUM
from anomaly.evaluation.plots import render_run_figures, write_pngs
from anomaly.evaluation.results import AUROC_BARS_FILE, ROC_FILE

HPARAMS_METRIC = "hp/image_auroc"
N_EXTREME_IMAGES = 4
THUMBNAIL_SIZE = 160


def tensorboard_logger(module) -> TensorBoardLogger | None:
    """The module's TensorBoard logger, if it has one."""
    for logger in getattr(module, "loggers", []) or []:
        if isinstance(logger, TensorBoardLogger):
            return logger
    return None


DATA_HPARAMS = ("root", "category", "fold", "augment", "batch_size", "image_size", "seed")


def flat_hparams(module) -> dict[str, object]:
    """The model's and the data's hyperparameters, flat and TensorBoard-safe (``model/…``, ``data/…``)."""
    sources = {"model": dict(getattr(module, "hparams", {}) or {})}
    datamodule = getattr(module, "datamodule", None)
    if datamodule is not None:
        sources["data"] = {
            name: getattr(datamodule, name) for name in DATA_HPARAMS if hasattr(datamodule, name)
        }
    trainer = getattr(module, "_trainer", None)
    if trainer is not None:
        sources["trainer"] = {"max_epochs": trainer.max_epochs}
    out: dict[str, object] = {}
    for prefix, params in sources.items():
        for key, value in params.items():
            if str(key).startswith("_"):
                continue
            plain = isinstance(value, (int, float, str, bool)) and not (
                isinstance(value, float) and math.isnan(value)
            )
            out[f"{prefix}/{key}"] = value if plain else str(value)
    return out


def extreme_indices(scores: np.ndarray, count: int) -> tuple[list[int], list[int]]:
    """Positions of the ``count`` highest and the ``count`` lowest scores (highest first / lowest first)."""
    order = np.argsort(scores, kind="stable")
    count = min(count, len(order))
    return [int(i) for i in order[::-1][:count]], [int(i) for i in order[:count]]


def thumbnails(paths: Sequence[str]) -> np.ndarray:
    """(N, S, S, 3) uint8 images re-read from their files, resized to a square thumbnail."""
    return np.stack([resize_square(load_rgb(p), THUMBNAIL_SIZE) for p in paths])


def log_to_tensorboard(
    logger: TensorBoardLogger,
    labels: np.ndarray,
    rows: Mapping[str, np.ndarray],
    results: Mapping,
    hparams: Mapping[str, object],
    paths: Sequence[str] | None = None,
    step: int = 0,
    figures: bool = True,
    images: Mapping[str, np.ndarray] | None = None,
) -> None:
    """Score histograms, hparams with the AUROC; with ``figures``, the figures and the extreme test images.

    ``images``: the run's figures already drawn (:func:`~anomaly.evaluation.plots.render_run_figures`);
    those missing are drawn here.
    """
    writer = logger.experiment
    if figures:
        logged = {ROC_FILE: "test/roc", AUROC_BARS_FILE: "test/auroc_per_level"}
        images = dict(images or {})
        missing = [name for name in logged if name not in images]
        images.update(render_run_figures(labels, rows, results, missing))
        for name, tag in logged.items():
            writer.add_image(tag, images[name], step, dataformats="HWC")
    for column, scores in rows.items():
        if column.endswith(f"/{SUM}") or column == results.get("primary_score"):
            for label, name in ((0, "normal"), (1, "anomalous")):
                chosen = np.asarray(scores, dtype=np.float64)[labels == label]
                if chosen.size:
                    writer.add_histogram(f"test/scores/{column}/{name}", chosen, step)
    auroc = results.get("image_auroc")
    metric = math.nan if auroc is None else float(auroc)
    logger.log_hyperparams(dict(hparams), metrics={HPARAMS_METRIC: metric})
    if paths and figures:
        primary = np.asarray(rows[results["primary_score"]], dtype=np.float64)
        highest, lowest = extreme_indices(primary, N_EXTREME_IMAGES)
        lines = ["| rank | image | label | score |", "|---|---|---|---|"]
        for tag, chosen in (("highest_scores", highest), ("lowest_scores", lowest)):
            writer.add_images(
                f"test/images/{tag}", thumbnails([paths[i] for i in chosen]), step, dataformats="NHWC"
            )
            lines += [
                f"| {tag.split('_')[0]} {r + 1} | {paths[i]} | {'anomalous' if labels[i] else 'normal'} "
                f"| {primary[i]:.4g} |"
                for r, i in enumerate(chosen)
            ]
        writer.add_text("test/images/ranking", "\n".join(lines), step)
    writer.flush()


def report_run(
    module,
    results: Mapping,
    run_dir: Path,
    labels: Tensor,
    rows: Mapping[str, Tensor],
    indices: Tensor | None = None,
    figures: bool = True,
) -> list[Path]:
    """Write the run's PNGs and log its figures, histograms, hparams and images to TensorBoard.

    Called on global rank zero after ``results.json`` (``results``) is written. ``indices``
    index the datamodule's test samples, whose files give the extreme images.
    Without ``figures`` (sweeps: drawing costs about a second a run) only the
    histograms and hparams are logged and no PNG is written.
    """
    labels_np = labels.detach().cpu().numpy().astype(int)
    rows_np = {k: v.detach().to(torch.float64).cpu().numpy() for k, v in rows.items()}
    images = render_run_figures(labels_np, rows_np, results) if figures else {}
    written = write_pngs(run_dir, images)
    logger = tensorboard_logger(module)
    if logger is not None:
        paths = None
        samples = getattr(module.datamodule, "test_samples", None)
        if samples is not None and indices is not None:
            paths = [str(samples[i].path) for i in indices.tolist()]
        log_to_tensorboard(
            logger,
            labels_np,
            rows_np,
            results,
            flat_hparams(module),
            paths,
            module.global_step,
            figures,
            images,
        )
    return written
