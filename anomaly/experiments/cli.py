"""``anomaly reproduce TABLE --data.root ROOT``: run a paper table's grid, then print it.

Examples::

    anomaly reproduce table1 --data.root /data/mvtec_ad
    anomaly reproduce table1 --data.root /data/mvtec_ad --categories bottle \\
        --backbone efficientnet-lite0                      # a quick look on one category
    anomaly reproduce table3 --data.root /data/mvtec_ad --dry-run
    anomaly reproduce table2 --data.root /data/mvtec_ad -- --data.num_workers 4
    anomaly reproduce table5 --data.root /data/mvtec_ad --shard 0/8   # 1/8 of the grid
    anomaly reproduce table5 --data.root /data/mvtec_ad --devices 4   # 4 runs at once

Arguments after ``--`` go to every training run unchanged.

``--out FILE`` also writes the table to FILE, whole, after a first comment line naming the
command (``<!-- written by anomaly reproduce -->``, ``# written by anomaly reproduce`` or
``% written by anomaly reproduce`` for md, csv and latex). FILE is claimed before any run: a file
that begins so (an earlier --out) is replaced; any other existing file only with --overwrite;
an input of the runs (an image of the data root, a file named in their arguments, a cache, a
``results.json`` or record of the runs folder), never.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from anomaly.console import run_command
from anomaly.data import MVTEC_CATEGORIES
from anomaly.data.images import require_folder
from anomaly.errors import UserError
from anomaly.evaluation.results import RESULTS_FILE
from anomaly.evaluation.tables import FORMATS, claim_table_file, emit, file_start, format_table, out_help
from anomaly.experiments.cells import INDEX_DIR, RunIndex
from anomaly.experiments.grids import TABLES, TableSpec
from anomaly.experiments.runner import grid_cells, measured_table, run_grid
from anomaly.experiments.sharding import Shard, device_ids

PAPER_FOLDS = (0, 1, 2, 3, 4)
COMMAND = "anomaly reproduce"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=COMMAND,
        description="Run the grid (categories × folds × settings) of one of the paper's tables, resumably, "
        "then print the table with the paper's values beside the measured ones.",
        epilog="Arguments after '--' are passed to every training run (e.g. -- --data.num_workers 4).",
    )
    parser.add_argument("table", choices=sorted(TABLES), help="the paper's table")
    parser.add_argument(
        "--data.root", dest="data_root", required=True, help="folder holding the MVTec AD categories"
    )
    parser.add_argument(
        "--categories", nargs="+", help="categories to run (default: the MVTec AD ones under the root)"
    )
    parser.add_argument(
        "--folds", nargs="+", type=int, default=list(PAPER_FOLDS), help="folds (default: 0 1 2 3 4)"
    )
    parser.add_argument(
        "--backbone",
        nargs="+",
        help="Tables I, III: use this backbone instead; others: only these backbones' columns",
    )
    parser.add_argument("--runs-dir", default="runs", help="where runs are written and found (default: runs)")
    parser.add_argument(
        "--feature-cache",
        help="feature cache folder shared by the feature-based runs (default: <runs-dir>/feature_cache)",
    )
    parser.add_argument(
        "--no-feature-cache", action="store_true", help="extract features in every run instead"
    )
    parser.add_argument(
        "--image-cache",
        help="resized-image cache folder shared by every run (off by default): the augmented and "
        "trained runs decode each image once; about 150 KB an image at 224 px",
    )
    parser.add_argument(
        "--no-figures",
        action="store_true",
        help="skip each run's PNGs and TensorBoard figures (about a second a run); results are the same",
    )
    parser.add_argument(
        "--shard",
        default="0/1",
        help="run only part K of N of the grid (K = 0..N-1, e.g. 0/8 ... 7/8; a SLURM array job: "
        "--array=0-7 and --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT). The split is fixed by "
        "the table, categories and folds: give every shard the same ones. Merge the shards' runs "
        "folders with evaluate, or share one runs folder (default: 0/1, the whole grid)",
    )
    parser.add_argument(
        "--devices",
        help="run up to this many runs at once, each in its own process on one GPU: a number (the "
        "first N visible GPUs) or GPU ids such as 0,1,3 (default: one run after another, in this process)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="list the runs (done or to do) and run nothing"
    )
    parser.add_argument("--format", choices=FORMATS, default="md", help="table format (default: md)")
    parser.add_argument(
        "--out", help=out_help("also write the table to this file", COMMAND, "an input of the runs")
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="let --out replace a file that is not an earlier table"
    )
    return parser


def split_extra(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    argv = list(argv)
    if "--" in argv:
        at = argv.index("--")
        return argv[:at], argv[at + 1 :]
    return argv, []


def resolve_categories(root: Path, requested: Sequence[str] | None) -> list[str]:
    """The requested categories, checked; by default the MVTec AD categories found under ``root``."""
    require_folder(root, "data root", "set --data.root to the folder holding the categories")
    present = sorted(p.name for p in root.iterdir() if (p / "train").is_dir())
    if requested:
        unknown = [c for c in requested if c not in present]
        if unknown:
            raise UserError(
                f"categories {', '.join(unknown)} are not under '{root}' "
                f"(found: {', '.join(present) or 'none'})"
            )
        return list(requested)
    mvtec = [c for c in MVTEC_CATEGORIES if c in present]
    chosen = mvtec or present
    if not chosen:
        raise UserError(f"no category folders (with a train/ folder) under '{root}'")
    missing = [c for c in MVTEC_CATEGORIES if c not in present]
    if mvtec and missing:
        print(
            f"warning: {len(missing)} of the 15 MVTec AD categories are not under '{root}' "
            f"({', '.join(missing)}); the table covers {', '.join(chosen)} only",
            file=sys.stderr,
        )
    return chosen


def dry_run_lines(
    table: str, cells, index: RunIndex, root: Path, runs_dir: Path, extra: Sequence[str], cache: Path | None
) -> list[str]:
    done = [index.record(c) is not None for c in cells]
    lines = [f"{table}: {len(cells)} runs, {sum(done)} done, {len(cells) - sum(done)} to run"]
    for cell, finished in zip(cells, done, strict=True):
        command = shlex.join(["anomaly", "fit", *cell.command(root, runs_dir, extra, cache)])
        lines.append(f"[{'done' if finished else 'todo'}] {command}")
    return lines


def run_inputs(
    spec: TableSpec,
    extra: Sequence[str],
    root: Path,
    categories: Sequence[str],
    runs_dir: Path,
    caches: Sequence[Path],
) -> Iterator[Path]:
    """What the runs read, looked for only when needed: the categories' files, the files named in
    the runs' arguments (configs, weights), the caches, and the results and records of ``runs_dir``."""
    for folder in [*(root / c for c in categories), *caches]:
        yield from folder.rglob("*")
    named = {argument for setting in spec.settings for argument in setting.args} | set(extra)
    yield from (path for path in map(Path, sorted(named)) if path.is_file())
    yield from runs_dir.rglob(RESULTS_FILE)
    yield from (runs_dir / INDEX_DIR).rglob("*")


