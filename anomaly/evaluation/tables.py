"""Tables of mean ± SEM AUROC in the paper's layout, as Markdown, CSV or LaTeX.

A :class:`Table` holds text cells and :class:`Stat` cells (mean ± SEM in
percent). Markdown and LaTeX show ``96.7 ± 1.0``; CSV gives every statistic
column a ``mean`` and a ``sem`` column so that the numbers stay machine-readable.
"""

from __future__ import annotations

import csv
import io
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from anomaly.evaluation.aggregate import (
    SUM,
    RunRecord,
    Summary,
    level_sort_key,
    missing_value_warnings,
    summarise,
    summarise_column,
)
from anomaly.evaluation.paper_values import paper_level_value
from anomaly.evaluation.results import write_atomic
from anomaly.outputs import claim_output, starts_with

FORMATS = ("md", "csv", "latex")
#: Each format's comment line: the first line of a table file names the command that wrote it.
COMMENTS = {"md": "<!-- {} -->", "csv": "# {}", "latex": "% {}"}


@dataclass(frozen=True)
class Stat:
    """Mean and SEM in percent; ``sem`` None when it cannot be given; ``mark`` flags the SEM's basis."""

    mean: float
    sem: float | None = None
    mark: str = ""

    def text(self) -> str:
        if self.sem is None:
            return f"{self.mean:.1f}{self.mark}"
        return f"{self.mean:.1f} ± {self.sem:.1f}{self.mark}"


Cell = str | Stat | None

FOLD_SEM_MARK = "†"
FOLD_SEM_NOTE = (
    f"{FOLD_SEM_MARK} one category only: the SEM is over its folds "
    "(the paper's SEM is over the per-category means of 15 categories)"
)


def stat_of(summary: Summary) -> Stat | None:
    """The summary in percent, marked when its SEM is over folds."""
    if summary.mean is None:
        return None
    sem = None if summary.sem is None else 100 * summary.sem
    return Stat(100 * summary.mean, sem, FOLD_SEM_MARK if summary.sem_over == "folds" else "")


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[Cell]]
    notes: list[str] = field(default_factory=list)

    def column(self, name: str) -> list[Cell]:
        index = self.header.index(name)
        return [row[index] for row in self.rows]


def _text(cell: Cell) -> str:
    if cell is None:
        return "-"
    return cell.text() if isinstance(cell, Stat) else str(cell)


def format_markdown(table: Table) -> str:
    lines = [f"**{table.title}**", ""] if table.title else []
    lines.append("| " + " | ".join(table.header) + " |")
    lines.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(table.header))) + "|")
    lines += ["| " + " | ".join(_text(c) for c in row) + " |" for row in table.rows]
    if table.notes:
        lines.append("")
        lines += [f"- {note}" for note in table.notes]
    return "\n".join(lines)


def format_csv(table: Table) -> str:
    """Comma-separated values; statistic columns split into ``<name> mean`` and ``<name> sem``."""
    is_stat = [any(isinstance(row[i], Stat) for row in table.rows) for i in range(len(table.header))]
    header: list[str] = []
    for name, stat in zip(table.header, is_stat, strict=True):
        header += [f"{name} mean", f"{name} sem"] if stat else [name]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in table.rows:
        out: list = []
        for cell, stat in zip(row, is_stat, strict=True):
            if stat:
                out += ["", ""] if not isinstance(cell, Stat) else [f"{cell.mean:.4f}", _num(cell.sem)]
            else:
                out.append("" if cell is None else str(cell))
        writer.writerow(out)
    return buffer.getvalue().rstrip("\n")


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "_": r"\_", "#": r"\#", "$": r"\$"}


def _latex_escape(text: str) -> str:
    return "".join(LATEX_ESCAPES.get(ch, ch) for ch in text)


