"""Per-image preprocessing on the loader side: resize (and optionally augment).

The whole image is resized to the backbone's native square resolution (no
crop). Normalisation happens inside the backbone module, on the device, so that
loaders ship compact uint8 tensors and exported detectors take plain images.

How the image is resized is a :class:`ResizeRule`, chosen by name (``--data.resize``):

* ``area`` (default): OpenCV area interpolation when shrinking (anti-aliased),
  bilinear when enlarging;
* ``linear``: OpenCV bilinear interpolation without anti-aliasing, which is what
  the paper's code does (``albumentations.Resize``, ``cv2.INTER_LINEAR``); the
  paper-table recipes use it;
* ``cubic``: OpenCV bicubic interpolation.

How an image of any aspect ratio fills the input is a :class:`FitRule` (``--data.fit``):

* ``stretch`` (default): the whole image is resized to the input's shape, aspect ratio ignored;
* ``pad``: resized keeping its aspect ratio until its long side fits, then centred on a canvas
  filled with the ImageNet mean colour (:data:`PAD_FILL`, zero after the backbone's
  normalisation); masks are padded with "normal";
* ``crop``: resized keeping its aspect ratio until its short side fits, then centre-cropped.

The input may be a grid of ``rows x cols`` square tiles of the backbone's size (``--data.tiles``,
:class:`TileGrid`): the image then fills a ``rows*S x cols*S`` canvas by its fit rule and the
detector scores every tile (:class:`~anomaly.detector.model.GaussianDetectorModel`). A
:class:`Geometry` holds the three choices; masks follow the same geometry (nearest neighbour).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from anomaly.errors import UserError


@dataclass(frozen=True)
class ResizeRule:
    """How an image is made square: OpenCV interpolations when shrinking and when enlarging.

    ``description`` is recorded in the caches' identities: two rules never share cached images
    or features.
    """

    name: str
    description: str
    shrink: int
    enlarge: int

    def __call__(self, rgb: np.ndarray, size: int) -> np.ndarray:
        return self.resize_to(rgb, size, size)

    def resize_to(self, rgb: np.ndarray, height: int, width: int) -> np.ndarray:
        """``rgb`` resized to ``(height, width)``: the shrinking interpolation when the area decreases."""
        if rgb.shape[:2] == (height, width):
            return rgb
        interpolation = self.shrink if rgb.shape[0] * rgb.shape[1] > height * width else self.enlarge
        return cv2.resize(rgb, (width, height), interpolation=interpolation)


RESIZE_RULES = {
    rule.name: rule
    for rule in (
        ResizeRule(
            "area",
            "square-resize, area when shrinking, bilinear when enlarging, no crop (OpenCV)",
            cv2.INTER_AREA,
            cv2.INTER_LINEAR,
        ),
        ResizeRule(
            "linear",
            "square-resize, bilinear without anti-aliasing, no crop (OpenCV INTER_LINEAR, as albumentations "
            "Resize)",
            cv2.INTER_LINEAR,
            cv2.INTER_LINEAR,
        ),
        ResizeRule(
            "cubic", "square-resize, bicubic, no crop (OpenCV INTER_CUBIC)", cv2.INTER_CUBIC, cv2.INTER_CUBIC
        ),
    )
}
DEFAULT_RESIZE = "area"
#: The default rule's description, as recorded in the caches' identities.
RESIZE_RULE = RESIZE_RULES[DEFAULT_RESIZE].description


def resize_rule(rule: str | ResizeRule | Geometry) -> ResizeRule | Geometry:
    """The rule named ``rule`` (a :class:`ResizeRule` or a whole :class:`Geometry`, which is called
    the same way, is returned as it is)."""
    if isinstance(rule, (ResizeRule, Geometry)):
        return rule
    if rule not in RESIZE_RULES:
        raise UserError(f"unknown resize rule '{rule}': use one of {', '.join(RESIZE_RULES)}")
    return RESIZE_RULES[rule]


def resize_square(rgb: np.ndarray, size: int, rule: str | ResizeRule = DEFAULT_RESIZE) -> np.ndarray:
    """Resize an (H, W, 3) uint8 image to (size, size, 3) with ``rule`` (default: area when shrinking)."""
    return resize_rule(rule)(rgb, size)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Resize a boolean (H, W) mask with nearest-neighbour sampling."""
    return cv2.resize(mask.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST).astype(bool)


#: The pad rule's fill: the ImageNet mean colour as uint8 RGB (every backbone here normalises with
#: that mean, so padded pixels become zeros at the backbone's input).
PAD_FILL = (124, 116, 104)


