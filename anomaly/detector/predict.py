"""Scoring image files with a saved detector, streamed to CSV.

Images are read by a DataLoader (optionally in worker processes), scored batch
by batch, and each batch's rows are written and flushed at once: memory stays
flat for any number of images, and an interrupted run keeps every row already
scored. An unreadable file gets a row with its ``error`` and empty scores, and
so does an image whose score is not a finite number (never a "normal" decision);
when not a single file can be scored, nothing is written and it is an error.

Detectors with a map-capable pooling (``cells``) add the location of each map's
maximum (``map_max_x``, ``map_max_y``: pixel column and row in the original
image) and, with a maps folder, write per image the raw map at the image's size
(``.map.npy`` float32) and a heat-map overlay (``.overlay.png``, at most
1024 pixels long), named after the image's path and listed in the CSV. Images are prepared as the
detector was fitted (resize rule, fit rule, tiles: its ``preprocessing``).
"""

from __future__ import annotations

import csv
import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np
from torch.utils.data import DataLoader
from tqdm import tqdm

from anomaly.columns import ScoreColumn
from anomaly.console import ignore_interrupts
from anomaly.detector.inputs import PredictionDataset
from anomaly.detector.maps import (
    MAP_SUFFIX,
    OVERLAY_SUFFIX,
    argmax_xy,
    map_at_size,
    map_file_names,
    overlay_size,
    write_map,
)
from anomaly.detector.model import GaussianDetectorModel
from anomaly.errors import UserError
from anomaly.outputs import OutputFolder


@dataclass
class PredictionSummary:
    scored: int = 0
    failed: int = 0
    anomalous: int = 0


#: The columns naming an image's map and overlay files (with a maps folder).
MAP_FILE_COLUMNS = ["map_file", "overlay_file"]


def overlay_range(
    model: GaussianDetectorModel, threshold: float | None, image_map: np.ndarray
) -> tuple[float, float]:
    """The map values where an overlay's colours start and reach their top. The top is the detector's
    map threshold (the held-out normal maps' peak, see
    :meth:`~anomaly.detector.model.GaussianDetectorModel.calibrate_maps`), else its decision
    threshold (files before map thresholds), else the map's own largest value. The start is its map
    floor (a held-out normal map's median cell) where it lies below the top, else 0."""
    top = model.map_threshold
    if top is None:
        top = threshold if threshold is not None else float(np.nanmax(image_map))
    floor = model.map_floor
    return (floor if floor is not None and floor < top else 0.0), top


def output_columns(model: GaussianDetectorModel, with_map_files: bool = False) -> tuple[list[str], list[str]]:
    """(CSV header, the score columns written after ``score``): the primary kind on every level."""
    kind = model.decision_score.kind
    per_level = [ScoreColumn(kind, level) for level in model.levels]
    location = ["map_max_x", "map_max_y"] if model.makes_maps else []
    files = MAP_FILE_COLUMNS if with_map_files else []
    header = ["path", "score", *(c.csv_name for c in per_level), *location, *files, "decision", "error"]
    return header, [str(c) for c in per_level]


def maps_folder(maps_dir: str | Path) -> OutputFolder:
    """``maps_dir`` as the maps' :class:`~anomaly.outputs.OutputFolder`: new, empty, or an earlier run's."""
    return OutputFolder(maps_dir, option="--maps", command="anomaly predict --maps")


def claim_map_files(
    maps_dir: str | Path, paths: list[Path], protected: Iterable[Path] = ()
) -> list[tuple[Path, Path]]:
    """(map, overlay) paths of every input in ``maps_dir``, claimed (:class:`~anomaly.outputs.OutputFolder`):
    named after the input's path below the inputs' common folder, never over an input or ``protected``."""
    folder = maps_folder(maps_dir)
    names = map_file_names(paths)
    claimed = folder.claim(
        [name + suffix for name in names for suffix in (MAP_SUFFIX, OVERLAY_SUFFIX)], [*paths, *protected]
    )
    return list(zip(claimed[::2], claimed[1::2], strict=True))


