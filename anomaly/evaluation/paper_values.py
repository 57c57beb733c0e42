"""The paper's published numbers (Tables I-V, VII, VIII), typed in from the paper as data.

The values live in ``paper_tables.json`` beside this module, in percent. Level
tables map a column label to ``{level: [mean, SEM]}``; Table IV maps a column to
its achieved FPR/TPR per n·σ row; Table V is a list of rows; Table VIII maps a
column to its per-category AUROC with the mean and SEM over the 15 categories.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

PAPER_TABLES_FILE = Path(__file__).with_name("paper_tables.json")


@cache
def paper_tables() -> dict:
    """All tables, keyed ``table1`` … ``table8``."""
    with open(PAPER_TABLES_FILE, encoding="utf-8") as file:
        return json.load(file)["tables"]


def paper_table(name: str) -> dict:
    """One table (``"table1"``), or an empty dict when the paper has none of that name."""
    return paper_tables().get(name, {})


def paper_level_value(table: str, column: str, level: str) -> tuple[float, float] | None:
    """(mean, SEM) in percent of a level table's cell, or None when the paper has no such cell."""
    cell = paper_table(table).get("columns", {}).get(column, {}).get(str(level))
    return None if cell is None else (float(cell[0]), float(cell[1]))
