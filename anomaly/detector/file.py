"""The detector file: safetensors for the tensors, JSON for everything else, no pickles.

``detector.safetensors`` holds every tensor of a :class:`~anomaly.detector.model.GaussianDetectorModel`
and, in its header, the JSON metadata (backbone, weights reference, preprocessing,
levels, pooling, level weighting, decision score, threshold, map threshold and floor, training precision,
and the SHA-256 of the tensors). ``detector.json`` beside it is a readable copy;
the ``.safetensors`` file alone is complete.

Tensors, per level *number* ``L`` (so that editing ``levels`` cannot mislabel a level):
``level.<L>.mean``, ``.precision``, ``.std``, ``.shrinkage`` and, after a PCA/NPCA
reduction, ``.projection`` (all float64; for ``cells`` pooling each has a leading
cell axis); ``level_stats`` (kinds x levels x 2) with ``holdout`` level weighting;
``backbone.*`` only when the backbone's weights are embedded.

A detector that can keep learning (``anomaly update``, ``anomaly merge``,
``GaussianDetector.partial_fit``) also holds, per level, the streamed float64 moments
of everything it absorbed, ``moments.<L>.count``, ``.shift``, ``.sum``, ``.outer``,
``.sqnorm_vec``, ``.quartic`` (with a leading cell axis for ``cells``), and after a
PCA/NPCA reduction the absorbed rows ``rows.<L>`` (samples x width), which the
reduced space's fourth moment needs; its metadata ``learning`` records the image
count, the sample count and the SHA-256 of every absorbed image. Files without
them (written before, or saved with ``moments=False``) score as before but cannot be updated.

Format 3 covers the metadata with a checksum too (``sha256``, over every field but
itself, ``tensors_sha256`` included): an edited field is refused like an edited tensor.
``detector.json`` is a read-only copy: passed as ``--detector detector.json``, it must
equal the metadata of the ``.safetensors`` file beside it, or it is refused.

Format 4 is format 3 with poolings a format 3 reader cannot build: ``grid_maps`` levels that are
both coarse and fine, and ``fine_grid_size`` as a list of one size per fine level. Such a reader
refuses every format 4 file as written by a newer version, rather than with a pooling error;
files of formats 1-3 are read as they always were.

Format 5 lets a level hold what was fitted from fewer rows than dimensions in its exact low-rank
form (:mod:`anomaly.stats.low_rank`): ``level.<L>.basis``, ``.basis_precision`` and
``.residual_precision`` instead of ``.precision``, and the rows themselves, ``moments.<L>.rows``
(samples x width, ``joint.rows`` for a level with fine cells), instead of ``.outer``. A file is
thus never larger than the dense form, and far smaller while there are fewer images than
dimensions. Formats 1-4 are read as before.

Loading runs no code from the file. Before any tensor is read, every field of
the metadata and the name, dtype and shape of every tensor are checked against
what the metadata implies, with sizes bounded; then the tensors' checksum is
verified. Whatever is wrong is one :class:`UserError` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from anomaly.atomic import replaced_atomically
from anomaly.backbones import backbone_spec
from anomaly.columns import ScoreColumn
from anomaly.data.transforms import DEFAULT_FIT, FIT_RULES, RESIZE_RULES, TileGrid
from anomaly.detector.model import LEVEL_WEIGHTINGS, PRECISIONS
from anomaly.detector.weights import EMBEDDED_PREFIX
from anomaly.errors import UserError
from anomaly.evaluation.results import json_safe, write_atomic
from anomaly.outputs import claim_output
from anomaly.pooling import POOLINGS, Pooling, build_pooling, pooling_options
from anomaly.stats.distances import SCORE_TYPES
from anomaly.stats.pca import REDUCTIONS

FORMAT = "gaussian-anomaly-detector"
VERSION = 5
DETECTOR_FILE = "detector.safetensors"
METADATA_FILE = "detector.json"
METADATA_KEY = "detector"
SCORER_BUFFERS = ("projection", "mean", "precision", "std", "shrinkage")
MOMENTS_PREFIX = "moments."
ROWS_PREFIX = "rows."
#: Written before the resize rule was recorded by name (read as ``area``).
OLD_RESIZE_DESCRIPTION = "cv2 INTER_AREA when shrinking, INTER_LINEAR when enlarging"
LEVEL_STATS = "level_stats"
MAX_IMAGE_SIZE = 4096  # preprocessing.image_size: the largest square input a detector may ask for
MAX_FEATURE_DIM = 65536  # the widest feature vector of a detector fitted on user features


def detector_path(path: str | Path) -> Path:
    """The ``.safetensors`` file meant by ``path``: the file itself, its ``.json`` copy, or a run folder."""
    path = Path(path).expanduser()
    if path.is_dir():
        return path / DETECTOR_FILE
    if path.suffix == ".json":
        return path.with_suffix(".safetensors")
    return path


def detector_files(path: str | Path, weights: str | Path | None = None) -> list[Path]:
    """The files a detector named by ``path`` is read from (``.safetensors``, ``.json``, the
    ``weights`` given): inputs that no command may write over."""
    source = detector_path(path)
    return [source, source.with_suffix(".json"), *([Path(weights).expanduser()] if weights else [])]


def tensors_sha256(tensors: dict[str, Tensor]) -> str:
    """SHA-256 of every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        value = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy())  # the tensor's memory, not a copy
    return digest.hexdigest()


