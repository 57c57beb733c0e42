"""The shipped configs: ``--config spatial_grid`` means ``configs/spatial_grid.yaml``.

A ``--config`` value that names an existing file is that file; otherwise a name
(with or without ``.yaml``, or as ``configs/NAME.yaml``) of a shipped config. ``anomaly configs``
lists them.

Every ``*.yaml`` of the clone's top-level ``configs/`` folder is a shipped config. A clone (also an
editable install) reads them there; a wheel carries them as the package data ``anomaly/configs/shipped``
(pyproject.toml maps that package onto ``configs/``).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from anomaly.errors import ArgumentsError

_INSTALLED = Path(__file__).resolve().parent / "shipped"
CONFIG_DIR = _INSTALLED if _INSTALLED.is_dir() else Path(__file__).resolve().parents[2] / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"
RECOMMENDED_CONFIG = CONFIG_DIR / "recommended.yaml"
#: What every ``anomaly fit`` starts from, in order: data and trainer, then the recommended detector.
DEFAULT_CONFIGS = (DEFAULT_CONFIG, RECOMMENDED_CONFIG)


def shipped_configs() -> list[str]:
    return sorted(path.stem for path in CONFIG_DIR.glob("*.yaml"))


def resolve_config(value: str) -> str:
    """The file behind a ``--config`` value: an existing file, else a shipped config's name."""
    if Path(value).expanduser().is_file():
        return value
    path = Path(value)
    shipped = CONFIG_DIR / (path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml")
    by_name = len(path.parts) == 1 or path.parent.as_posix() == "configs"  # also the old configs/NAME.yaml
    if by_name and shipped.is_file():
        return str(shipped)
    raise ArgumentsError(
        f"--config {value}: no such file, and no shipped config of that name "
        f"(shipped: {', '.join(shipped_configs())}; see `anomaly configs`)"
    )


def resolve_config_args(argv: Sequence[str]) -> list[str]:
    """``argv`` with every ``--config NAME`` (or ``--config=NAME``) replaced by its file."""
    out = list(argv)
    for at, token in enumerate(out):
        if token == "--config" and at + 1 < len(out):
            out[at + 1] = resolve_config(out[at + 1])
        elif token.startswith("--config="):
            out[at] = "--config=" + resolve_config(token.split("=", 1)[1])
    return out


def summary(name: str) -> str:
    """The first comment line of a shipped config."""
    for line in (CONFIG_DIR / f"{name}.yaml").read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def main(argv: Sequence[str] | None = None) -> int:
    """``anomaly configs``: each shipped config with the first line of its description."""
    if argv:
        print("usage: anomaly configs   (lists the configs that --config NAME accepts)", file=sys.stderr)
        return 0 if argv[0] in ("-h", "--help") else 2
    names = shipped_configs()
    width = max(map(len, names))
    for name in names:
        print(f"{name:<{width}}  {summary(name)}")
    print(f"\nfiles in {CONFIG_DIR}; use one with: anomaly fit --config NAME (several combine, last wins)")
    return 0
