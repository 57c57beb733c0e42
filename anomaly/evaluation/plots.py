"""PNG figures of one run: ROC curves, per-level AUROC bars, score distributions.

Figures are built with matplotlib's object API on the Agg canvas (no display, no
pyplot state), so they work in headless and multi-process runs. Each is drawn once
(:func:`render_figure`): the same pixels are written as the PNG and logged to
TensorBoard (:mod:`anomaly.evaluation.tensorboard`). Margins are fixed in inches
(:func:`set_margins`) rather than measured by ``tight_layout``, which would lay out
every label twice; histograms are one filled outline each, not one patch per bar.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from sklearn.metrics import roc_curve

from anomaly.atomic import write_bytes_atomic
from anomaly.columns import ScoreColumn
from anomaly.evaluation.aggregate import SUM, level_sort_key
from anomaly.evaluation.metrics import image_auroc
from anomaly.evaluation.results import (
    AUROC_BARS_FILE,
    DISTRIBUTION_FILE,
    RESULTS_FILE,
    ROC_FILE,
    RUN_FIGURES,
    SCORES_FILE,
    read_results,
)

THRESHOLD_KINDS = ("chi2", "empirical")
DPI = 100
#: zlib level of the PNGs (matplotlib's default): flat figures compress well at any level.
PNG_COMPRESS_LEVEL = 6
#: Room for the title above the axes and for the tick labels and axis label below them (inches).
TOP_MARGIN, BOTTOM_MARGIN, RIGHT_MARGIN = 0.36, 0.6, 0.28
#: Left margin for y tick labels of ``n`` characters and the axis label: 0.48 in + 0.065 in a character.
LABEL_MARGIN, CHARACTER_WIDTH = 0.48, 0.065
#: The text chunk matplotlib writes into its PNGs.
MATPLOTLIB_TEXT = {"Software": f"Matplotlib version{matplotlib.__version__}, https://matplotlib.org/"}


def new_figure(width: float = 6.0, height: float = 4.5) -> Figure:
    figure = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def set_margins(figure: Figure, left: float, right: float = RIGHT_MARGIN, gap: float = 0.0) -> None:
    """Place the subplots with fixed margins in inches (``gap`` between side-by-side panels)."""
    width, height = figure.get_size_inches()
    panels = len(figure.axes)
    panel_width = (width - left - right - gap * (panels - 1)) / panels
    figure.subplots_adjust(
        left=left / width,
        right=1 - right / width,
        bottom=BOTTOM_MARGIN / height,
        top=1 - TOP_MARGIN / height,
        wspace=gap / panel_width,
    )


def set_title(axes, title: str) -> None:
    """The title where matplotlib would put it on these axes (no ticks or offset text above them),
    placed directly instead of measured against the axes' labels at every draw."""
    axes.set_title(title, y=1.0)


def render_figure(figure: Figure) -> np.ndarray:
    """``figure`` drawn once: (H, W, 3) uint8 pixels at its dpi (opaque: the figure is white)."""
    canvas = figure.canvas
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def png_bytes(pixels: np.ndarray, text: Mapping[str, str], compress_level: int = PNG_COMPRESS_LEVEL) -> bytes:
    """PNG bytes of (H, W, 3) uint8 ``pixels`` at :data:`DPI`, with ``text`` as its text chunks."""
    info = PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(
        buffer, format="png", pnginfo=info, dpi=(DPI, DPI), compress_level=compress_level
    )
    return buffer.getvalue()


def level_name(column: str) -> str:
    return ScoreColumn.parse(column).level_name


def primary_type(results: Mapping) -> str:
    return ScoreColumn.parse(str(results.get("primary_score", "mahalanobis/sum"))).kind


def columns_of_type(rows: Mapping[str, np.ndarray], score_type: str) -> dict[str, np.ndarray]:
    """``{level: scores}`` of one score type, levels in order and ``sum`` last."""
    chosen = {
        ScoreColumn.parse(name).level_name: np.asarray(v)
        for name, v in rows.items()
        if name.startswith(f"{score_type}/")
    }
    return dict(sorted(chosen.items(), key=lambda item: level_sort_key(item[0])))