def _latex_cell(cell: Cell) -> str:
    if isinstance(cell, Stat):
        mark = r"\textsuperscript{\dag}" if cell.mark else ""
        return (
            f"${cell.mean:.1f}$" + mark
            if cell.sem is None
            else f"${cell.mean:.1f} \\pm {cell.sem:.1f}$" + mark
        )
    return _latex_escape(_text(cell))


def format_latex(table: Table) -> str:
    """A ``table`` environment with a booktabs ``tabular``; notes go into the caption."""
    spec = "l" + "r" * (len(table.header) - 1)
    caption = _latex_escape(table.title + (" " + " ".join(table.notes) if table.notes else ""))
    caption = caption.replace(FOLD_SEM_MARK, r"\dag{}")
    lines = [
        r"\begin{table}",
        r"\centering",
        f"\\caption{{{caption}}}",
        f"\\begin{{tabular}}{{{spec}}}",
        r"\toprule",
        " & ".join(_latex_escape(h) for h in table.header) + r" \\",
        r"\midrule",
        *(" & ".join(_latex_cell(c) for c in row) + r" \\" for row in table.rows),
        r"\bottomrule",
        r"\end{tabular}",
        r"\end{table}",
    ]
    return "\n".join(lines)


def format_table(table: Table, fmt: str = "md") -> str:
    if fmt == "md":
        return format_markdown(table)
    if fmt == "csv":
        return format_csv(table)
    if fmt == "latex":
        return format_latex(table)
    raise ValueError(f"unknown table format {fmt!r}; use one of {', '.join(FORMATS)}")


def format_tables(tables: Sequence[Table], fmt: str = "md") -> str:
    """Several tables, one after another (CSV: each headed by a ``# title`` line)."""
    if fmt == "csv":
        return "\n\n".join(f"# {t.title}\n{format_csv(t)}" for t in tables)
    return "\n\n".join(format_table(t, fmt) for t in tables)


# ----------------------------------------------------------------- builders
@dataclass
class LevelColumn:
    """One column of a level table: the runs, the score type, and the paper's column to show beside it."""

    label: str
    records: Sequence[RunRecord]
    score_type: str | None
    paper_column: str | None = None


def levels_of(records: Sequence[RunRecord], score_type: str | None) -> list[str]:
    levels: set[str] = set()
    for record in records:
        if score_type is None:
            levels |= set((record.results.get("per_level") or {}).keys())
        else:
            levels |= set(((record.results.get("scores") or {}).get(score_type) or {}).get("per_level", {}))
    return sorted(levels, key=level_sort_key)


def basis_note(records: Sequence[RunRecord]) -> str:
    """Which runs the statistics are over, e.g. ``1 category (bottle) × folds 0-4``."""
    by_category: dict[str, set] = {}
    for record in records:
        by_category.setdefault(record.category, set()).add(record.fold)
    if not by_category:
        return "no runs"
    folds = sorted({f for fs in by_category.values() for f in fs}, key=str)
    names = ", ".join(sorted(by_category))
    return (
        f"{len(by_category)} categor{'y' if len(by_category) == 1 else 'ies'} ({names}) × "
        f"folds {', '.join(map(str, folds))}; per category the mean over its folds, "
        "then the mean ± SEM over the per-category means"
    )


def level_table(
    title: str, columns: Sequence[LevelColumn], paper_table: str | None = None, notes: Sequence[str] = ()
) -> Table:
    """Rows = levels then ``sum``; one mean ± SEM column per :class:`LevelColumn` (and its paper value)."""
    levels = sorted({lv for c in columns for lv in levels_of(c.records, c.score_type)}, key=level_sort_key)
    levels.append(SUM)
    header = ["level"]
    for column in columns:
        header.append(column.label)
        if paper_table and column.paper_column:
            header.append(f"{column.label} (paper)")
    rows: list[list[Cell]] = []
    warnings: list[str] = []
    fold_sem = False
    for level in levels:
        row: list[Cell] = [level]
        for column in columns:
            summary = summarise_column(column.records, column.score_type, level)
            fold_sem |= summary.sem_over == "folds"
            row.append(stat_of(summary))
            warnings += missing_value_warnings(column.label, column.records, column.score_type, level)
            if paper_table and column.paper_column:
                paper = paper_level_value(paper_table, column.paper_column, level)
                row.append(None if paper is None else Stat(*paper))
        rows.append(row)
    all_records = [r for c in columns for r in c.records]
    table_notes = [f"AUROC in percent over {basis_note(all_records)}", *notes, *warnings]
    if fold_sem:
        table_notes.append(FOLD_SEM_NOTE)
    return Table(title, header, rows, table_notes)


