"""Saving a :class:`~anomaly.detector.model.GaussianDetectorModel` to its file, and loading it back."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from anomaly.data.transforms import DEFAULT_FIT
from anomaly.detector.file import (
    LEVEL_STATS,
    MOMENTS_PREFIX,
    ROWS_PREFIX,
    file_pooling,
    level_in_dims,
    level_tensors,
    read_detector,
    reduction_name,
    write_detector,
)
from anomaly.detector.inputs import recorded_resize
from anomaly.detector.model import GaussianDetectorModel
from anomaly.detector.weights import embedded_tensors, rebuild_backbone, weights_reference
from anomaly.errors import UserError
from anomaly.stats.distances import SCORE_TYPES
from anomaly.stats.moments import kept_buffers


def check_device(device: str | torch.device, hint: str = "device='cpu'") -> torch.device:
    """``device`` as a :class:`torch.device`; :class:`UserError` if malformed or absent on this machine.

    ``hint`` is how the caller spells the CPU fallback (e.g. ``--device cpu``).
    """
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise UserError(f"unknown device {str(device)!r}: use e.g. cpu, cuda or cuda:0") from exc
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserError(
                f"device {str(device)!r} is not available: PyTorch finds no CUDA GPU here; use {hint}"
            )
        if resolved.index is not None and resolved.index >= count:
            raise UserError(f"device {str(device)!r} is not available: this machine has {count} CUDA GPU(s)")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device {str(device)!r} is not available on this machine; use {hint}")
    return resolved


def model_tensors(
    model: GaussianDetectorModel, embed_weights: bool, moments: bool = True
) -> dict[str, Tensor]:
    """Every tensor the file holds: each level's fitted buffers (by level number), weights if asked,
    and (with ``moments``, when the model has them) what it needs to learn more."""
    unfitted = [level for level, s in zip(model.levels, model.scorers, strict=True) if not bool(s.fitted)]
    if unfitted:
        raise UserError(
            f"the detector is not fitted (no Gaussian for level(s) {unfitted}): fit it before saving"
        )
    tensors: dict[str, Tensor] = {}
    for level, scorer in zip(model.levels, model.scorers, strict=True):
        unused = {"fitted", *getattr(scorer, "unused_buffers", tuple)()}
        for name, value in scorer.named_buffers():
            if name in unused or (name == "projection" and not scorer.reduced):
                continue
            tensors[f"level.{level}.{name}"] = value.to(torch.float64)
    if moments and model.learns:
        for level, accumulator in zip(model.levels, model.moments, strict=True):
            for name, value in kept_buffers(accumulator).items():
                tensors[f"{MOMENTS_PREFIX}{level}.{name}"] = value
        for level, rows in zip(model.levels, model.rows, strict=False):
            tensors[f"{ROWS_PREFIX}{level}"] = torch.cat(rows).to(torch.float64)
    if model.level_weighting != "none":
        tensors[LEVEL_STATS] = model.level_stats
    if embed_weights:
        tensors.update(embedded_tensors(model.extractor))
    return tensors


def learning_metadata(model: GaussianDetectorModel) -> dict | None:
    """What the model absorbed (``None``: it cannot learn more)."""
    if not model.learns:
        return None
    return {
        "images": len(model.absorbed),
        "samples": model.samples,
        "epochs": model.epochs,
        "augmentation": model.augmentation,
        "digests": list(model.absorbed),
    }


def model_metadata(
    model: GaussianDetectorModel, weights: str | None, embed_weights: bool, moments: bool = True
) -> dict:
    """The file's metadata for ``model`` (the caller adds fpr, thresholds, source, precision)."""
    extractor = model.extractor
    spec = extractor.spec if extractor is not None else None
    return {
        "backbone": spec.name if spec is not None else None,
        "weights": None if extractor is None else weights_reference(extractor, weights, embed_weights),
        "preprocessing": None
        if spec is None
        else {
            "image_size": model.image_size,
            "input": "RGB (grey replicated), placed on a (rows*S, cols*S) canvas by "
            "anomaly.data.transforms.Geometry",
            "resize": model.resize,
            "fit": model.fit,
            "tiles": str(model.tiles),
            "dtype": "uint8 0..255 (or float 0..1)",
            "normalise_mean": list(spec.mean),
            "normalise_std": list(spec.std),
        },
        "levels": model.levels,
        "pooling": model.pooling.options(),
        "level_weighting": model.level_weighting,
        "in_dims": model.in_dims,
        "dims": model.dims,
        "score_types": list(SCORE_TYPES),
        "decision_score": str(model.decision_score),
        "threshold": model.threshold,
        "decision": "anomalous (1) when the decision_score column > threshold, else normal (0)",
        "map_threshold": model.map_threshold,
        "map_floor": model.map_floor,
        "precision": model.precision,
        "reduction": {"name": model.reduction, "variance_threshold": model.variance_threshold},
        "learning": learning_metadata(model) if moments else None,
    }