def roc_figure(labels: np.ndarray, columns: Mapping[str, np.ndarray], title: str) -> Figure:
    """ROC curves of the given score columns (higher = more anomalous); ``sum`` drawn bold."""
    figure = new_figure()
    axes = figure.add_subplot()
    labels = np.asarray(labels).astype(int)
    single_class = labels.min() == labels.max()
    cmap = matplotlib.colormaps["viridis"]
    levels = [name for name in columns if name != SUM]
    for i, (name, scores) in enumerate(columns.items()):
        if single_class:
            break
        fpr, tpr, _ = roc_curve(labels, np.asarray(scores, dtype=np.float64))
        auroc = image_auroc(np.asarray(scores, dtype=np.float64), labels)
        if name == SUM:
            axes.plot(fpr, tpr, color="black", linewidth=2.2, label=f"sum (AUROC {100 * auroc:.1f})")
        else:
            colour = cmap(i / max(1, len(levels) - 1))
            axes.plot(fpr, tpr, color=colour, linewidth=1.0, label=f"level {name} ({100 * auroc:.1f})")
    axes.plot([0, 1], [0, 1], linestyle=":", color="grey", linewidth=0.8)
    axes.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate", ylabel="true positive rate")
    set_title(axes, title)
    if single_class:
        axes.text(0.5, 0.5, "ROC undefined: the test set holds one class", ha="center", va="center")
    else:
        axes.legend(loc="lower right", fontsize=7)
    set_margins(figure, left=LABEL_MARGIN + 3 * CHARACTER_WIDTH)  # "0.0" .. "1.0"
    return figure


def auroc_bar_figure(results: Mapping, title: str) -> Figure:
    """Image AUROC per level and for the sum, one bar per score type (Table I layout)."""
    scores = results.get("scores") or {}
    types = list(scores)
    levels = [*sorted({lv for t in types for lv in scores[t].get("per_level", {})}, key=level_sort_key), SUM]
    figure = new_figure(max(6.0, 0.6 * len(levels) * max(1, len(types)) / 2), 4.0)
    axes = figure.add_subplot()
    width = 0.8 / max(1, len(types))
    x = np.arange(len(levels))
    for i, score_type in enumerate(types):
        entry = scores[score_type]
        values = [entry.get(SUM) if lv == SUM else entry.get("per_level", {}).get(lv) for lv in levels]
        heights = [math.nan if v is None else 100 * v for v in values]
        axes.bar(x + (i - (len(types) - 1) / 2) * width, heights, width, label=score_type)
    axes.set_xticks(x, levels)
    axes.set(ylim=(0, 100), xlabel="level", ylabel="image AUROC (%)")
    set_title(axes, title)
    axes.axhline(50, color="grey", linestyle=":", linewidth=0.8)
    axes.legend(fontsize=8, loc="lower right")
    set_margins(figure, left=LABEL_MARGIN + 3 * CHARACTER_WIDTH, right=0.15)  # "0" .. "100"
    return figure


class Threshold(NamedTuple):
    """One working-point threshold of a score column."""

    kind: str  # "chi2" (eq. 8) or "empirical" (held-out normal images)
    n_sigma: int | None  # the Table IV row, or None for the run's target FPR
    target_fpr: float
    value: float

    @property
    def label(self) -> str:
        name = "χ²" if self.kind == "chi2" else self.kind
        row = f"{self.n_sigma}σ" if self.n_sigma is not None else f"FPR {100 * self.target_fpr:g}%"
        return f"{name} {row}"


def working_point_thresholds(results: Mapping) -> dict[str, list[Threshold]]:
    """``{score column: [Threshold, ...]}`` from the ``working_point`` section; empty without it.

    Per level the χ² thresholds (eq. 8) and the empirical thresholds of the n·σ
    rows and of the target FPR; for the sum, the empirical ones.
    """
    report = results.get("working_point")
    if not isinstance(report, Mapping):
        return {}
    found: dict[str, list[Threshold]] = {}

    def add(column: str, rows: list) -> None:
        for row in rows or []:
            if not isinstance(row, Mapping):
                continue
            for kind in THRESHOLD_KINDS:
                value = row.get(f"{kind}_threshold")
                if isinstance(value, (int, float)) and math.isfinite(value):
                    target = float(row.get("target_fpr", math.nan))
                    found.setdefault(column, []).append(
                        Threshold(kind, row.get("n_sigma"), target, float(value))
                    )

    for level, entry in (report.get("levels") or {}).items():
        if isinstance(entry, Mapping):
            add(f"mahalanobis/{level}", entry.get("rows"))
    if isinstance(report.get("sum"), Mapping):
        add(f"mahalanobis/{SUM}", report["sum"].get("rows"))
    return found


def threshold_panels(primary: str, thresholds: Mapping[str, list], rows: Mapping) -> list[str]:
    """The primary column, then up to two single levels with thresholds (level 7 first, Table IV)."""
    levels = [c for c in thresholds if c != primary and c in rows and not c.endswith(f"/{SUM}")]
    levels.sort(key=lambda c: (level_name(c) != "7", -level_sort_key(level_name(c))[1]))
    return [primary, *levels[:2]]