def category_table(title: str, columns: Sequence[LevelColumn], paper_table: str | None = None) -> Table:
    """Rows = categories (mean over folds of the summed score), then the mean ± SEM row (Table VIII)."""
    from anomaly.evaluation.paper_values import paper_table as load_paper_table

    paper = load_paper_table(paper_table).get("columns", {}) if paper_table else {}
    summaries = [summarise_column(c.records, c.score_type, SUM) for c in columns]
    categories = sorted({cat for s in summaries for cat in s.per_category})
    header = ["category"]
    for column in columns:
        header.append(column.label)
        if column.paper_column in paper:
            header.append(f"{column.label} (paper)")
    rows: list[list[Cell]] = []
    for category in [*categories, "mean ± SEM"]:
        row: list[Cell] = [category]
        for column, summary in zip(columns, summaries, strict=True):
            if category in summary.per_category:
                row.append(Stat(100 * summary.per_category[category]))
            else:
                row.append(stat_of(summary) if category == "mean ± SEM" else None)
            if column.paper_column in paper:
                entry = paper[column.paper_column]
                if category == "mean ± SEM":
                    row.append(Stat(entry["mean"], entry["sem"]))
                else:
                    value = entry["per_category"].get(category)
                    row.append(None if value is None else Stat(value))
        rows.append(row)
    notes = [f"AUROC in percent over {basis_note([r for c in columns for r in c.records])}"]
    if any(s.sem_over == "folds" for s in summaries):
        notes.append(FOLD_SEM_NOTE)
    return Table(title, header, rows, notes)


def working_point_rows(results: dict, level: str) -> dict[str, dict]:
    """``{row name: row}`` of a level's working points (``n_sigma`` rows, then the target-FPR row)."""
    entry = ((results.get("working_point") or {}).get("levels") or {}).get(str(level)) or {}
    rows = {}
    for row in entry.get("rows") or []:
        n = row.get("n_sigma")
        rows[str(n) if n is not None else f"FPR {100 * float(row['target_fpr']):g}%"] = row
    return rows


def working_point_table(
    title: str,
    columns: Sequence[LevelColumn],
    level: str = "7",
    kind: str = "chi2",
    paper_table: str | None = None,
) -> Table:
    """Table IV: per n·σ row the target FPR and each column's achieved test FPR and TPR, then the AUROC.

    ``kind`` is ``chi2`` (threshold of eq. 8) or ``empirical`` (held-out normal images).
    """
    from anomaly.evaluation.paper_values import paper_table as load_paper_table

    paper = load_paper_table(paper_table) if paper_table else {}
    paper_columns = paper.get("columns", {})
    names: dict[str, float] = {}
    for column in columns:
        for record in column.records:
            for name, row in working_point_rows(record.results, level).items():
                names.setdefault(name, float(row.get("target_fpr", math.nan)))
    header = ["n", "target FPR"]
    for column in columns:
        header += [f"{column.label} FPR", f"{column.label} TPR"]
        if column.paper_column in paper_columns:
            header += [f"{column.label} FPR (paper)", f"{column.label} TPR (paper)"]
    rows: list[list[Cell]] = []
    for name, target in names.items():
        row: list[Cell] = [name, f"{100 * target:.3g}"]
        for column in columns:
            for rate in ("fpr", "tpr"):
                values = {
                    (r.category, r.fold): working_point_rows(r.results, level)
                    .get(name, {})
                    .get(f"{kind}_{rate}")
                    for r in column.records
                }
                row.append(stat_of(summarise(values)))
            if column.paper_column in paper_columns:
                entry = paper_columns[column.paper_column]
                row += [_paper_stat(entry["fpr"].get(name)), _paper_stat(entry["tpr"].get(name))]
        rows.append(row)
    auroc_row: list[Cell] = ["AUROC", ""]
    for column in columns:
        auroc_row += [stat_of(summarise_column(column.records, column.score_type, str(level))), ""]
        if column.paper_column in paper_columns:
            auroc_row += [_paper_stat(paper_columns[column.paper_column].get("auroc")), ""]
    rows.append(auroc_row)
    basis = basis_note([r for c in columns for r in c.records])
    notes = [f"level {level}, {kind} thresholds; rates in percent over {basis}"]
    if not names:
        notes.append("no run holds a working_point section for this level")
    return Table(title, header, rows, notes)


