"""Choosing backbone levels (paper numbering, 1-based)."""

from __future__ import annotations

from collections.abc import Sequence

from anomaly.errors import UserError


def resolve_levels(levels: Sequence[int] | int | None, num_levels: int, backbone: str) -> list[int]:
    """Sorted unique levels; ``None`` means all of ``1..num_levels``."""
    if levels is None:
        return list(range(1, num_levels + 1))
    if isinstance(levels, int):
        levels = [levels]
    chosen = sorted(set(levels))
    bad = [level for level in chosen if isinstance(level, bool) or not isinstance(level, int)
           or not 1 <= level <= num_levels]  # fmt: skip
    if bad or not chosen:
        raise UserError(
            f"levels {list(levels)} are not valid for {backbone}, which has levels 1..{num_levels}"
        )
    return chosen
