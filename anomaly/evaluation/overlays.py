"""Overlay PNGs of coarse anomaly maps on their test images (matplotlib)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch import Tensor
from torch.nn import functional as F

from anomaly.data.datasets import Sample
from anomaly.data.images import load_mask, load_rgb
from anomaly.data.transforms import Geometry
from anomaly.data.transforms import geometry as make_geometry
from anomaly.evaluation.plots import new_figure, save_figure


def write_overlays(
    folder: Path,
    samples: Sequence[Sample],
    maps: Tensor,
    image_size: int,
    scores: Sequence[float],
    geometry: Geometry | None = None,
) -> list[Path]:
    """One PNG per sample: the image as the detector saw it (``geometry``: resize, fit, tiles;
    default a square stretch), its map upsampled to it (jet, translucent) and the ground-truth
    outline where a mask exists. Files are ranked ``00_<stem>.png``, ``01_...``."""
    folder.mkdir(parents=True, exist_ok=True)
    geometry = geometry or make_geometry()
    height, width = geometry.canvas(image_size)
    upsampled = F.interpolate(maps[:, None].float(), size=(height, width), mode="bilinear")[:, 0]
    low, high = float(maps.min()), float(maps.max())
    written = []
    for rank, (sample, heat, score) in enumerate(zip(samples, upsampled, scores, strict=True)):
        figure = new_figure(4.0, 4.0 * height / width)
        axes = figure.add_axes((0, 0, 1, 0.92))
        axes.imshow(geometry(load_rgb(sample.path), image_size))
        axes.imshow(heat.numpy(), cmap="jet", alpha=0.45, vmin=low, vmax=high)
        if sample.mask is not None:
            axes.contour(geometry.mask(load_mask(sample.mask), image_size), levels=[0.5], colors="white")
        axes.set_axis_off()
        figure.suptitle(f"{Path(sample.path).name}  {sample.defect}  score {score:.2f}", fontsize=8)
        written.append(save_figure(figure, folder / f"{rank:02d}_{Path(sample.path).stem}.png"))
    return written


__all__ = ["write_overlays"]