def predict_files(
    model: GaussianDetectorModel,
    paths: Iterable[Path],
    out: TextIO,
    batch_size: int = 32,
    num_workers: int = 0,
    progress: bool = True,
    maps_dir: str | Path | None = None,
    protected: Iterable[Path] = (),
) -> PredictionSummary:
    """Score every file in ``paths`` and write one CSV row per file to ``out``, in order.

    ``score`` is the detector's primary score (higher = more anomalous);
    ``decision`` is 1 (anomalous: score > threshold) or 0, and empty when the
    detector has no threshold. Nothing is written until the first image is
    scored: when none can be, :class:`UserError` names the first reason. With ``maps_dir``, each
    image's map and overlay are written there (never over an input or a file of ``protected``,
    such as the detector) and named in the ``map_file`` and ``overlay_file`` columns.
    """
    check_loader_options(batch_size, num_workers)
    if model.extractor is None:
        raise UserError("this detector was fitted on features, not images: it cannot score image files")
    if maps_dir is not None and not model.makes_maps:
        raise UserError(
            "--maps needs a detector with anomaly maps (pooling cells or grid_maps), "
            f"not pooling {model.pooling.name}"
        )
    paths = list(paths)
    if not paths:
        raise UserError("no image files found in the input")
    dataset = PredictionDataset(paths, model.image_size, model.geometry)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        worker_init_fn=ignore_interrupts,
    )
    header, per_level = output_columns(model, with_map_files=maps_dir is not None)
    writer = csv.writer(out)
    pending: list[list] | None = [header]  # held back until an image is scored; None once written
    summary = PredictionSummary()
    threshold, decision_score, device = model.threshold, str(model.decision_score), model.device
    map_files = claim_map_files(maps_dir, paths, protected) if maps_dir is not None else []
    with tqdm(total=len(paths), unit="img", disable=not progress, file=sys.stderr) as bar:
        for batch in loader:
            ok = [i for i, error in enumerate(batch["error"]) if not error]
            columns, maps = score_batch(model, batch["image"][ok].to(device)) if ok else ({}, None)
            scored = {i: position for position, i in enumerate(ok)}
            for i, index in enumerate(batch["index"].tolist()):
                row = [str(paths[index])]
                error = batch["error"][i]
                if i in scored:
                    value = float(columns[decision_score][scored[i]])
                    if not math.isfinite(value):
                        error = f"the score is {value} (not a finite number): the image cannot be judged"
                if not error:
                    levels = [f"{float(columns[c][scored[i]]):.10g}" for c in per_level]
                    location = []
                    if maps is not None:
                        coarse = maps[scored[i]].cpu()
                        size = int(batch["height"][i]), int(batch["width"][i])
                        image_map = map_at_size(coarse, *size, model.geometry)
                        location = list(argmax_xy(image_map))
                        if map_files:
                            title = f"{paths[index].name}  score {value:.4g}"
                            colour_range = overlay_range(model, threshold, image_map)
                            overlay_map = map_at_size(coarse, *overlay_size(*size), model.geometry)
                            write_map(
                                *map_files[index], paths[index], image_map, overlay_map, title, colour_range
                            )
                            location += [str(f) for f in map_files[index]]
                    decision = "" if threshold is None else int(value > threshold)
                    row += [f"{value:.10g}", *levels, *location, decision, ""]
                    summary.scored += 1
                    summary.anomalous += decision == 1
                else:
                    row += [""] * (len(header) - 2) + [error]  # path, blanks, error
                    summary.failed += 1
                if pending is None:
                    writer.writerow(row)
                else:
                    pending.append(row)
                    if summary.scored:
                        writer.writerows(pending)
                        pending = None
            out.flush()
            bar.update(len(batch["index"]))
    if not summary.scored:
        path, error = pending[1][0], pending[1][-1]
        raise UserError(
            f"no image could be scored: all {summary.failed} input file(s) are unreadable "
            f"(the first, {path}: {error})"
        )
    return summary


def score_batch(model, images):
    """(score columns, maps or ``None``) of a batch: the model's forward (columns only without maps)."""
    if model.makes_maps:
        return model(images)
    return model.score_images(images), None


def check_loader_options(batch_size: int, num_workers: int) -> None:
    """:class:`UserError` unless ``batch_size`` >= 1 and ``num_workers`` >= 0."""
    if batch_size < 1:
        raise UserError(f"the batch size (--batch-size) must be at least 1, got {batch_size}")
    if num_workers < 0:
        raise UserError(f"the number of workers (--num-workers) must be 0 or more, got {num_workers}")
