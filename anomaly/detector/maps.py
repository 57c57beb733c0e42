"""Anomaly maps at an image's own size: the raw map (.npy) and a heat-map overlay (PNG)."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torch import Tensor
from torch.nn import functional as F

from anomaly.data.images import load_rgb
from anomaly.data.transforms import Geometry
from anomaly.evaluation.plots import new_figure


def map_at_size(coarse: Tensor, height: int, width: int, geometry: Geometry | None = None) -> np.ndarray:
    """A coarse ``(h, w)`` map bilinearly resized to ``(height, width)`` float32: for a stretched
    input (the default) this undoes the stretch; for a padded or cropped one
    (:meth:`Geometry.map_to_image`) the padding is cut off and what a crop cut off is NaN."""
    if geometry is not None and geometry.fit.scale is not None:
        return geometry.map_to_image(coarse.float().numpy(), height, width)
    full = F.interpolate(
        coarse[None, None].float(), size=(height, width), mode="bilinear", align_corners=False
    )
    return full[0, 0].numpy()


def argmax_xy(image_map: np.ndarray) -> tuple[int, int]:
    """(x, y) pixel of a map's maximum (column, row; the first one on ties; NaN pixels ignored)."""
    y, x = np.unravel_index(int(np.nanargmax(image_map)), image_map.shape)
    return int(x), int(y)


def map_file_stems(paths: Sequence[Path]) -> list[str]:
    """A distinct file stem per input path: its path below the inputs' common folder, ``/`` as ``__``,
    without its extension, unless another input shares the rest of the name (``a.jpg`` and
    ``a.png`` keep theirs: ``a.jpg``, ``a.png``), so that no map overwrites another."""
    resolved = [p.resolve() for p in paths]
    root = Path(os.path.commonpath([p.parent for p in resolved])) if resolved else Path()
    relative = [str(p.relative_to(root)).replace(os.sep, "__") for p in resolved]
    short = [str(Path(name).with_suffix("")) for name in relative]
    repeated = {stem for stem, count in Counter(short).items() if count > 1}
    return [name if stem in repeated else stem for name, stem in zip(relative, short, strict=True)]


def write_map(
    folder: Path, stem: str, image_path: Path, image_map: np.ndarray, title: str, vmax: float
) -> None:
    """``<stem>.npy`` (float32, the image's size) and ``<stem>.png`` (the map over the image, jet,
    from 0 to ``vmax``) in ``folder``."""
    np.save(folder / f"{stem}.npy", image_map.astype(np.float32))
    rgb = load_rgb(image_path)
    height, width = rgb.shape[:2]
    figure = new_figure(4.0, 4.0 * height / width)
    axes = figure.add_axes((0, 0, 1, 0.92))
    axes.imshow(rgb)
    axes.imshow(image_map, cmap="jet", alpha=0.45, vmin=0.0, vmax=vmax)
    axes.set_axis_off()
    figure.suptitle(title, fontsize=8)
    figure.savefig(folder / f"{stem}.png")


__all__ = ["argmax_xy", "map_at_size", "map_file_stems", "write_map"]