def run(argv: Sequence[str] | None = None) -> int:
    own, extra = split_extra(sys.argv[1:] if argv is None else argv)
    options = build_parser().parse_args(own)
    folds = sorted(set(options.folds))
    if any(not 0 <= f < len(PAPER_FOLDS) for f in folds):
        raise UserError(
            f"folds must be in 0..{len(PAPER_FOLDS) - 1}, got {' '.join(map(str, options.folds))}"
        )
    root, runs_dir = Path(options.data_root), Path(options.runs_dir)
    shared = ["--data.image_cache", options.image_cache] if options.image_cache else []
    extra = [*shared, *(["--figures", "false"] if options.no_figures else []), *extra]
    spec = TABLES[options.table].with_backbones(options.backbone)
    categories = resolve_categories(root, options.categories)
    shard = Shard.parse(options.shard)
    devices = device_ids(options.devices) if options.devices is not None else None
    cells = shard.select(grid_cells(spec, categories, folds))
    cache = None if options.no_feature_cache else Path(options.feature_cache or runs_dir / "feature_cache")
    caches = [Path(p) for p in (cache, options.image_cache) if p is not None]
    inputs = run_inputs(spec, extra, root, categories, runs_dir, caches)
    out = claim_table_file(options.out, command=COMMAND, inputs=inputs, overwrite=options.overwrite)
    index = RunIndex(runs_dir, root, extra)
    if options.dry_run:
        lines = dry_run_lines(spec.name, cells, index, root, runs_dir, extra, cache)
        if shard.count > 1:
            lines[0] = f"shard {shard} of {lines[0]}"
        print("\n".join(lines))
        return 0
    ran, skipped = run_grid(cells, root, runs_dir, extra, feature_cache=cache, devices=devices)
    print(f"{spec.name}: {ran} runs done now, {skipped} finished before", file=sys.stderr)
    if shard.count > 1:
        print(
            f"{spec.name}: shard {shard} is complete; once every shard is, print the table with "
            f"evaluate on the runs folders, or run this command without --shard on a shared runs folder",
            file=sys.stderr,
        )
        return 0
    table, warnings = measured_table(spec, categories, folds, index)
    emit(format_table(table, options.format), warnings, out, file_start(COMMAND, options.format))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(lambda: run(argv), on_interrupt="finished runs are kept and will be skipped next time")
