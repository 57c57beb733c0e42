"""Anomaly maps at an image's own size: the raw map (.npy) and a heat-map overlay (PNG) of bounded size."""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from matplotlib import colormaps
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from torch import Tensor
from torch.nn import functional as F

from anomaly.atomic import write_bytes_atomic
from anomaly.data.images import load_rgb
from anomaly.data.transforms import Geometry

OVERLAY_ALPHA = 0.45
#: matplotlib's ``jet`` as a 256-entry lookup table (uint8 RGB, as ``imshow`` draws it).
JET = colormaps["jet"](np.arange(256), bytes=True)[:, :3]


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


#: Suffixes of the two files written per image: the map, and the overlay.
MAP_SUFFIX, OVERLAY_SUFFIX = ".map.npy", ".overlay.png"
#: The overlay's longest side in pixels (the aspect ratio is kept; the shorter side is at least 1).
OVERLAY_SIDE = 1024
#: Where a file name would pass the usual limit of 255 bytes, it is shortened and made unique by a hash.
LONGEST_NAME = 255


def encoded_name(relative: str) -> str:
    """``relative`` (a path with ``/``) as one file name, one-to-one: ``%`` becomes ``%25``,
    ``/`` becomes ``%2F`` (``a/x.png`` -> ``a%2Fx.png``, while ``a__x.png`` stays itself)."""
    name = relative.replace("%", "%25").replace("/", "%2F")
    longest = LONGEST_NAME - max(len(MAP_SUFFIX), len(OVERLAY_SUFFIX))
    if len(os.fsencode(name)) <= longest:
        return name
    digest = hashlib.sha256(os.fsencode(relative)).hexdigest()[:16]
    head = os.fsencode(name)[: longest - len(digest) - 1].decode(errors="ignore")
    return f"{head}~{digest}"


def map_file_names(paths: Sequence[Path]) -> list[str]:
    """Each input's file name in a maps folder, without suffix: its whole path below the inputs'
    common folder, extension included, as one name (:func:`encoded_name`). Distinct inputs get
    distinct names by construction: ``a/x.png`` and ``a__x.png``, ``x.png``, ``x.jpg`` and
    ``x.png.png`` each keep their own."""
    absolute = [Path(os.path.abspath(p)) for p in paths]
    root = Path(os.path.commonpath([p.parent for p in absolute])) if absolute else Path()
    return [encoded_name(p.relative_to(root).as_posix()) for p in absolute]


def overlay_size(height: int, width: int, longest: int = OVERLAY_SIDE) -> tuple[int, int]:
    """(height, width) of an image's overlay: the longest side at most ``longest``, the aspect kept."""
    scale = min(1.0, longest / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def overlay_png(rgb: np.ndarray, heat: np.ndarray, colour_range: tuple[float, float], title: str) -> bytes:
    """PNG bytes of ``heat`` (jet from ``colour_range``'s low to its high, translucent; NaN: none)
    over ``rgb``, both of the same size; ``title`` is stored as the PNG's title."""
    low, high = colour_range
    colours = heat_colours(np.nan_to_num(heat, nan=low), low, high).astype(np.float64)
    alpha = np.where(np.isnan(heat), 0.0, OVERLAY_ALPHA)[..., None]
    blended = (1.0 - alpha) * rgb + alpha * colours
    info = PngInfo()
    info.add_text("Title", title)
    info.add_text("Software", "anomaly predict")
    buffer = io.BytesIO()
    Image.fromarray(np.round(blended).astype(np.uint8)).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def heat_colours(heat: np.ndarray, low: float, high: float) -> np.ndarray:
    """(H, W, 3) uint8 ``jet`` colours of ``heat`` scaled from ``low`` to ``high`` (as ``imshow``)."""
    scaled = (np.asarray(heat, dtype=np.float32) - low) / max(high - low, np.finfo(np.float32).tiny)
    return JET[np.clip(scaled * 256, 0, 255).astype(np.uint8)]


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def write_map(
    map_path: Path,
    overlay_path: Path,
    image_path: Path,
    image_map: np.ndarray,
    overlay_map: np.ndarray,
    title: str,
    colour_range: tuple[float, float],
) -> None:
    """``map_path`` (the map at the image's size, float32 ``.npy``) and ``overlay_path`` (a PNG of
    ``overlay_map`` over the image, coloured over ``colour_range``, at the overlay map's size, at
    most :data:`OVERLAY_SIDE` pixels long), each written whole."""
    write_bytes_atomic(map_path, npy_bytes(image_map.astype(np.float32)))
    height, width = overlay_map.shape
    rgb = cv2.resize(load_rgb(image_path), (width, height), interpolation=cv2.INTER_AREA)
    write_bytes_atomic(overlay_path, overlay_png(rgb.astype(np.float32), overlay_map, colour_range, title))


__all__ = ["argmax_xy", "map_at_size", "map_file_names", "overlay_size", "write_map"]
