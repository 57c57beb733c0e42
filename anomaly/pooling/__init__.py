"""Pooling strategies: how each level's feature map becomes the vectors its Gaussian(s) model.

``global`` is the paper's; ``grid``, ``cells`` and ``grid_maps`` keep where a feature was
(``cells`` and ``grid_maps`` give anomaly maps). A new
pooling is one module with a :class:`~anomaly.pooling.base.Pooling` subclass,
listed in :data:`POOLINGS`.
"""

from __future__ import annotations

import inspect

from anomaly.errors import UserError
from anomaly.pooling.base import Pooling, check_grid_size, check_memory_budget
from anomaly.pooling.cells import Cells
from anomaly.pooling.global_ import Global
from anomaly.pooling.grid import Grid
from anomaly.pooling.grid_maps import RECOMMENDED_LEVELS, GridMaps, recommended_pooling

POOLINGS: dict[str, type[Pooling]] = {cls.name: cls for cls in (Global, Grid, Cells, GridMaps)}


def pooling_options(name: object) -> list[str]:
    """The options pooling ``name`` takes (e.g. ``["grid_size"]``); :class:`UserError` for unknown names."""
    if not isinstance(name, str) or name not in POOLINGS:
        raise UserError(f"pooling must be one of {', '.join(POOLINGS)}, got {name!r}")
    return list(inspect.signature(POOLINGS[name]).parameters)


def build_pooling(name: object, **options) -> Pooling:
    """The pooling ``name``, given those of ``options`` it takes (others, e.g. ``grid_size`` for global,
    are ignored); every pooling checks its options in its constructor."""
    accepted = pooling_options(name)
    return POOLINGS[name](**{key: value for key, value in options.items() if key in accepted})


__all__ = [
    "POOLINGS",
    "RECOMMENDED_LEVELS",
    "Cells",
    "Global",
    "Grid",
    "GridMaps",
    "Pooling",
    "build_pooling",
    "check_grid_size",
    "check_memory_budget",
    "pooling_options",
    "recommended_pooling",
]