def save_model(
    model: GaussianDetectorModel,
    path: str | Path,
    extra: dict,
    weights: str | None = None,
    embed=False,
    moments: bool = True,
) -> Path:
    """Write ``model`` to ``path`` (+ ``.json``); ``extra`` adds metadata fields (fpr, source, ...).
    ``moments=False`` leaves out what the model needs to learn more (a smaller file)."""
    embed = embed or (model.extractor is not None and model.extractor.weights_source is None)
    tensors = model_tensors(model, embed, moments)
    return write_detector(path, tensors, {**model_metadata(model, weights, embed, moments), **extra})


def load_model(
    path: str | Path, weights: str | None = None, device: str | torch.device = "cpu"
) -> tuple[GaussianDetectorModel, dict]:
    """The model of a detector file (checked, see :mod:`anomaly.detector.file`) and its metadata."""
    tensors, meta = read_detector(path)
    extractor = None
    if meta["backbone"] is not None:
        try:
            extractor = rebuild_backbone(meta["backbone"], meta["weights"], tensors, weights)
        except RuntimeError as exc:  # embedded weights of the wrong names or shapes
            reason = " ".join(str(exc).split())[:200]
            raise UserError(
                f"{path}: the embedded backbone weights do not fit {meta['backbone']}: {reason}"
            ) from exc
    pooling = file_pooling(meta)
    scorers = [
        pooling.for_level(level).scorer_from_tensors(level_tensors(tensors, level), in_dim)
        for level, in_dim in zip(meta["levels"], level_in_dims(meta), strict=True)
    ]
    model = GaussianDetectorModel(
        extractor,
        meta["levels"],
        scorers,
        pooling,
        decision_score=meta["decision_score"],
        level_weighting=meta.get("level_weighting", "none"),
        threshold=meta.get("threshold"),
        image_size=(meta["preprocessing"] or {}).get("image_size"),
        resize=recorded_resize(meta["preprocessing"]),
        precision=meta.get("precision"),
        fit=(meta["preprocessing"] or {}).get("fit", DEFAULT_FIT),  # files before fit rules: stretch
        tiles=(meta["preprocessing"] or {}).get("tiles", "1x1"),
    )
    model.map_threshold = meta.get("map_threshold")  # files before it: None
    model.map_floor = meta.get("map_floor")
    reduction = meta.get("reduction") or {}
    model.set_reduction(reduction.get("name", "none"), reduction.get("variance_threshold"))
    if meta.get("learning") is not None:
        restore_learning(model, tensors, meta)
    if LEVEL_STATS in tensors:
        stats = tensors[LEVEL_STATS]
        if not bool(torch.isfinite(stats).all()) or not bool((stats[..., 1] > 0).all()):
            raise UserError(f"{path}: {LEVEL_STATS} must be finite with positive scales: the file was edited")
        model.level_stats.copy_(stats)
    return model.to(device), meta


def take_buffers(module: torch.nn.Module, tensors: dict[str, Tensor]) -> None:
    """Make ``tensors`` (by buffer name) the buffers of a module built on the meta device, whatever
    their shapes; a buffer the file leaves out (an empty one, see :func:`model_tensors`) stays empty."""
    for name, value in list(module.named_buffers()):
        owner, _, attribute = name.rpartition(".")
        taken = tensors.get(name)
        if taken is None:
            if value.numel():
                raise ValueError(f"no tensor for the accumulator's buffer {name}")
            taken = torch.zeros(value.shape, dtype=value.dtype)
        setattr(module.get_submodule(owner), attribute, taken)


def restore_learning(model: GaussianDetectorModel, tensors: dict[str, Tensor], meta: dict) -> None:
    """Give a loaded model the accumulators, rows and digests of its file."""
    accumulators = []
    for level, in_dim in zip(model.levels, level_in_dims(meta), strict=True):
        with torch.device("meta"):  # allocates nothing: the buffers become the file's tensors
            accumulator = model.pooling.for_level(level).accumulator(in_dim)
        take_buffers(accumulator, level_tensors(tensors, level, MOMENTS_PREFIX))
        accumulators.append(accumulator)
    model.moments = torch.nn.ModuleList(accumulators)
    if reduction_name(meta) != "none":
        model.rows = [[tensors[f"{ROWS_PREFIX}{level}"]] for level in model.levels]
    model.absorbed = list(meta["learning"]["digests"])
    model.epochs = meta["learning"].get("epochs", 1)
    model.augmentation = meta["learning"].get("augmentation")


__all__ = ["check_device", "load_model", "model_metadata", "model_tensors", "save_model"]
