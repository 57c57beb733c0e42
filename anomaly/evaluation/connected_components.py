"""Connected-component analysis (CCA) of anomaly maps, for the autoencoder's CCA score (Table V).

The paper labels a test image defective "only if it contains a connected
component at least as big as the smallest anomaly present in the test dataset".
Here that becomes an image score without a fixed pixel threshold:

* **minimum anomaly size**: over the category's ground-truth masks, the
  smallest *largest 8-connected component*, as a fraction of the mask's area
  (:func:`min_anomaly_fraction`, written to JSON by
  ``anomaly min-anomaly-size``);
* **CCA score**: the highest threshold ``t`` at which the largest 8-connected
  component of ``{map >= t}`` covers at least that fraction of the map
  (:func:`cca_score`). Lowering ``t`` only adds pixels, so the largest
  component never shrinks; the sweep from the map's maximum down is therefore
  done exactly by a binary search over the map's sorted distinct values.

Components are labelled by OpenCV (``cv2.connectedComponentsWithStats``, 8-connectivity).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import Tensor

from anomaly.errors import UserError
from anomaly.evaluation.results import write_atomic

CONNECTIVITY = 8


def largest_component(mask: np.ndarray) -> int:
    """Pixels in the largest 8-connected component of a boolean (H, W) mask (0 if empty)."""
    count, _, stats, _ = cv2.connectedComponentsWithStats(
        np.ascontiguousarray(mask, dtype=np.uint8), connectivity=CONNECTIVITY
    )
    if count <= 1:  # label 0 is the background
        return 0
    return int(stats[1:, cv2.CC_STAT_AREA].max())


def min_anomaly_fraction(masks: Iterable[np.ndarray]) -> tuple[float, int]:
    """(smallest largest-component fraction, number of non-empty masks) over ``masks``.

    Empty masks are skipped; :class:`ValueError` if none is left.
    """
    fractions = [largest_component(m) / m.size for m in masks if m.any()]
    if not fractions:
        raise ValueError("no non-empty mask")
    return min(fractions), len(fractions)


def min_component_pixels(fraction: float, height: int, width: int) -> int:
    """The minimum anomaly size in pixels of an (H, W) map (at least one pixel)."""
    return max(1, math.ceil(fraction * height * width - 1e-9))


def cca_score(error_map: np.ndarray, min_pixels: int) -> float:
    """Highest threshold at which the largest 8-connected component of ``map >= t`` has ``min_pixels``.

    ``error_map`` is one (H, W) float map; higher means more anomalous.
    """
    values = np.unique(error_map)  # ascending
    if min_pixels > error_map.size:
        raise ValueError(f"minimum size {min_pixels} exceeds the map's {error_map.size} pixels")
    # values[0] (everything selected) always qualifies; find the largest qualifying index
    low, high = 0, len(values) - 1
    while low < high:
        middle = (low + high + 1) // 2
        if largest_component(error_map >= values[middle]) >= min_pixels:
            low = middle
        else:
            high = middle - 1
    return float(values[low])


class CCAScorer:
    """Scores a batch of error maps (B, H, W) by :func:`cca_score` with a fixed minimum anomaly fraction."""

    def __init__(self, min_fraction: float) -> None:
        if not 0.0 < min_fraction <= 1.0:
            raise UserError(
                f"the minimum anomaly size must be a fraction of the image in (0, 1], got {min_fraction}"
            )
        self.min_fraction = float(min_fraction)

    def __call__(self, maps: Tensor) -> Tensor:
        height, width = maps.shape[-2:]
        min_pixels = min_component_pixels(self.min_fraction, height, width)
        array = maps.detach().to(torch.float32).cpu().numpy()
        return torch.tensor([cca_score(m, min_pixels) for m in array], dtype=torch.float64)


# ------------------------------------------------------------------ JSON file

MIN_SIZE_KEY = "min_anomaly_fraction"


def write_min_anomaly_size(path: Path, category: str, fraction: float, n_masks: int, root: str) -> Path:
    """Write the small JSON file the CCA scorer reads."""
    record = {"category": category, MIN_SIZE_KEY: fraction, "n_masks": n_masks, "data_root": root}
    write_atomic(Path(path), json.dumps(record, indent=2) + "\n")
    return Path(path)


def read_min_anomaly_size(path: Path, category: str) -> float:
    """The minimum anomaly fraction in ``path`` (:class:`UserError` if missing or another category's)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(
            f"minimum anomaly size file {path} not found: create it with `python -m "
            f"anomaly.tools.min_anomaly_size --data.root ROOT --data.category {category} --output {path}` "
            "or pass --model.min_anomaly_size FRACTION"
        )
    try:
        record = json.loads(path.read_text())
        fraction = float(record[MIN_SIZE_KEY])
    except (ValueError, KeyError, TypeError) as error:
        raise UserError(f"{path} is not a minimum anomaly size file ({error})") from error
    if record.get("category") != category:
        raise UserError(
            f"{path} holds the minimum anomaly size of '{record.get('category')}', not '{category}'"
        )
    return fraction
