"""How each paper table is laid out from its columns' runs (levels, working points, methods, categories)."""

from __future__ import annotations

from collections.abc import Sequence

from anomaly.evaluation.tables import (
    LevelColumn,
    Table,
    category_table,
    level_table,
    methods_table,
    working_point_table,
)
from anomaly.experiments.grids import TableSpec


def build_table(spec: TableSpec, columns: Sequence[LevelColumn]) -> Table:
    """The measured table with the paper's values beside the measured ones."""
    if spec.layout == "levels":
        return level_table(spec.title, columns, paper_table=spec.name, notes=spec.notes)
    if spec.layout == "working_point":
        return working_point_table(spec.title, columns, level=spec.level, paper_table=spec.name)
    if spec.layout == "methods":
        return methods_table(spec.title, columns, notes=spec.notes)
    if spec.layout == "categories":
        return category_table(spec.title, columns, paper_table=spec.name)
    raise ValueError(f"unknown table layout {spec.layout!r}")