def _paper_stat(value: float | None) -> Stat | None:
    return None if value is None else Stat(float(value))


def methods_table(title: str, columns: Sequence[LevelColumn], notes: Sequence[str] = ()) -> Table:
    """Table V: one row per method, measured mean ± SEM beside the paper's; the literature rows after."""
    from anomaly.evaluation.paper_values import paper_table as load_paper_table

    per_category = load_paper_table("table8").get("columns", {})
    header = ["approach", "measured", "paper"]
    rows: list[list[Cell]] = []
    for column in columns:
        entry = per_category.get(column.paper_column or "")
        paper = None if entry is None else Stat(entry["mean"], entry["sem"])
        rows.append([column.label, stat_of(summarise_column(column.records, column.score_type, SUM)), paper])
    for row in load_paper_table("table5").get("rows", [])[:4]:
        rows.append([f"{row['approach']} ({row['architecture']})", None, Stat(row["mean"], row["sem"])])
    basis = basis_note([r for c in columns for r in c.records])
    return Table(title, header, rows, [f"AUROC in percent over {basis}", *notes])


def file_start(command: str, fmt: str) -> str:
    """The first line of every table file ``command`` writes in ``fmt``: a comment naming the command."""
    return COMMENTS[fmt].format(f"written by {command}") + "\n"


def out_help(what: str, command: str, inputs: str) -> str:
    """The ``--out`` help of ``command``: ``what`` it does, and how it recognises its files."""
    starts = ", ".join(f"{fmt}: '{file_start(command, fmt).strip()}'" for fmt in FORMATS)
    text = (
        f"{what}, after a first line naming the command ({starts}); a file that begins so is "
        f"replaced, another existing file only with --overwrite; never {inputs}"
    )
    return text.replace("%", "%%")  # argparse formats help strings with %


def claim_table_file(
    out: str | None, *, command: str, inputs: Iterable[str | Path] = (), overwrite: bool = False
) -> Path | None:
    """``out`` claimed for ``command`` (:func:`anomaly.outputs.claim_output`) before any work.

    A table file ``command`` wrote before, in any format (:func:`file_start`), is replaced; another
    existing file only with ``overwrite``; one of ``inputs`` never.
    """
    if out is None:
        return None
    earlier = [starts_with(file_start(command, fmt).encode()) for fmt in FORMATS]
    return claim_output(
        out, inputs=inputs, ours=lambda path: any(recognise(path) for recognise in earlier),
        overwrite=overwrite, command=command,
    )  # fmt: skip


def emit(text: str, warnings: Sequence[str], out: str | Path | None = None, start: str = "") -> None:
    """Warnings to stderr, the table to stdout and, when asked, written whole to the file ``out``
    (folders created) after the line ``start``."""
    for line in warnings:
        print(f"warning: {line}", file=sys.stderr)
    print(text)
    if out is not None:
        write_atomic(Path(out), start + text + "\n")