def metadata_sha256(metadata: dict) -> str:
    """SHA-256 of every metadata field but ``sha256`` itself (canonical JSON: sorted keys)."""
    fields = {k: v for k, v in metadata.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def seal(metadata: dict, tensors: dict[str, Tensor]) -> dict:
    """``metadata`` with the checksums of ``tensors`` and of itself."""
    metadata = {**metadata, "tensors_sha256": tensors_sha256(tensors)}
    metadata.pop("sha256", None)
    return {**metadata, "sha256": metadata_sha256(metadata)}


def write_detector(path: str | Path, tensors: dict[str, Tensor], metadata: dict) -> Path:
    """Write ``path`` (atomically) and its ``.json`` metadata copy; returns the ``.safetensors`` path."""
    path = detector_path(path)
    if path.suffix != ".safetensors":
        path = path.with_suffix(".safetensors")
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    metadata = seal({"format": FORMAT, "version": VERSION, **json_safe(metadata)}, tensors)
    text = json.dumps(metadata, indent=2)
    with replaced_atomically(path) as tmp:
        save_file(tensors, str(tmp), metadata={METADATA_KEY: text})
    write_atomic(path.with_suffix(".json"), text + "\n")
    return path


#: safetensors' dtype names.
TENSOR_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_tensors(path: Path, names: Iterable[str]) -> dict[str, Tensor]:
    """The named tensors of a safetensors file (its layout already checked), each read once into
    memory of its own.

    Not mapped from the file, as safetensors' ``get_tensor`` does: a detector file replaced in
    place while a loaded detector scores (``cp new.safetensors detector.safetensors``) must not
    change its statistics under it, nor truncate them into a crash. Not read twice either: a copy
    of mapped tensors would hold both for a while.
    """
    with open(path, "rb") as handle:
        (header_size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(header_size))
        tensors = {}
        for name in names:
            begin, end = header[name]["data_offsets"]
            raw = torch.empty(end - begin, dtype=torch.uint8)
            handle.seek(8 + header_size + begin)
            if handle.readinto(raw.numpy()) != end - begin:
                raise ValueError(f"tensor {name} ends early: the file is truncated")
            tensors[name] = raw.view(TENSOR_DTYPES[header[name]["dtype"]]).reshape(header[name]["shape"])
    return tensors


def read_detector(path: str | Path) -> tuple[dict[str, Tensor], dict]:
    """(tensors, metadata) of a detector file, all checked; :class:`UserError` if anything is wrong.

    ``path`` may name the ``.json`` copy: then it must equal the metadata it copies.
    """
    named = Path(path).expanduser()
    path = detector_path(path)
    if not path.is_file():
        raise UserError(f"detector file not found: {path} (a run writes {DETECTOR_FILE} into its folder)")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as file:
            header = file.metadata() or {}
            layout = {
                key: (file.get_slice(key).get_dtype(), tuple(file.get_slice(key).get_shape()))
                for key in file.keys()  # noqa: SIM118 (a safetensors file is not a dict)
            }
            metadata = parse_metadata(path, header)
            check_tensor_layout(path, metadata, layout)  # before a single tensor is read
        tensors = read_tensors(path, layout)
    except UserError:
        raise
    except Exception as exc:  # not a safetensors file, truncated, ...
        reason = " ".join(str(exc).split())[:200]
        raise UserError(f"{path} is not a readable detector file: {reason}") from exc
    if metadata["version"] >= 2 and tensors_sha256(tensors) != metadata["tensors_sha256"]:
        raise UserError(f"{path}: the tensors do not match the checksum in the metadata: the file is damaged")
    if metadata["version"] >= 3 and metadata.get("sha256") != metadata_sha256(metadata):
        raise UserError(
            f"{path}: the metadata does not match its checksum: the file was edited or damaged "
            "(to change the threshold use anomaly update --threshold or --calibrate)"
        )
    if named.suffix == ".json" and not named.is_dir():
        check_json_copy(named, path, metadata)
    if metadata["version"] == 1:  # level tensors were numbered by position in `levels`
        tensors = {_v1_name(k, metadata["levels"]): v for k, v in tensors.items()}
    return tensors, metadata


def check_json_copy(copy: Path, path: Path, metadata: dict) -> None:
    """:class:`UserError` naming the first field where the ``.json`` copy differs from ``path``'s metadata."""
    try:
        copied = json.loads(copy.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{copy} is not a readable JSON copy of {path.name}: {exc}") from None
    field = first_difference(metadata, copied if isinstance(copied, dict) else {})
    if field is not None:
        raise UserError(
            f"{copy} differs from the detector it copies ({path.name}) in {field!r}: the .json is a "
            "read-only copy and edits to it are not applied; to change the threshold use "
            "anomaly update --threshold or --calibrate (docs/deployment.md)"
        )


def first_difference(a: object, b: object, prefix: str = "") -> str | None:
    """The dotted name of the first field where ``a`` and ``b`` differ (``None``: equal)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in [*a, *(k for k in b if k not in a)]:
            found = first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
            if found is not None:
                return found
        return None
    return None if a == b and type(a) is type(b) else prefix.rstrip(".") or "(whole)"


def _v1_name(key: str, levels: list[int]) -> str:
    if not key.startswith("level."):
        return key
    _, index, name = key.split(".", 2)
    return f"level.{levels[int(index)]}.{name}"


def parse_metadata(path: Path, header: dict) -> dict:
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
    return metadata


def is_int(value: object) -> bool:
    """An int, not a bool (JSON ``true`` is not a number here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    return is_int(value) or isinstance(value, float)


def _bad(path: Path, field: str, problem: str) -> UserError:
    return UserError(
        f"{path}: detector metadata field {field!r} {problem}: the file is damaged or was edited"
    )


def check_metadata(path: Path, meta: dict) -> None:
    """:class:`UserError` naming ``path`` and the field for the first missing or invalid metadata field
    (the checksum of a valid one is compared by :func:`read_detector`, after the tensors')."""

    def bad(field: str, problem: str) -> UserError:
        return _bad(path, field, problem)

    for key in ("version", "backbone", "weights", "preprocessing", "levels", "decision_score"):
        if key not in meta:
            raise bad(key, "is missing")
    if not is_int(meta["version"]) or meta["version"] < 1:
        raise bad("version", f"must be a positive integer, not {meta['version']!r}")
    levels = meta["levels"]
    if not isinstance(levels, list) or not levels or not all(is_int(v) and v >= 1 for v in levels):
        raise bad("levels", f"must be a non-empty list of positive integers, not {levels!r}")
    if levels != sorted(set(levels)):
        raise bad("levels", f"must be increasing and distinct, not {levels!r}")
    try:
        ScoreColumn.parse(meta["decision_score"]).validate(SCORE_TYPES, levels)
    except UserError:
        raise bad(
            "decision_score",
            f"must be <{'|'.join(SCORE_TYPES)}>/<sum or a level>, not {meta['decision_score']!r}",
        ) from None
    for key in ("threshold", "fpr", "map_threshold", "map_floor"):
        if meta.get(key) is not None and not (is_number(meta[key]) and math.isfinite(meta[key])):
            raise bad(key, f"must be a finite number or null, not {meta[key]!r}")
    if meta.get("fpr") is not None and not 0 < meta["fpr"] < 1:
        raise bad("fpr", f"must lie strictly between 0 and 1, not {meta['fpr']!r}")
    for key in ("thresholds", "source"):
        if meta.get(key) is not None and not isinstance(meta[key], dict):
            raise bad(key, f"must be an object or null, not {meta[key]!r}")
    if meta["version"] >= 2:
        _check_v2(path, meta)
    if meta["version"] >= 3:
        _check_v3(path, meta)
    if meta["backbone"] is None:
        in_dims = meta.get("in_dims")
        if (
            not isinstance(in_dims, list)
            or len(in_dims) != len(levels)
            or not all(is_int(d) and 1 <= d <= MAX_FEATURE_DIM for d in in_dims)
        ):
            raise bad("in_dims", f"must list one width in 1..{MAX_FEATURE_DIM} per level, not {in_dims!r}")
        return
    if not isinstance(meta["backbone"], str):
        raise bad("backbone", f"must be a backbone name or null, not {meta['backbone']!r}")
    try:
        spec = backbone_spec(meta["backbone"])
    except UserError as exc:
        raise bad("backbone", str(exc)) from None
    if levels[-1] > spec.num_levels:
        raise bad("levels", f"must lie in 1..{spec.num_levels} for {spec.name}, not {levels!r}")
    if not isinstance(meta["weights"], dict) or not isinstance(meta["weights"].get("kind"), str):
        raise bad("weights", f"must be an object with a 'kind', not {meta['weights']!r}")
    preprocessing = meta["preprocessing"]
    if not isinstance(preprocessing, dict):
        raise bad("preprocessing", f"must be an object with an 'image_size', not {preprocessing!r}")
    size = preprocessing.get("image_size")
    if not is_int(size) or not 1 <= size <= MAX_IMAGE_SIZE:
        raise bad("preprocessing.image_size", f"must be an integer in 1..{MAX_IMAGE_SIZE}, not {size!r}")
    resize = preprocessing.get("resize")
    old_description = meta["version"] < 3 and resize == OLD_RESIZE_DESCRIPTION
    if resize is not None and resize not in RESIZE_RULES and not old_description:
        raise bad("preprocessing.resize", f"must be one of {', '.join(RESIZE_RULES)}, not {resize!r}")
    if preprocessing.get("fit", DEFAULT_FIT) not in FIT_RULES:
        raise bad("preprocessing.fit", f"must be one of {', '.join(FIT_RULES)}, not {preprocessing['fit']!r}")
    try:
        TileGrid.parse(preprocessing.get("tiles", "1x1"))
    except UserError as exc:
        raise bad("preprocessing.tiles", str(exc)) from None


def _check_v2(path: Path, meta: dict) -> None:
    """The fields format 2 added: pooling, level weighting, precision, checksum."""
    pooling = meta.get("pooling")
    if not isinstance(pooling, dict) or pooling.get("name") not in POOLINGS:
        raise _bad(
            path, "pooling", f"must be an object with a name in {', '.join(POOLINGS)}, not {pooling!r}"
        )
    extra = set(pooling) - {"name", *pooling_options(pooling["name"])}
    if extra:
        raise _bad(path, "pooling", f"has options pooling {pooling['name']} does not take: {sorted(extra)}")
    try:
        build_pooling(**pooling)
    except UserError as exc:
        raise _bad(path, "pooling", str(exc)) from None
    if meta.get("level_weighting", "none") not in LEVEL_WEIGHTINGS:
        raise _bad(path, "level_weighting", f"must be one of {', '.join(LEVEL_WEIGHTINGS)}")
    if meta.get("precision") is not None and meta["precision"] not in PRECISIONS:
        raise _bad(
            path, "precision", f"must be one of {', '.join(PRECISIONS)} (or null), not {meta['precision']!r}"
        )
    checksum = meta.get("tensors_sha256")
    if not isinstance(checksum, str) or len(checksum) != 64:
        raise _bad(path, "tensors_sha256", "must be the 64-digit SHA-256 of the tensors")


def _check_v3(path: Path, meta: dict) -> None:
    """The fields format 3 added: the reduction and what the detector absorbed (the checksum: last)."""
    reduction = meta.get("reduction")
    if reduction is not None and (
        not isinstance(reduction, dict)
        or reduction.get("name") not in REDUCTIONS
        or not (reduction["name"] == "none" or is_number(reduction.get("variance_threshold")))
    ):
        raise _bad(path, "reduction", f"must be an object with a name in {', '.join(REDUCTIONS)}")
    learning = meta.get("learning")
    if learning is None:
        return
    if (
        not isinstance(learning, dict)
        or not all(is_int(learning.get(k)) and learning[k] >= 0 for k in ("images", "samples"))
        or not (is_int(learning.get("epochs", 1)) and learning.get("epochs", 1) >= 1)
        or not isinstance(learning.get("augmentation") or {}, dict)
        or not isinstance(learning.get("digests"), list)
        or not all(isinstance(d, str) and len(d) == 64 for d in learning["digests"])
    ):
        raise _bad(path, "learning", "must hold images, samples and one 64-digit digest per image")


def reduction_name(meta: dict) -> str:
    return (meta.get("reduction") or {}).get("name", "none")


def file_pooling(meta: dict) -> Pooling:
    """The pooling of a checked metadata (format 1 knew only global pooling)."""
    return build_pooling(**meta.get("pooling", {"name": "global"}))


def level_in_dims(meta: dict) -> list[int]:
    """The width of the rows each level's scorer takes, from the backbone's spec (or ``in_dims``)."""
    if meta["backbone"] is None:
        return list(meta["in_dims"])
    spec = backbone_spec(meta["backbone"])
    pooling = file_pooling(meta)
    return [pooling.for_level(level).modelled_dim(spec.level_dims[level - 1]) for level in meta["levels"]]


def check_tensor_layout(path: Path, meta: dict, layout: dict[str, tuple[str, tuple[int, ...]]]) -> None:
    """:class:`UserError` unless the tensors are exactly those the metadata implies, float64, of the
    right shapes (checked from the header alone, before any tensor is read)."""
    levels, pooling = meta["levels"], file_pooling(meta)
    version = meta["version"]
    expected: dict[str, tuple[int, ...]] = {}
    for index, (level, in_dim) in enumerate(zip(levels, level_in_dims(meta), strict=True)):
        prefix = f"level.{index if version == 1 else level}."
        found = {k[len(prefix) :]: shape for k, (_, shape) in layout.items() if k.startswith(prefix)}
        for name, shape in pooling.for_level(level).expected_shapes(in_dim, found).items():
            expected[prefix + name] = shape
        projection = found.get("projection")
        if projection is not None and not (len(projection) == 2 and 1 <= projection[1] <= in_dim):
            raise UserError(
                f"{path}: tensor {prefix}projection has shape {projection}, not ({in_dim}, k) with "
                f"1 <= k <= {in_dim}: the file is damaged or was edited"
            )
    if meta.get("learning") is not None:
        samples = meta["learning"]["samples"]
        for level, in_dim in zip(levels, level_in_dims(meta), strict=True):
            prefix = f"{MOMENTS_PREFIX}{level}."
            keeps_rows = any(k.startswith(prefix) and k.endswith("rows") for k in layout)
            shapes = pooling.for_level(level).moment_shapes(in_dim, samples if keeps_rows else None)
            for name, shape in shapes.items():
                expected[prefix + name] = shape
            if reduction_name(meta) != "none":
                expected[f"{ROWS_PREFIX}{level}"] = (samples, in_dim)
    if meta.get("level_weighting", "none") != "none":
        expected[LEVEL_STATS] = (len(SCORE_TYPES), len(levels), 2)
    embedded = isinstance(meta["weights"], dict) and meta["weights"].get("kind") == "embedded"
    backbone_keys = [k for k in layout if k.startswith(EMBEDDED_PREFIX)]
    if embedded and meta["backbone"] is not None and not backbone_keys:
        raise UserError(f"{path}: the metadata says the backbone weights are embedded, but the file has none")
    for key, (dtype, shape) in layout.items():
        if key.startswith(EMBEDDED_PREFIX) and embedded:
            continue
        if key not in expected:
            raise UserError(
                f"{path}: unexpected tensor {key} (not implied by the metadata): the file was edited"
            )
        if dtype != "F64" or shape != expected[key]:
            raise UserError(
                f"{path}: tensor {key} is {dtype} {shape}, expected F64 {expected[key]}: "
                "the file is damaged or was edited"
            )
    missing = sorted(set(expected) - set(layout))
    if missing:
        raise UserError(f"{path}: the detector file lacks tensor {missing[0]}: it is incomplete")


def level_tensors(tensors: dict[str, Tensor], level: int, prefix: str = "level.") -> dict[str, Tensor]:
    """The scorer tensors of level number ``level`` (no ``projection``: an unreduced level); with
    ``prefix`` :data:`MOMENTS_PREFIX`, its streamed moments."""
    prefix = f"{prefix}{level}."
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


# ------------------------------------------------------------- as an output
def claim_detector_output(
    path: str | Path,
    *,
    inputs: Iterable[str | Path] = (),
    overwrite: bool = False,
    option: str = "--out",
    command: str = "this command",
) -> Path:
    """The ``.safetensors`` path a command may save a detector to, with the ``.json`` that
    :func:`write_detector` writes beside it: both claimed by :func:`anomaly.outputs.claim_output`,
    never over one of ``inputs`` (give every detector read, e.g. with :func:`detector_files`), and
    over an existing file only with ``overwrite``: a detector may be the only copy of a fit."""
    if str(path).strip() and Path(path).suffix != ".safetensors":
        raise UserError(f"{option} {path}: give a file name ending in .safetensors")
    claim = {"inputs": list(inputs), "overwrite": overwrite, "option": option, "command": command}
    target = claim_output(path, **claim)
    claim_output(target.with_suffix(".json"), **claim)
    return target
