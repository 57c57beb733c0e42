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
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from anomaly.errors import UserError
from anomaly.evaluation.results import json_safe, write_atomic

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
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(handle)
    try:
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        save_file(tensors, tmp, metadata={METADATA_KEY: text})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
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
    if metadata.get("format") != FORMAT:
        raise UserError(f"{path} is not a detector file (format {metadata.get('format')!r})")
    if metadata.get("version", 0) > VERSION:
        raise UserError(f"{path} was written by a newer version (format {metadata['version']}): upgrade")
    return tensors, metadata


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