@dataclass(frozen=True)
class Placement:
    """Where an image lies on the canvas: resized to ``(height, width)``, its top-left corner at
    ``(top, left)`` of the canvas (negative when the image is cropped)."""

    height: int
    width: int
    top: int
    left: int

    def overlap(self, canvas_shape: tuple[int, ...]) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
        """(canvas region, image region): the slices where the placed image and the canvas overlap."""
        y0, x0 = max(self.top, 0), max(self.left, 0)
        sy, sx = max(-self.top, 0), max(-self.left, 0)
        h = min(canvas_shape[0] - y0, self.height - sy)
        w = min(canvas_shape[1] - x0, self.width - sx)
        return (slice(y0, y0 + h), slice(x0, x0 + w)), (slice(sy, sy + h), slice(sx, sx + w))

    def paste(self, resized: np.ndarray, canvas: np.ndarray) -> np.ndarray:
        """Copy the part of ``resized`` (already ``(height, width)``) that falls on ``canvas`` into it."""
        on_canvas, on_image = self.overlap(canvas.shape)
        canvas[on_canvas] = resized[on_image]
        return canvas

    def take(self, canvas: np.ndarray, fill: float = np.nan) -> np.ndarray:
        """The inverse of :meth:`paste`: the ``(height, width)`` image region read from ``canvas``
        (``fill`` where the canvas does not cover it, i.e. what a crop cut off)."""
        region = np.full((self.height, self.width, *canvas.shape[2:]), fill, dtype=canvas.dtype)
        on_canvas, on_image = self.overlap(canvas.shape)
        region[on_image] = canvas[on_canvas]
        return region


