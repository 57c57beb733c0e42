"""Turning what a user points at (folder, glob, file, arrays) into detector input."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from anomaly.data.images import IMAGE_EXTENSIONS, load_rgb, read_in_threads
from anomaly.data.transforms import DEFAULT_RESIZE, RESIZE_RULES, Geometry, ImagePipeline
from anomaly.errors import UserError

#: Feature values beyond this magnitude overflow float64 in the fourth moments of the Ledoit-Wolf
#: shrinkage (sums of (2 * 1e70)**4 over a billion rows stay below float64's 1.8e308).
LARGEST_FEATURE = 1e70
#: Features all smaller than this underflow float64 in the covariance, whose inverse overflows.
SMALLEST_FEATURE_SCALE = 1e-70
MEMORY_BUDGET_VARIABLE = "ANOMALY_MEMORY_BUDGET_GB"
DEFAULT_MEMORY_BUDGET_GB = 16.0
#: A level of D features holds about this many D x D float64 matrices while it is fitted
#: (scatter, covariance, precision, and the factorisation's workspace).
MATRICES_PER_LEVEL = 4


IMAGE_DTYPES = "uint8 (0..255)"


def integer_pixels_as_uint8(image: np.ndarray | Tensor) -> np.ndarray | Tensor:
    """Integer pixels as uint8: uint8 as given, other integer types when all values lie in 0..255
    (a lossless cast); :class:`UserError` for values beyond, booleans and other types."""
    is_tensor = isinstance(image, Tensor)
    if image.dtype in (torch.uint8, np.uint8):
        return image
    if is_tensor:
        integer = not (image.is_floating_point() or image.is_complex() or image.dtype == torch.bool)
    else:
        integer = image.dtype.kind in "iu"
    if not integer:
        raise UserError(f"images must be {IMAGE_DTYPES}, got {image.dtype}")
    empty = (image.numel() if is_tensor else image.size) == 0
    low, high = (0, 0) if empty else (int(image.min()), int(image.max()))
    if low < 0 or high > 255:
        raise UserError(
            f"images must be {IMAGE_DTYPES}: got {image.dtype} with values from {low} to {high}; scale them "
            "to 0..255 and convert to uint8 (16-bit images: divide by 257)"
        )
    return image.to(torch.uint8) if is_tensor else image.astype(np.uint8)


def rgb_array(image: np.ndarray) -> np.ndarray:
    """An (H, W) grey or (H, W, 3) RGB uint8 array as (H, W, 3) uint8 (other integer types in
    0..255 are cast); :class:`UserError` for other types, shapes and empty images."""
    image = np.asarray(image)
    if image.dtype.kind == "f":
        raise UserError(
            f"image arrays must be {IMAGE_DTYPES}, got {image.dtype}: scale [0, 1] floats by 255 and "
            "convert to uint8, or pass them as a (B, 3, S, S) float tensor"
        )
    image = integer_pixels_as_uint8(image)
    if image.ndim in (2, 3) and 0 in image.shape[:2]:
        raise UserError(f"an image is empty (shape {image.shape}): every image needs at least one pixel")
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim == 3 and image.shape[2] == 3:
        return image
    raise UserError(f"an image must be (H, W) or (H, W, 3), got shape {image.shape}")


def recorded_resize(preprocessing: dict | None) -> str:
    """The resize rule in a detector file's ``preprocessing``; files written before it was
    recorded by name (a description, or nothing) used the default rule, ``area``."""
    name = (preprocessing or {}).get("resize")
    return name if name in RESIZE_RULES else DEFAULT_RESIZE


def check_unit_range(images: Tensor) -> None:
    """Float images must be finite and in [0, 1] (uint8 ones are 0..255 by their type)."""
    if not images.is_floating_point() or images.numel() == 0:
        return
    if not bool(torch.isfinite(images).all()):
        raise UserError("float image tensors hold NaN or infinite values: give finite values in [0, 1]")
    low, high = float(images.min()), float(images.max())
    if low < 0.0 or high > 1.0:
        hint = ": divide by 255, or pass uint8 tensors" if high > 1.0 else ""
        raise UserError(f"float image tensors must lie in [0, 1], got values from {low:g} to {high:g}{hint}")


def image_batch(items, image_size: int, resize: str | Geometry = DEFAULT_RESIZE) -> Tensor:
    """(B, 3, S, S) uint8 from paths, (H, W[, 3]) uint8 arrays, or a ready (B, 3, S, S) tensor
    (``(B, 3, rows*S, cols*S)`` for a :class:`~anomaly.data.transforms.Geometry` with tiles)."""
    pipeline = ImagePipeline(image_size, resize=resize)
    if isinstance(items, Tensor):
        height, width = pipeline.shape
        if items.ndim != 4 or items.shape[1] != 3 or tuple(items.shape[2:]) != (height, width):
            raise UserError(f"image tensors must be (B, 3, {height}, {width}), got {tuple(items.shape)}")
        if items.is_floating_point():
            check_unit_range(items)
            return items
        return integer_pixels_as_uint8(items)
    images = [
        pipeline(load_rgb(item) if isinstance(item, (str, Path)) else rgb_array(item)) for item in items
    ]
    return torch.stack(images)


def image_items(X) -> Sequence:
    """Images as a sequence that can be sliced: one path becomes a list of one; a generator, a list.
    A folder among the paths is a :class:`UserError` that names how to list its images."""
    if isinstance(X, (str, Path)):
        items = [X]
    elif isinstance(X, np.ndarray) and X.ndim in (3, 4):
        return list(X)
    elif isinstance(X, (Tensor, np.ndarray)):
        return X
    elif isinstance(X, Iterable):
        items = X if isinstance(X, Sequence) else list(X)
    else:
        raise UserError(f"images must be paths, arrays or a tensor, got {type(X).__name__}")
    folder = next((item for item in items if isinstance(item, (str, Path)) and os.path.isdir(item)), None)
    if folder is not None:
        raise UserError(
            f"{folder} is a folder, not an image: pass its images, e.g. "
            f"anomaly.data.images.collect_images({str(folder)!r})"
        )
    return items


# --------------------------------------------------------------- features
def memory_budget_bytes() -> float:
    """``ANOMALY_MEMORY_BUDGET_GB`` (GiB; default 16) in bytes: the most a Gaussian fit may hold."""
    text = os.environ.get(MEMORY_BUDGET_VARIABLE, "").strip()
    try:
        budget = float(text) if text else DEFAULT_MEMORY_BUDGET_GB
    except ValueError:
        budget = float("nan")
    if not (np.isfinite(budget) and budget > 0):
        raise UserError(f"{MEMORY_BUDGET_VARIABLE}={text} must be a positive number of GiB, e.g. 16")
    return budget * 2**30


def check_gaussian_size(dims: Sequence[int]) -> None:
    """Refuse, before allocating, a fit whose D x D matrices would pass the memory budget."""
    need = MATRICES_PER_LEVEL * 8 * max(dims) ** 2
    budget = memory_budget_bytes()
    if need > budget:
        raise UserError(
            f"a Gaussian of {max(dims)} features needs about {need / 2**30:.1f} GiB ({MATRICES_PER_LEVEL} "
            f"{max(dims)}x{max(dims)} float64 matrices), over the budget of {budget / 2**30:g} GiB: "
            f"reduce the features (e.g. PCA or pooling), or raise {MEMORY_BUDGET_VARIABLE}"
        )


FEATURES_ONLY = (
    "this detector was fitted on features (backbone=None): give numbers, an (n, D) array or a list "
    "of them, not images or paths"
)


def _is_one_array(X) -> bool:
    """Whether ``X`` is one (n, D) table rather than a list of per-level tables."""
    if not isinstance(X, (list, tuple)):
        return True
    return not any(np.ndim(p) == 2 for p in X)


def _rows(mask: np.ndarray) -> str:
    rows = np.flatnonzero(mask)
    shown = ", ".join(str(r) for r in rows[:10]) + (", ..." if len(rows) > 10 else "")
    return f"row(s) {shown} ({len(rows)} of {len(mask)})"


def feature_list(X) -> list[Tensor]:
    """Feature input as float64 (n, D_l) tensors, one per level, checked.

    ``X`` is an (n, D) array, tensor or list of rows (one level), or a list of
    (n, D_l) arrays (one per level). :class:`UserError` (a ``ValueError``) names the
    rows holding NaN, infinite or overflowing values, and refuses empty or too wide input.
    """
    if not isinstance(X, (list, tuple, np.ndarray, Tensor)):
        raise UserError(f"{FEATURES_ONLY} (got {type(X).__name__})")
    parts = [X] if _is_one_array(X) else list(X)
    try:
        arrays = [p if isinstance(p, Tensor) else np.asarray(p) for p in parts]
    except ValueError as error:  # ragged rows
        raise UserError(f"features must be an (n, D) array of numbers: {error}") from None
    if any(isinstance(a, np.ndarray) and a.dtype.kind not in "biuf" for a in arrays):
        raise UserError(FEATURES_ONLY)
    tensors = [torch.as_tensor(a) for a in arrays]
    if not tensors or any(t.ndim != 2 for t in tensors):
        shapes = ", ".join(str(tuple(t.shape)) for t in tensors)
        images = any(t.ndim in (3, 4) for t in tensors)
        hint = (
            " (these look like images: backbone=None models feature vectors; choose a backbone, e.g. "
            "backbone='efficientnet-lite0', to fit on images)"
            if images
            else ""
        )
        raise UserError(
            "features must be an (n, D) array or a list of (n, D_l) arrays, one per level, "
            f"got {shapes}{hint}"
        )
    if len({t.shape[0] for t in tensors}) != 1:
        raise UserError("every level's features must have the same number of rows")
    if any(t.shape[1] == 0 for t in tensors):
        raise UserError(
            f"features have no columns (shapes {[tuple(t.shape) for t in tensors]}): D must be >= 1"
        )
    tensors = [t.to(torch.float64) for t in tensors]
    for level, t in enumerate(tensors, start=1):
        where = f" (level {level})" if len(tensors) > 1 else ""
        finite = torch.isfinite(t).all(dim=1).numpy()
        if not finite.all():
            raise UserError(f"features{where} hold NaN or infinite values in {_rows(~finite)}: remove them")
        huge = (t.abs() > LARGEST_FEATURE).any(dim=1).numpy()
        if huge.any():
            raise UserError(
                f"features{where} hold values beyond ±{LARGEST_FEATURE:g} in {_rows(huge)}: their fourth "
                "powers overflow float64; rescale the features (e.g. standardise them)"
            )
        largest = float(t.abs().max()) if t.numel() else 0.0
        if 0.0 < largest < SMALLEST_FEATURE_SCALE:
            raise UserError(
                f"features{where} are all within ±{largest:.3g}: their covariance underflows float64; "
                "rescale the features (e.g. standardise them)"
            )
    check_gaussian_size([t.shape[1] for t in tensors])
    return tensors


class PredictionDataset(Dataset):
    """Image files as the detector sees them; an unreadable file yields its error instead of an image."""

    def __init__(self, paths: list[Path], image_size: int, resize: str | Geometry = DEFAULT_RESIZE) -> None:
        self.paths = paths
        self.pipeline = ImagePipeline(image_size, resize=resize)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitems__(self, indices: list[int]) -> list[dict]:
        """A batch's items (the loader's call), read on threads (:func:`read_in_threads`)."""
        return read_in_threads(self.__getitem__, indices)

    def __getitem__(self, index: int) -> dict:
        path = self.paths[index]
        height = width = 0  # the original size, for maps at the image's own size
        try:
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                raise UserError(f"not an image file (expected one of {', '.join(IMAGE_EXTENSIONS)})")
            rgb = load_rgb(path)
            (height, width), image, error = rgb.shape[:2], self.pipeline(rgb), ""
        except Exception as exc:  # unreadable, truncated, wrong format: reported in the output
            image = torch.zeros(3, *self.pipeline.shape, dtype=torch.uint8)
            error = " ".join(str(exc).split()) or type(exc).__name__
        return {"image": image, "error": error, "index": index, "height": height, "width": width}
