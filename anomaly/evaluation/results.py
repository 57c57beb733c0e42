"""The files every run writes: ``results.json`` and ``scores.csv``.

Both are written atomically (temporary file, then rename); the CLI keeps an
earlier run's files aside until a new run succeeds, so a failed run never leaves
a complete-looking result of its own behind.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from anomaly.atomic import replaced_atomically

RESULTS_FILE = "results.json"
SCORES_FILE = "scores.csv"
#: The figures of :mod:`anomaly.evaluation.plots` (skipped with ``--figures false``).
ROC_FILE = "roc.png"
AUROC_BARS_FILE = "auroc_per_level.png"
DISTRIBUTION_FILE = "score_distribution.png"
RUN_FIGURES = (ROC_FILE, AUROC_BARS_FILE, DISTRIBUTION_FILE)
#: Overlay PNGs of anomaly maps (spatial ``cells`` runs).
OVERLAYS_DIR = "anomaly_maps"


def json_safe(value: object) -> object:
    """JSON-safe values: NaN becomes null, tensors and numpy scalars become floats."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_atomic(path: Path, text: str) -> None:
    with replaced_atomically(path) as tmp:
        tmp.write_text(text, newline="")


def write_results(run_dir: Path, results: Mapping) -> Path:
    path = Path(run_dir) / RESULTS_FILE
    write_atomic(path, json.dumps(json_safe(results), indent=2) + "\n")
    return path


def write_scores_csv(run_dir: Path, columns: Mapping[str, Sequence]) -> Path:
    """One row per test image; ``columns`` maps a header to its values."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    names = list(columns)
    writer.writerow(names)
    for row in zip(*(columns[name] for name in names), strict=True):
        writer.writerow([f"{v:.10g}" if isinstance(v, float) else v for v in row])
    path = Path(run_dir) / SCORES_FILE
    write_atomic(path, buffer.getvalue())
    return path


def run_result_paths(run_dir: Path) -> list[Path]:
    """The results, scores, figures, overlays and TensorBoard events a run wrote into ``run_dir``."""
    run_dir = Path(run_dir)
    named = [run_dir / name for name in (RESULTS_FILE, SCORES_FILE, *RUN_FIGURES, OVERLAYS_DIR)]
    return [path for path in named if os.path.lexists(path)] + sorted(run_dir.glob("events.out.tfevents.*"))


def read_results(path: Path) -> dict:
    with open(path) as file:
        return json.load(file)