@dataclass(frozen=True)
class FitRule:
    """How an ``(H, W)`` image fills a canvas of another aspect ratio: stretch, pad or crop.

    ``scale`` picks the factor from the two sides' ratios (``None``: stretch each side on its own).
    """

    name: str
    description: str
    scale: Callable[[float, float], float] | None

    def placement(self, height: int, width: int, out_height: int, out_width: int) -> Placement:
        if self.scale is None:
            return Placement(out_height, out_width, 0, 0)
        factor = self.scale(out_height / height, out_width / width)
        resized_h, resized_w = max(1, round(height * factor)), max(1, round(width * factor))
        return Placement(resized_h, resized_w, (out_height - resized_h) // 2, (out_width - resized_w) // 2)


FIT_RULES = {
    rule.name: rule
    for rule in (
        FitRule("stretch", "stretched to the input's shape", None),
        FitRule("pad", f"aspect kept, long side fitted, centred, padded with RGB {PAD_FILL}", min),
        FitRule("crop", "aspect kept, short side fitted, centre-cropped", max),
    )
}
DEFAULT_FIT = "stretch"


def fit_rule(rule: str | FitRule) -> FitRule:
    """The fit rule named ``rule`` (a :class:`FitRule` is returned as it is)."""
    if isinstance(rule, FitRule):
        return rule
    if rule not in FIT_RULES:
        raise UserError(f"unknown fit rule '{rule}': use one of {', '.join(FIT_RULES)}")
    return FIT_RULES[rule]


#: The most tiles an image may be cut into.
MAX_TILES = 64


@dataclass(frozen=True)
class TileGrid:
    """The input as ``rows x cols`` square tiles of the backbone's size, each scored on its own."""

    rows: int = 1
    cols: int = 1

    @classmethod
    def parse(cls, value: str | int | TileGrid) -> TileGrid:
        """``"2x3"`` (rows x cols), ``"3"`` or ``3`` (one row of 3), or a :class:`TileGrid`."""
        if isinstance(value, TileGrid):
            return value
        text = str(value).strip().lower()
        parts = text.split("x") if "x" in text else ["1", text]
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise UserError(
                f"tiles must be ROWSxCOLS (e.g. 1x3) or a number of tiles in a row, got {value!r}"
            )
        grid = cls(int(parts[0]), int(parts[1]))
        if grid.rows < 1 or grid.cols < 1 or grid.count > MAX_TILES:
            raise UserError(f"tiles must be 1 to {MAX_TILES} tiles in all, at least 1x1, got {value!r}")
        return grid

    @property
    def count(self) -> int:
        return self.rows * self.cols

    def __str__(self) -> str:
        return f"{self.rows}x{self.cols}"


@dataclass(frozen=True)
class Geometry:
    """How an image file becomes the detector's input: resize rule, fit rule and tile grid.

    Called like a :class:`ResizeRule` (``geometry(rgb, size)``), it returns the
    ``(rows*size, cols*size, 3)`` canvas; :meth:`mask` puts a mask on the same canvas and
    :meth:`map_to_image` brings a map of the canvas back onto the original image.
    """

    resize: ResizeRule
    fit: FitRule = FIT_RULES[DEFAULT_FIT]
    tiles: TileGrid = TileGrid()

    @property
    def name(self) -> str:
        return self.resize.name

    @property
    def is_default_layout(self) -> bool:
        """Stretched to one square: the layout of every run before fit rules and tiles existed."""
        return self.fit.name == DEFAULT_FIT and self.tiles.count == 1

    @property
    def description(self) -> str:
        """Recorded in the caches' identities; the resize rule's own description for the default layout."""
        if self.is_default_layout:
            return self.resize.description
        return f"{self.resize.description}; fit {self.fit.name}: {self.fit.description}; tiles {self.tiles}"

    def canvas(self, size: int) -> tuple[int, int]:
        """The input's (height, width) for tiles of ``size`` pixels."""
        return self.tiles.rows * size, self.tiles.cols * size

    def placement(self, height: int, width: int, size: int) -> Placement:
        return self.fit.placement(height, width, *self.canvas(size))

    def __call__(self, rgb: np.ndarray, size: int) -> np.ndarray:
        out_h, out_w = self.canvas(size)
        place = self.placement(*rgb.shape[:2], size)
        resized = self.resize.resize_to(rgb, place.height, place.width)
        if (place.top, place.left, place.height, place.width) == (0, 0, out_h, out_w):
            return resized
        canvas = np.empty((out_h, out_w, *rgb.shape[2:]), dtype=rgb.dtype)
        canvas[...] = PAD_FILL if rgb.ndim == 3 else 0
        return place.paste(resized, canvas)

    def mask(self, mask: np.ndarray, size: int) -> np.ndarray:
        """A boolean (H, W) mask on the canvas: nearest neighbour, "normal" where padded."""
        place = self.placement(*mask.shape[:2], size)
        resized = cv2.resize(
            mask.astype(np.uint8), (place.width, place.height), interpolation=cv2.INTER_NEAREST
        ).astype(bool)
        return place.paste(resized, np.zeros(self.canvas(size), dtype=bool))

    def map_to_image(self, canvas_map: np.ndarray, height: int, width: int) -> np.ndarray:
        """A float map of the whole canvas (any resolution) on the original ``(height, width)`` image,
        bilinear; NaN where a crop cut the image off."""
        canvas_map = np.asarray(canvas_map, dtype=np.float32)
        if self.fit.scale is not None:
            # the canvas at a tile size where the image keeps (at least) its own resolution
            rows, cols = self.tiles.rows, self.tiles.cols
            size = math.ceil(max(height / rows, width / cols))
            canvas_map = cv2.resize(canvas_map, (cols * size, rows * size), interpolation=cv2.INTER_LINEAR)
            canvas_map = self.placement(height, width, size).take(canvas_map)
        return cv2.resize(canvas_map, (width, height), interpolation=cv2.INTER_LINEAR)


def geometry(
    resize: str | ResizeRule | Geometry = DEFAULT_RESIZE,
    fit: str | FitRule = DEFAULT_FIT,
    tiles: str | int | TileGrid = "1x1",
) -> Geometry:
    """A :class:`Geometry` from names (a :class:`Geometry` is returned as it is)."""
    if isinstance(resize, Geometry):
        return resize
    return Geometry(resize_rule(resize), fit_rule(fit), TileGrid.parse(tiles))


#: The largest square input side: 8x the largest backbone resolution of the paper (EfficientNet-B7, 600 px).
MAX_IMAGE_SIZE = 4800


def check_image_size(image_size: int, batch_size: int = 1) -> None:
    """:class:`UserError` for a size below 1 or above :data:`MAX_IMAGE_SIZE`, with an estimate of the cost."""
    if image_size < 1:
        raise UserError(f"image_size must be a positive number of pixels or null, got {image_size}")
    if image_size > MAX_IMAGE_SIZE:
        batch_gib = batch_size * 3 * image_size**2 * 4 / 2**30
        raise UserError(
            f"image_size {image_size} is over the limit of {MAX_IMAGE_SIZE} px: a batch of {batch_size} "
            f"such images is {batch_gib:,.1f} GiB as float32 before the backbone, which needs many times "
            "that; use the backbone's resolution (leave image_size unset) or a few hundred pixels"
        )


class ImagePipeline:
    """rgb uint8 (H, W, 3) -> resized, optionally augmented, uint8 tensor (3, S, S) (with tiles:
    ``(3, rows*S, cols*S)``, see :class:`Geometry`)."""

    def __init__(
        self,
        image_size: int,
        augment: Callable[..., dict] | None = None,
        resize: str | ResizeRule | Geometry = DEFAULT_RESIZE,
    ) -> None:
        check_image_size(image_size)
        self.image_size = image_size
        self.augment = augment
        self.geometry = geometry(resize)
        self.resize = self.geometry.resize

    @property
    def shape(self) -> tuple[int, int]:
        """The (height, width) of every image the pipeline yields."""
        return self.geometry.canvas(self.image_size)

    def __call__(self, rgb: np.ndarray) -> torch.Tensor:
        image = self.geometry(rgb, self.image_size)
        if self.augment is not None:
            image = self.augment(image=image)["image"]
            if image.shape[:2] != self.shape:
                raise UserError(
                    f"the augmentation turned a {self.shape[0]}x{self.shape[1]} input into "
                    f"{image.shape[0]}x{image.shape[1]}: 90° turns need square inputs; with non-square "
                    "tiles set --data.augment_options.rotate90 false"
                )
        # numpy copies uint8 HWC to CHW about 40x faster than torch's permute
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))

    def mask(self, mask: np.ndarray) -> np.ndarray:
        """A boolean mask on the same canvas as the image (see :meth:`Geometry.mask`)."""
        return self.geometry.mask(mask, self.image_size)
