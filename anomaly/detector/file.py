"""The detector file: safetensors for the tensors, JSON for everything else, no pickles.

``detector.safetensors`` holds every tensor (per level ``level.<i>.mean``,
``.precision``, ``.std``, ``.shrinkage`` and, after a PCA/NPCA reduction,
``.projection``; ``backbone.*`` only when the weights are embedded) and, in
its header, the JSON metadata: backbone id, weights reference, preprocessing,
levels, decision score, threshold. Loading
it runs no code from the file, so a detector from an untrusted source is safe to
open. ``detector.json`` beside it is a readable copy of the metadata; the
``.safetensors`` file alone is complete.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from anomaly.atomic import replaced_atomically
from anomaly.errors import UserError
from anomaly.evaluation.results import json_safe, write_atomic
from anomaly.stats.distances import SCORE_TYPES, SUM

FORMAT = "gaussian-anomaly-detector"
VERSION = 1
DETECTOR_FILE = "detector.safetensors"
METADATA_FILE = "detector.json"
METADATA_KEY = "detector"
SCORER_BUFFERS = ("projection", "mean", "precision", "std", "shrinkage")


def detector_path(path: str | Path) -> Path:
    """The ``.safetensors`` file meant by ``path``: the file itself, its ``.json`` copy, or a run folder."""
    path = Path(path).expanduser()
    if path.is_dir():
        return path / DETECTOR_FILE
    if path.suffix == ".json":
        return path.with_suffix(".safetensors")
    return path


def write_detector(path: str | Path, tensors: dict[str, Tensor], metadata: dict) -> Path:
    """Write ``path`` (atomically) and its ``.json`` metadata copy; returns the ``.safetensors`` path."""
    path = detector_path(path)
    if path.suffix != ".safetensors":
        path = path.with_suffix(".safetensors")
    metadata = {"format": FORMAT, "version": VERSION, **json_safe(metadata)}
    text = json.dumps(metadata, indent=2)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with replaced_atomically(path) as tmp:
        save_file(tensors, str(tmp), metadata={METADATA_KEY: text})
    write_atomic(path.with_suffix(".json"), text + "\n")
    return path


def read_detector(path: str | Path) -> tuple[dict[str, Tensor], dict]:
    """(tensors, metadata) of a detector file; :class:`UserError` if it is missing or not a detector."""
    path = detector_path(path)
    if not path.is_file():
        raise UserError(f"detector file not found: {path} (a run writes {DETECTOR_FILE} into its folder)")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as file:
            header = file.metadata() or {}
            tensors = {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118
    except Exception as exc:  # not a safetensors file, truncated, ...
        reason = " ".join(str(exc).split())[:200]
        raise UserError(f"{path} is not a readable detector file: {reason}") from exc
    try:
        metadata = json.loads(header[METADATA_KEY])
    except (KeyError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} has no detector metadata: it is not a detector file") from exc
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        found = metadata.get("format") if isinstance(metadata, dict) else None
        raise UserError(f"{path} is not a detector file (format {found!r})")
    version = metadata.get("version", 0)
    if is_int(version) and version > VERSION:
        raise UserError(f"{path} was written by a newer version (format {version}): upgrade")
    check_metadata(path, metadata)
    return tensors, metadata


def is_int(value: object) -> bool:
    """An int, not a bool (JSON ``true`` is not a number here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    return is_int(value) or isinstance(value, float)


def check_metadata(path: Path, meta: dict) -> None:
    """:class:`UserError` naming ``path`` and the field for the first missing or invalid metadata field."""

    def bad(field: str, problem: str) -> UserError:
        return UserError(
            f"{path}: detector metadata field {field!r} {problem}: the file is damaged or was edited"
        )

    for key in ("version", "backbone", "weights", "preprocessing", "levels", "decision_score"):
        if key not in meta:
            raise bad(key, "is missing")
    if not is_int(meta["version"]) or meta["version"] < 1:
        raise bad("version", f"must be a positive integer, not {meta['version']!r}")
    levels = meta["levels"]
    if not isinstance(levels, list) or not levels or not all(is_int(v) and v >= 1 for v in levels):
        raise bad("levels", f"must be a non-empty list of positive integers, not {levels!r}")
    score = meta["decision_score"]
    score_type, _, level = score.partition("/") if isinstance(score, str) else ("", "", "")
    if score_type not in SCORE_TYPES or level not in (SUM, *map(str, levels)):
        raise bad("decision_score", f"must be <{'|'.join(SCORE_TYPES)}>/<sum or a level>, not {score!r}")
    for key in ("threshold", "fpr"):
        if meta.get(key) is not None and not is_number(meta[key]):
            raise bad(key, f"must be a number or null, not {meta[key]!r}")
    if meta.get("fpr") is not None and not 0 < meta["fpr"] < 1:
        raise bad("fpr", f"must lie strictly between 0 and 1, not {meta['fpr']!r}")
    for key in ("thresholds", "source"):
        if meta.get(key) is not None and not isinstance(meta[key], dict):
            raise bad(key, f"must be an object or null, not {meta[key]!r}")
    if meta["backbone"] is None:
        return
    if not isinstance(meta["backbone"], str):
        raise bad("backbone", f"must be a backbone name or null, not {meta['backbone']!r}")
    if not isinstance(meta["weights"], dict) or not isinstance(meta["weights"].get("kind"), str):
        raise bad("weights", f"must be an object with a 'kind', not {meta['weights']!r}")
    preprocessing = meta["preprocessing"]
    if not isinstance(preprocessing, dict):
        raise bad("preprocessing", f"must be an object with an 'image_size', not {preprocessing!r}")
    size = preprocessing.get("image_size")
    if not is_int(size) or size < 1:
        raise bad("preprocessing.image_size", f"must be a positive integer, not {size!r}")


def level_tensors(tensors: dict[str, Tensor], index: int) -> dict[str, Tensor]:
    """The scorer buffers of the ``index``-th level (0-based position in ``levels``).

    A level without ``projection`` is unreduced: its projection is the identity.
    """
    try:
        found = {name: tensors[f"level.{index}.{name}"] for name in SCORER_BUFFERS if name != "projection"}
    except KeyError as exc:
        raise UserError(f"the detector file lacks tensor {exc.args[0]}: it is incomplete") from exc
    dim = found["mean"].shape[0]
    found["projection"] = tensors.get(f"level.{index}.projection", torch.eye(dim, dtype=found["mean"].dtype))
    return found
