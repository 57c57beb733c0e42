"""Detectors that keep learning: what identifies an absorbed image, and when two detectors can merge.

Every absorbed image is known by the SHA-256 of its file's bytes (of its array's dtype, shape
and bytes for images given as arrays; of its values for feature rows), so that an image
offered twice is recognised and skipped. Two detectors merge only when they were fitted the
same way: :func:`recipe` lists, in order, everything that shapes the features and their
Gaussians, and :func:`recipe_difference` names the first field that differs.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from anomaly.data.augment import AugmentOptions, augmentation_seed, build_augmentation
from anomaly.data.images import load_rgb, sha256_file
from anomaly.data.transforms import ImagePipeline
from anomaly.detector.file import tensors_sha256
from anomaly.detector.inputs import rgb_array
from anomaly.detector.model import GaussianDetectorModel
from anomaly.errors import UserError


def array_digest(array: np.ndarray | Tensor) -> str:
    """SHA-256 of an array's dtype, shape and bytes."""
    value = (
        array.detach().cpu().contiguous().numpy()
        if isinstance(array, Tensor)
        else np.ascontiguousarray(array)
    )
    digest = hashlib.sha256(f"{value.dtype}|{value.shape}|".encode())
    digest.update(value.tobytes())
    return digest.hexdigest()


def item_digest(item) -> str:
    """The identity of one image: its file's SHA-256, or its array's (:func:`array_digest`)."""
    return sha256_file(item) if isinstance(item, (str, Path)) else array_digest(item)


def row_digests(features: Sequence[Tensor]) -> list[str]:
    """The identity of every feature row (all levels' values of one sample)."""
    return [
        array_digest(torch.cat([f[i].reshape(-1) for f in features])) for i in range(features[0].shape[0])
    ]


def fresh_indices(digests: Sequence[str], absorbed: Sequence[str]) -> tuple[list[int], list[int]]:
    """(indices of the digests not absorbed yet, the first time each occurs; indices of the others)."""
    seen, fresh, repeated = set(absorbed), [], []
    for index, digest in enumerate(digests):
        (repeated if digest in seen else fresh).append(index)
        seen.add(digest)
    return fresh, repeated


def augmented_batches(
    model: GaussianDetectorModel, items: Sequence, digests: Sequence[str], batch_size: int
) -> Iterator[Tensor]:
    """Image batches of ``items`` as a training run with ``model.augmentation`` saw them, epoch by
    epoch: each image's draws depend only on (seed, its digest, epoch), as in
    :class:`~anomaly.data.datasets.ImageDataset`."""
    settings = model.augmentation
    augmentation = build_augmentation(
        settings["category"], noise=settings["noise"], options=AugmentOptions(**settings["options"])
    )
    pipeline = ImagePipeline(model.image_size, augmentation, model.geometry)
    for epoch in range(model.epochs):
        for start in range(0, len(items), batch_size):
            batch = []
            for item, digest in zip(
                items[start : start + batch_size], digests[start : start + batch_size], strict=True
            ):
                augmentation.set_random_seed(augmentation_seed(settings["seed"], epoch, digest))
                batch.append(pipeline(load_rgb(item) if isinstance(item, (str, Path)) else rgb_array(item)))
            yield torch.stack(batch)


def recipe(model: GaussianDetectorModel) -> dict:
    """Everything that must be equal for two detectors' moments to describe one population, in order."""
    extractor = model.extractor
    return {
        "backbone": None if extractor is None else extractor.spec.name,
        "backbone weights": None if extractor is None else tensors_sha256(extractor.state_dict()),
        "levels": list(model.levels),
        "level widths": model.in_dims,
        "pooling": model.pooling.options(),
        "image_size": model.image_size,
        "resize": model.resize,
        "fit": model.fit,
        "tiles": str(model.tiles),
        "precision": model.precision,
        "reduction": [model.reduction, model.variance_threshold],
        "epochs": model.epochs,
        "augmentation": model.augmentation,
        "level_weighting": model.level_weighting,
        "decision_score": str(model.decision_score),
    }


def recipe_difference(a: GaussianDetectorModel, b: GaussianDetectorModel) -> str | None:
    """``"<field> (<a's> vs <b's>)"`` for the first field of :func:`recipe` that differs, else ``None``."""
    ours, theirs = recipe(a), recipe(b)
    for field, value in ours.items():
        if theirs[field] != value:
            shown = ("...", "...") if field == "backbone weights" else (value, theirs[field])
            return f"{field} ({shown[0]} vs {shown[1]})"
    return None


def merged_model(
    models: Sequence[GaussianDetectorModel], names: Sequence[str] | None = None
) -> GaussianDetectorModel:
    """A new model of the union of what ``models`` absorbed (refitted); they are left as they were.

    :class:`UserError` when one cannot learn (no moments), when two differ in their recipe
    (naming the first field), or when they share an image (it would count twice).
    """
    names = list(names) if names is not None else [f"detector {i + 1}" for i in range(len(models))]
    if len(models) < 2:
        raise UserError("merge needs at least two detectors")
    for name, model in zip(names, models, strict=True):
        if not model.learns:
            raise UserError(f"{name} cannot be merged: {CANNOT_LEARN}")
    seen: dict[str, str] = {}
    for name, model in zip(names, models, strict=True):
        difference = recipe_difference(models[0], model)
        if difference is not None:
            raise UserError(f"cannot merge {names[0]} and {name}: they differ in {difference}")
        shared = [d for d in model.absorbed if d in seen]
        if shared:
            raise UserError(
                f"cannot merge {seen[shared[0]]} and {name}: they share {len(shared)} image(s); merge "
                "detectors fitted on disjoint images (anomaly update skips images already absorbed)"
            )
        seen.update(dict.fromkeys(model.absorbed, name))
    result = copy.deepcopy(models[0])
    for model in models[1:]:
        result.merge(model)
    result.refit()
    return result


CANNOT_LEARN = (
    "it holds no streamed moments (written before detectors kept them, or saved without them): "
    "refit it with anomaly fit or GaussianDetector.fit"
)

__all__ = [
    "CANNOT_LEARN",
    "array_digest",
    "fresh_indices",
    "item_digest",
    "merged_model",
    "recipe",
    "recipe_difference",
    "row_digests",
]
