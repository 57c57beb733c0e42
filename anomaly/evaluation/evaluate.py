"""``anomaly evaluate RUNS_DIR [RUNS_DIR ...]``: tables of mean ± SEM from every ``results.json`` below
one or several folders (or glob patterns), e.g. the runs folders of a sweep's shards.

Runs are grouped by (method, backbone, settings, run name). For each group a
level table (levels × score types, Table I layout); across groups a per-category
table of each group's primary score (Table VIII layout); and, where runs hold
working points, a Table IV-style table per level. Missing folds and categories
are warned about; unreadable or incomplete ``results.json`` files are skipped
with a warning. A (category, fold) found twice in a group, in one folder or in
several, counts once: the most recently written ``results.json`` is used, and a
warning names the others.

``--out FILE`` also writes the tables to FILE, whole, after a first comment line naming the
command (``<!-- written by anomaly evaluate -->``, ``# written by anomaly evaluate`` or
``% written by anomaly evaluate`` for md, csv and latex). FILE is claimed before any run is read:
a file that begins so (an earlier --out) is replaced; any other existing file only with
--overwrite; a ``results.json`` it reads, never.
"""

from __future__ import annotations

import argparse
import glob
import sys
from collections.abc import Sequence
from pathlib import Path

from anomaly.console import run_command
from anomaly.data.images import require_folder
from anomaly.errors import UserError
from anomaly.evaluation.aggregate import (
    ALL_FOLDS,
    GroupKey,
    RunRecord,
    collect_runs,
    completeness_warnings,
    deduplicate,
    group_runs,
    level_sort_key,
)
from anomaly.evaluation.results import RESULTS_FILE
from anomaly.evaluation.tables import (
    FORMATS,
    LevelColumn,
    Table,
    category_table,
    claim_table_file,
    emit,
    file_start,
    format_tables,
    level_table,
    out_help,
    working_point_rows,
    working_point_table,
)


def group_labels(keys: Sequence[GroupKey]) -> dict[GroupKey, str]:
    """``method/run name``; numbered ``[1]``, ``[2]`` … where groups of other settings look alike."""
    plain = [k.label for k in keys]
    labels, counters = {}, {}
    for key in keys:
        if plain.count(key.label) == 1:
            labels[key] = key.label
        else:
            counters[key.label] = counters.get(key.label, 0) + 1
            labels[key] = f"{key.label} [{counters[key.label]}]"
    return labels


def build_tables(
    groups: dict[GroupKey, list[RunRecord]], working_points: bool = False
) -> tuple[list[Table], list[str]]:
    """The tables of :mod:`anomaly.evaluation.evaluate` and the warnings behind them.

    ``working_points``: add a working-point table for each level of the runs that hold them.
    """
    all_records = [r for records in groups.values() for r in records]
    categories = sorted({r.category for r in all_records})
    folds = {  # the folds expected of each protocol: 5-fold groups, and fits on all images
        whole: sorted({r.fold for r in all_records if (r.fold == ALL_FOLDS) == whole}, key=str)
        for whole in (False, True)
    }
    tables, warnings = [], []
    primary_columns = []
    labels = group_labels(list(groups))
    for key, records in groups.items():
        label = labels[key]
        group_warnings = completeness_warnings(label, records, categories, folds[key.whole])
        warnings += group_warnings
        score_types = list(records[0].results.get("scores") or {})
        columns = [LevelColumn(t, records, t) for t in score_types]
        table = level_table(f"{label}: image AUROC (± SEM, %) per level", columns)
        if label != key.label:
            table.notes.append(f"{label}: data {key.dataset or '(not recorded)'}, settings {key.settings}")
        table.notes += group_warnings
        tables.append(table)
        primary_columns.append(LevelColumn(label, records, None))
        levels = sorted(
            {lv for r in records for lv in (r.results.get("working_point") or {}).get("levels", {})},
            key=level_sort_key,
        )
        if levels and not working_points:
            table.notes.append("the runs hold working points: --working-points shows them")
        for level in levels if working_points else []:
            if any(working_point_rows(r.results, level) for r in records):
                column = LevelColumn(label, records, "mahalanobis")
                title = f"{label}: working points at level {level} (achieved test FPR / TPR, %)"
                tables.append(working_point_table(title, [column], level=level))
    if len(categories) > 1 or len(primary_columns) > 1:
        tables.append(category_table("Primary score per category (mean over folds, %)", primary_columns))
    return tables, warnings


COMMAND = "anomaly evaluate"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=COMMAND,
        description="Aggregate every results.json below RUNS_DIR into tables of mean ± SEM "
        "(per category: mean over folds; overall: mean ± SEM over the per-category means).",
    )
    parser.add_argument(
        "runs_dir",
        nargs="+",
        help="folders (or glob patterns such as 'runs-shard*') searched recursively for results.json "
        "files; several are merged, and a run found twice counts once (the most recently written)",
    )
    parser.add_argument("--format", choices=FORMATS, default="md", help="table format (default: md)")
    parser.add_argument(
        "--out", help=out_help("also write the tables to this file", COMMAND, "a results.json it reads")
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="let --out replace a file that is not an earlier table"
    )
    parser.add_argument(
        "--working-points",
        action="store_true",
        help="add the working-point tables (Table IV layout) per level",
    )
    return parser


def runs_folders(patterns: Sequence[str]) -> list[Path]:
    """The folders named by ``patterns`` (globs expanded), each once, nested ones dropped.

    A folder inside another given one would only find the same runs again.
    """
    folders: list[Path] = []
    for pattern in patterns:
        is_glob = any(char in pattern for char in "*?[")
        matches = [Path(p) for p in sorted(glob.glob(pattern))] if is_glob else [Path(pattern)]
        if not matches:
            raise UserError(f"no runs folder matches '{pattern}': give the folders your runs were written to")
        for folder in matches:
            folders.append(require_folder(folder, "runs folder", "give the folder your runs were written to"))
    resolved = [f.resolve() for f in folders]
    kept = []
    for folder, path in zip(folders, resolved, strict=True):
        inside_another = any(other != path and other in path.parents for other in resolved)
        if not inside_another and path not in [k.resolve() for k in kept]:
            kept.append(folder)
    return kept


def run(argv: Sequence[str] | None = None) -> int:
    options = build_parser().parse_args(argv)
    roots = runs_folders(options.runs_dir)
    inputs = (path for root in roots for path in Path(root).rglob(RESULTS_FILE))
    out = claim_table_file(options.out, command=COMMAND, inputs=inputs, overwrite=options.overwrite)
    records, problems = [], []
    for root in roots:
        found, skipped = collect_runs(root)
        records += found
        problems += skipped
    for line in problems:
        print(f"warning: {line}", file=sys.stderr)
    if not records:
        where = ", ".join(f"'{root}'" for root in roots)
        raise UserError(
            f"no complete results.json below {where}: run anomaly fit (or anomaly reproduce) first"
        )
    groups = {}
    for key, group in group_runs(records).items():
        kept, duplicates = deduplicate(group)
        for line in duplicates:
            print(f"warning: {key.label}: {line}", file=sys.stderr)
        groups[key] = kept
    tables, warnings = build_tables(groups, options.working_points)
    emit(format_tables(tables, options.format), warnings, out, file_start(COMMAND, options.format))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(lambda: run(argv))
