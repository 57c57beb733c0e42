"""Names a package exports but imports on first use (PEP 562), off the paths that need none."""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module


def imported_on_first_use(package: str, modules: dict[str, str]) -> Callable[[str], object]:
    """A module-level ``__getattr__`` for ``package``: each name of ``modules`` comes from its module."""

    def __getattr__(name: str) -> object:
        if name in modules:
            return getattr(import_module(modules[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