def mark_thresholds(axes, thresholds: list[Threshold]) -> None:
    """χ² n·σ thresholds as grey dashes labelled at the top; target-FPR thresholds in the legend."""
    for threshold in thresholds:
        if threshold.n_sigma is None:
            style = ("black", "-") if threshold.kind == "chi2" else ("tab:green", "-.")
            axes.axvline(
                threshold.value, color=style[0], linestyle=style[1], linewidth=1.4, label=threshold.label
            )
        elif threshold.kind == "chi2":
            axes.axvline(threshold.value, color="grey", linestyle="--", linewidth=0.8)
            axes.text(threshold.value, 0.98, f"{threshold.n_sigma}σ", transform=axes.get_xaxis_transform(),
                      fontsize=7, ha="center", va="top", color="dimgrey")  # fmt: skip


def score_distribution_figure(labels: np.ndarray, rows: Mapping[str, np.ndarray], results: Mapping) -> Figure:
    """Histograms of normal and anomalous test scores, with working-point thresholds marked.

    One panel for the primary score, and one for each of up to two single levels
    that have thresholds.
    """
    primary = str(results.get("primary_score", f"{primary_type(results)}/{SUM}"))
    thresholds = working_point_thresholds(results)
    panels = threshold_panels(primary, thresholds, rows)
    figure = new_figure(5.0 * len(panels), 4.0)
    labels = np.asarray(labels).astype(int)
    highest = 1
    for i, column in enumerate(panels):
        axes = figure.add_subplot(1, len(panels), i + 1)
        scores = np.asarray(rows[column], dtype=np.float64)
        bins = np.histogram_bin_edges(scores, bins=30)
        for label, name, colour in ((0, "normal", "tab:blue"), (1, "anomalous", "tab:red")):
            chosen = scores[labels == label]
            if chosen.size:
                counts, _ = np.histogram(chosen, bins=bins)
                highest = max(highest, int(counts.max()))
                label_text = f"{name} ({chosen.size})"
                axes.stairs(counts, bins, fill=True, alpha=0.55, color=colour, label=label_text)
        mark_thresholds(axes, thresholds.get(column, []))
        axes.set(xlabel=f"{column} score", ylabel="test images")
        set_title(axes, column)
        axes.legend(fontsize=7)
    left = LABEL_MARGIN + len(str(math.ceil(1.05 * highest))) * CHARACTER_WIDTH  # counts' tick labels
    set_margins(figure, left=left, gap=left + 0.1)
    return figure


def run_title(results: Mapping) -> str:
    parts = (results.get("method"), results.get("backbone"), results.get("category"))
    return " | ".join(map(str, parts)) + f" | fold {results.get('fold')}"


def render_run_figures(
    labels: np.ndarray, rows: Mapping[str, np.ndarray], results: Mapping, names: Sequence[str] = RUN_FIGURES
) -> dict[str, np.ndarray]:
    """The run's figures (``names`` of :data:`RUN_FIGURES`), each drawn once: ``{file name: pixels}``."""
    title = run_title(results)
    builders = {
        ROC_FILE: lambda: roc_figure(labels, columns_of_type(rows, primary_type(results)), f"ROC: {title}"),
        AUROC_BARS_FILE: lambda: auroc_bar_figure(results, f"image AUROC: {title}"),
        DISTRIBUTION_FILE: lambda: score_distribution_figure(labels, rows, results),
    }
    return {name: render_figure(builders[name]()) for name in names}


def write_pngs(run_dir: Path, images: Mapping[str, np.ndarray]) -> list[Path]:
    """Write each ``{file name: pixels}`` into ``run_dir`` as a PNG, whole."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return [
        write_bytes_atomic(run_dir / name, png_bytes(pixels, MATPLOTLIB_TEXT))
        for name, pixels in images.items()
    ]


def write_run_plots(
    run_dir: Path, labels: np.ndarray, rows: Mapping[str, np.ndarray], results: Mapping
) -> list[Path]:
    """Write ``roc.png``, ``auroc_per_level.png`` and ``score_distribution.png`` into ``run_dir``."""
    return write_pngs(run_dir, render_run_figures(labels, rows, results))


def read_scores_csv(path: Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Labels and score columns (``type/level``) of a run's ``scores.csv``."""
    with open(path, newline="") as file:
        table = list(csv.DictReader(file))
    labels = np.array([int(row["label"]) for row in table])
    rows: dict[str, np.ndarray] = {}
    for header in table[0] if table else []:
        column = ScoreColumn.from_csv_name(header)
        if column is not None:
            rows[str(column)] = np.array([float(row[header]) for row in table])
    return labels, rows


def plot_run_dir(run_dir: Path) -> list[Path]:
    """Redraw a finished run's PNGs from its ``results.json`` and ``scores.csv``."""
    run_dir = Path(run_dir)
    labels, rows = read_scores_csv(run_dir / SCORES_FILE)
    return write_run_plots(run_dir, labels, rows, read_results(run_dir / RESULTS_FILE))
