"""Collect ``results.json`` files and build the paper's statistics (Section IV).

The paper's protocol: the image AUROC of every (category, fold); per category
the mean over its folds; the headline is the mean ± SEM over the per-category
means, with SEM = std(ddof=1) / sqrt(number of categories). When a table holds a
single category, the SEM is taken over that category's folds instead, and the
summary says so (``sem_over == "folds"``).

Missing folds or categories are reported as warnings, never averaged over
silently; unreadable or incomplete ``results.json`` files are reported and skipped.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from anomaly.columns import SUM
from anomaly.evaluation.results import RESULTS_FILE

ALL_FOLDS = "all"  # the fold of a run fitted on all training images (``fold: null``)
PRIMARY = None  # score type meaning "the run's own primary score" (``image_auroc``)
FOLD_DIR = re.compile(r"fold_(\d+|all)$")


class IncompleteResults(ValueError):
    """A ``results.json`` that cannot be read or lacks the fields a table needs."""


def level_sort_key(level: str) -> tuple[int, int]:
    """Numeric levels in order, then ``sum``."""
    return (1, 0) if level == SUM else (0, int(level)) if level.isdigit() else (0, 10**6)


@dataclass(frozen=True)
class GroupKey:
    """What tells runs apart in a table: method, backbone, settings and the run folder name."""

    method: str
    backbone: str
    settings: str
    variant: str
    whole: bool = False  # fitted on all training images (``fold_all``), not one of the 5 folds
    dataset: str = ""  # the data root the categories come from ("" for results that predate it)

    @property
    def label(self) -> str:
        name = f"{self.method}/{self.variant}" if self.variant else f"{self.method}/{self.backbone}"
        return f"{name} (fold all)" if self.whole else name

    @property
    def order(self) -> tuple:
        """Where the group stands in tables: by method, backbone and run name; 5 folds first."""
        return (self.method, self.backbone, self.variant, self.whole, self.dataset)


@dataclass(frozen=True)
class RunRecord:
    """One finished (category, fold) run."""

    path: Path
    results: dict

    @property
    def category(self) -> str:
        return str(self.results["category"])

    @property
    def fold(self) -> int | str:
        fold = self.results["fold"]
        return ALL_FOLDS if fold is None else int(fold)

    @property
    def key(self) -> GroupKey:
        settings = {
            k: v for k, v in (self.results.get("settings") or {}).items() if not str(k).startswith("_")
        }
        settings.pop("backbone", None)
        return GroupKey(
            method=str(self.results["method"]),
            backbone=str(self.results.get("backbone")),
            settings=json.dumps(settings, sort_keys=True, default=str),
            variant=run_variant(self.path),
            whole=self.fold == ALL_FOLDS,
            dataset=str(self.results.get("dataset") or ""),
        )

    def value(self, score_type: str | None = PRIMARY, level: str = SUM) -> float | None:
        """AUROC of one score column (``None`` score type: the run's primary score)."""
        return metric_value(self.results, score_type, level)


def run_variant(path: Path) -> str:
    """The ``<name>`` of ``<method>/<name>/<category>/fold_<k>/results.json``, or "" for other layouts."""
    parts = Path(path).parent.parts
    if len(parts) >= 3 and FOLD_DIR.match(parts[-1]):
        return parts[-3]
    return ""


def metric_value(results: Mapping, score_type: str | None, level: str = SUM) -> float | None:
    """``results["scores"][type]["sum" | "per_level"][level]``; ``image_auroc`` when the type is None."""
    if score_type is None:
        value = results.get("image_auroc") if level == SUM else (results.get("per_level") or {}).get(level)
    else:
        entry = (results.get("scores") or {}).get(score_type) or {}
        value = entry.get(SUM) if level == SUM else (entry.get("per_level") or {}).get(str(level))
    if value is None or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


#: The fields of ``results.json`` that the tables read: name -> (required, JSON types it may have).
#: ``float`` takes integers too, ``int`` no booleans, and ``None`` stands for null.
RESULTS_SCHEMA: dict[str, tuple[bool, tuple]] = {
    "method": (True, (str,)),
    "backbone": (True, (str, None)),
    "category": (True, (str,)),
    "fold": (True, (int, None)),
    "image_auroc": (True, (float, None)),
    "scores": (True, (dict,)),
    "per_level": (False, (dict, None)),
    "settings": (False, (dict, None)),
    "dataset": (False, (str, None)),
    "primary_score": (False, (str, None)),
    "working_point": (False, (dict, None)),
}
#: Numbers a working point's row may hold (and ``n_sigma``, whose null marks the target-FPR row).
WORKING_POINT_NUMBERS = ("n_sigma", "target_fpr", "chi2_fpr", "chi2_tpr", "empirical_fpr", "empirical_tpr")
TYPE_NAMES = {
    str: "a string",
    int: "an integer",
    float: "a number",
    dict: "an object",
    list: "a list",
    None: "null",
}


def has_type(value: object, types: tuple) -> bool:
    """Whether a JSON ``value`` is one of ``types`` (see :data:`RESULTS_SCHEMA`)."""
    for kind in types:
        if kind is None and value is None:
            return True
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if kind in (str, dict, list) and isinstance(value, kind):
            return True
    return False


def check_type(where: str, value: object, types: tuple) -> None:
    if not has_type(value, types):
        expected = " or ".join(TYPE_NAMES[kind] for kind in types)
        raise IncompleteResults(f"{where} is {json.dumps(value)[:40]}, not {expected}")


def check_results_schema(results: object) -> None:
    """:class:`IncompleteResults` naming the first field that is missing or of the wrong type."""
    if not isinstance(results, dict):
        raise IncompleteResults("not a JSON object")
    missing = [name for name, (required, _) in RESULTS_SCHEMA.items() if required and name not in results]
    if missing:
        raise IncompleteResults(f"missing {', '.join(missing)}")
    for name, (_, types) in RESULTS_SCHEMA.items():
        if name in results:
            check_type(name, results[name], types)
    if results["fold"] is not None and results["fold"] < 0:
        raise IncompleteResults(f"fold is {results['fold']}, not a fold number (0, 1, ...) or null")
    if not results["scores"]:
        raise IncompleteResults("no score columns")
    for score_type, entry in results["scores"].items():
        if not isinstance(entry, dict) or SUM not in entry or not isinstance(entry.get("per_level"), dict):
            raise IncompleteResults(f"score type {score_type!r} lacks 'sum' or 'per_level'")
        check_type(f"scores.{score_type}.sum", entry[SUM], (float, None))
        for level, value in entry["per_level"].items():
            check_type(f"scores.{score_type}.per_level.{level}", value, (float, None))
    for level, value in (results.get("per_level") or {}).items():
        check_type(f"per_level.{level}", value, (float, None))
    levels = (results.get("working_point") or {}).get("levels") or {}
    check_type("working_point.levels", levels, (dict,))
    for level, entry in levels.items():
        check_type(f"working_point.levels.{level}", entry, (dict,))
        rows = entry.get("rows") or []
        check_type(f"working_point.levels.{level}.rows", rows, (list,))
        for row in rows:
            check_type(f"a row of working_point.levels.{level}", row, (dict,))
            for name in WORKING_POINT_NUMBERS:
                check_type(f"working_point.levels.{level}.rows[].{name}", row.get(name), (float, None))


def load_run(path: Path) -> RunRecord:
    """Read and check one ``results.json``; :class:`IncompleteResults` says what is wrong."""
    try:
        results = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise IncompleteResults(f"unreadable ({type(error).__name__}: {error})") from error
    check_results_schema(results)
    return RunRecord(Path(path), results)


def is_complete(path: Path) -> bool:
    """Whether ``path`` is a readable, complete ``results.json``."""
    try:
        load_run(path)
    except IncompleteResults:
        return False
    return True


def collect_runs(root: Path) -> tuple[list[RunRecord], list[str]]:
    """Every complete ``results.json`` below ``root``, and one line per file that was skipped."""
    records, problems = [], []
    for path in sorted(Path(root).rglob(RESULTS_FILE)):
        try:
            records.append(load_run(path))
        except IncompleteResults as error:
            problems.append(f"skipped {path}: {error}")
    return records, problems


def group_runs(records: Iterable[RunRecord]) -> dict[GroupKey, list[RunRecord]]:
    """Runs grouped by (method, backbone, settings, run name, fold protocol), in a stable order.

    Fits on all training images (``fold_all``) are a group of their own: averaging
    them with the 5 folds would mix two protocols in one mean. So are the categories
    of another dataset (data root): MVTec AD's categories and a folder dataset are
    not averaged together.
    """
    groups: dict[GroupKey, list[RunRecord]] = defaultdict(list)
    for record in records:
        groups[record.key].append(record)
    return dict(sorted(groups.items(), key=lambda item: item[0].order))


def deduplicate(records: Sequence[RunRecord]) -> tuple[list[RunRecord], list[str]]:
    """One run per (category, fold): the most recently written one, with a warning for the others."""
    by_cell: dict[tuple, list[RunRecord]] = defaultdict(list)
    for record in records:
        by_cell[(record.category, record.fold)].append(record)
    kept, warnings = [], []
    for (category, fold), cell in by_cell.items():
        cell = sorted(cell, key=lambda r: r.path.stat().st_mtime if r.path.exists() else 0)
        kept.append(cell[-1])
        if len(cell) > 1:
            others = ", ".join(str(r.path) for r in cell[:-1])
            warnings.append(f"{category} fold {fold}: {len(cell)} runs, using {cell[-1].path} (not {others})")
    return kept, warnings


@dataclass
class Summary:
    """Mean ± SEM (as fractions) of one score column over categories (and their folds)."""

    mean: float | None
    sem: float | None
    sem_over: str | None  # "categories", "folds", or None when no SEM can be given
    per_category: dict[str, float] = field(default_factory=dict)
    folds: dict[str, list] = field(default_factory=dict)

    @property
    def n_categories(self) -> int:
        return len(self.per_category)


def sem(values: Sequence[float]) -> float | None:
    """Standard error of the mean, std(ddof=1) / sqrt(n); None for fewer than two values."""
    if len(values) < 2:
        return None
    return float(np.std(values, ddof=1) / math.sqrt(len(values)))


def summarise(values: Mapping[tuple[str, int | str], float | None]) -> Summary:
    """Per-category means over folds, then mean ± SEM over the per-category means.

    ``values`` maps (category, fold) to an AUROC; None values (a missing column or
    an undefined AUROC) are left out of the means. With one category the SEM is
    over its folds (``sem_over == "folds"``).
    """
    by_category: dict[str, dict] = defaultdict(dict)
    for (category, fold), value in values.items():
        if value is not None:
            by_category[category][fold] = value
    per_category = {c: float(np.mean(list(f.values()))) for c, f in sorted(by_category.items())}
    folds = {c: sorted(f, key=str) for c, f in sorted(by_category.items())}
    if not per_category:
        return Summary(None, None, None)
    means = list(per_category.values())
    if len(means) >= 2:
        return Summary(float(np.mean(means)), sem(means), "categories", per_category, folds)
    (only,) = by_category.values()
    fold_sem = sem(list(only.values()))
    return Summary(means[0], fold_sem, "folds" if fold_sem is not None else None, per_category, folds)


def summarise_column(records: Sequence[RunRecord], score_type: str | None, level: str = SUM) -> Summary:
    """:func:`summarise` of one score column over a group's runs."""
    return summarise({(r.category, r.fold): r.value(score_type, level) for r in records})


def completeness_warnings(
    label: str,
    records: Sequence[RunRecord],
    categories: Iterable[str] | None = None,
    folds: Iterable[int | str] | None = None,
) -> list[str]:
    """Lines naming the categories and folds a group lacks.

    Expected categories and folds default to those seen anywhere in ``records``.
    """
    seen: dict[str, set] = defaultdict(set)
    for record in records:
        seen[record.category].add(record.fold)
    expected_categories = sorted(set(categories) if categories is not None else set(seen))
    expected_folds = set(folds) if folds is not None else set().union(*seen.values()) if seen else set()
    warnings = []
    missing_categories = [c for c in expected_categories if c not in seen]
    if missing_categories:
        warnings.append(f"{label}: no runs for categories {', '.join(missing_categories)}")
    for category in expected_categories:
        if category in seen:
            missing = sorted(expected_folds - seen[category], key=str)
            if missing:
                found = ", ".join(map(str, sorted(seen[category], key=str)))
                warnings.append(
                    f"{label}: {category} lacks folds {', '.join(map(str, missing))} "
                    f"(its mean is over folds {found} only)"
                )
    return warnings


def missing_value_warnings(
    label: str, records: Sequence[RunRecord], score_type: str | None, level: str
) -> list[str]:
    """Lines naming the runs whose column is missing or undefined (left out of the means)."""
    gaps = [f"{r.category} fold {r.fold}" for r in records if r.value(score_type, level) is None]
    if not gaps:
        return []
    column = f"{score_type or 'image_auroc'}/{level}"
    return [f"{label}: {column} is missing or undefined for {', '.join(gaps)} (left out)"]
