"""Score columns: which score a number is (its kind) and where it comes from (a level, or the sum).

A column is written ``"<kind>/<level>"`` (``"mahalanobis/7"``) or ``"<kind>/sum"``
(the paper's sum mode: a kind's distances added over the levels). In CSV headers
the slash becomes an underscore (``mahalanobis_7``). :class:`ScoreColumn` is the
one parser and validator of these names; nothing else splits them. Pure Python
(no torch), so reading results stays light.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from anomaly.errors import UserError

SUM = "sum"  # sum mode: a score kind's distances added over the levels


@dataclass(frozen=True, order=True)
class ScoreColumn:
    """One score column: ``kind`` (e.g. ``mahalanobis``) and ``level`` (1-based, or ``None`` for the sum)."""

    kind: str
    level: int | None = None

    @classmethod
    def parse(cls, name: str) -> ScoreColumn:
        """``"mahalanobis/7"``, ``"mahalanobis/sum"`` or a bare kind (the sum); else :class:`UserError`."""
        if not isinstance(name, str):
            raise UserError(f"a score column is a string such as 'mahalanobis/sum', not {name!r}")
        kind, _, level = name.partition("/")
        if not kind or "/" in level:
            raise UserError(f"score column {name!r} is not <kind>/<level or {SUM}>")
        if level in ("", SUM):
            return cls(kind)
        if not level.isdigit() or int(level) < 1:
            raise UserError(f"score {name!r} names no level: use {kind}/{SUM} or {kind}/<level>")
        return cls(kind, int(level))

    @classmethod
    def from_csv_name(cls, header: str) -> ScoreColumn | None:
        """The column of a CSV header (``mahalanobis_7``, ``mahalanobis_sum``); ``None`` for headers
        that name no score column (``path``, ``decision``, ``map_max_x``)."""
        kind, _, level = header.rpartition("_")
        if not kind or not (level == SUM or (level.isdigit() and int(level) >= 1)):
            return None
        return cls(kind, None if level == SUM else int(level))

    @property
    def is_sum(self) -> bool:
        return self.level is None

    @property
    def level_name(self) -> str:
        """``"7"`` or ``"sum"``, as in ``results.json``."""
        return SUM if self.level is None else str(self.level)

    @property
    def csv_name(self) -> str:
        return f"{self.kind}_{self.level_name}"

    def __str__(self) -> str:
        return f"{self.kind}/{self.level_name}"

    def validate(self, kinds: Iterable[str], levels: Iterable[int], what: str = "score") -> ScoreColumn:
        """``self`` when its kind is one of ``kinds`` and its level one of ``levels`` (or the sum)."""
        kinds, levels = list(kinds), [int(level) for level in levels]
        if self.kind not in kinds or (self.level is not None and self.level not in levels):
            raise UserError(
                f"{what} '{self}' is not a score column: use <kind>/<level or {SUM}> with kind in "
                f"{', '.join(kinds)} and level in {', '.join([*map(str, levels), SUM])}"
            )
        return self


def column_name(kind: str, level: int | None) -> str:
    """The column of ``kind`` on ``level`` (``None``: the sum)."""
    return str(ScoreColumn(kind, level))


__all__ = ["SUM", "ScoreColumn", "column_name"]
