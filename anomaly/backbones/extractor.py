"""The frozen, self-normalising multi-level feature extractor shared by all backbones.

A :class:`FeatureExtractor` wraps an ImageNet classifier, splits it into numbered
levels (1-based, as in the paper) and returns one globally average-pooled vector
per requested level. Subclasses only say how to walk the network level by level.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from anomaly.errors import UserError


def unit_images(images: Tensor) -> Tensor:
    """(B, 3, H, W) uint8 0..255 or float 0..1 images as float32 in [0, 1]."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    if images.is_floating_point():
        return images.float()
    raise ValueError(f"expected uint8 or floating-point images, got {images.dtype}")


def normalise_images(images: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Images as a backbone expects them: ``(x - mean) / std`` of :func:`unit_images`, in ``mean``'s dtype."""
    return ((unit_images(images) - mean) / std).to(mean.dtype)  # float32 unless the module was cast


def grid_means(fmap: Tensor, grid: int) -> Tensor:
    """``(B, C, k, k)`` means of a ``(B, C, H, W)`` map over the windows of adaptive average pooling
    (rows ``floor(i H / k)`` to ``ceil((i + 1) H / k)``, likewise columns). While tracing for export it
    is written as fixed slices (the same windows, equal up to float rounding), so that the exported
    graph needs no runtime shape, which ONNX's adaptive pooling lacks."""
    if not torch.jit.is_tracing():
        return nn.functional.adaptive_avg_pool2d(fmap, grid)
    height, width = int(fmap.shape[2]), int(fmap.shape[3])
    rows = [(i * height // grid, -(-(i + 1) * height // grid)) for i in range(grid)]
    cols = [(j * width // grid, -(-(j + 1) * width // grid)) for j in range(grid)]
    cells = [fmap[:, :, r0:r1, c0:c1].mean(dim=(2, 3)) for r0, r1 in rows for c0, c1 in cols]
    return torch.stack(cells, dim=2).reshape(fmap.shape[0], fmap.shape[1], grid, grid)


#: The most input pixels one backbone pass takes on the CPU (2 images of 224 x 224 pixels): a larger
#: batch goes through in slices. The activations of 32 such images take about 0.5 GB more than those
#: of 8; slices of 2 keep them in the processor's caches, and Lite0 ran 1.3-1.8x faster with one
#: thread than in slices of 8 (docs/benchmarks.md).
PIXELS_PER_PASS = 2 * 224 * 224
#: The same on an accelerator, where small slices leave it idle (32 images of 224 x 224 pixels).
ACCELERATOR_PIXELS_PER_PASS = 32 * 224 * 224


def images_per_pass(images: Tensor) -> int:
    """How many of these ``(B, 3, H, W)`` images one backbone pass takes (at least one)."""
    budget = PIXELS_PER_PASS if images.device.type == "cpu" else ACCELERATOR_PIXELS_PER_PASS
    return max(1, budget // (int(images.shape[-2]) * int(images.shape[-1])))


@dataclass(frozen=True)
class BackboneSpec:
    """Static facts about one backbone, known without building it."""

    name: str
    image_size: int  # native input resolution (square)
    mean: tuple[float, float, float]  # per-channel normalisation of [0, 1] RGB input
    std: tuple[float, float, float]
    num_levels: int
    level_dims: tuple[int, ...]  # channels of level l at index l - 1
    family: str  # "efficientnet", "efficientnet-lite" or "resnet"


class FeatureExtractor(nn.Module):
    """A frozen ImageNet network that maps images to pooled features per level.

    ``forward(images, levels)`` takes ``(B, 3, S, S)`` RGB images, either uint8 in
    0..255 or float in [0, 1], normalises them with the spec's mean/std and returns
    a list of ``(B, C_l)`` float32 tensors for the requested levels, in ascending
    level order. Only as much of the network runs as the deepest level needs.

    The network is permanently in eval mode (``train()`` is a no-op) and none of
    its parameters require gradients.
    """

    def __init__(
        self,
        spec: BackboneSpec,
        net: nn.Module,
        weights_source: str | None = None,
        classifier_loaded: bool = False,
    ) -> None:
        super().__init__()
        self._spec = spec
        self.net = net
        #: The weights file that was loaded, or None for random initialisation.
        self.weights_source = weights_source
        #: Whether the final classification layer holds trained weights.
        self.classifier_loaded = classifier_loaded
        mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)
        self.requires_grad_(False)
        super().train(False)

    @property
    def spec(self) -> BackboneSpec:
        return self._spec

    @property
    def image_size(self) -> int:
        return self._spec.image_size

    @property
    def level_dims(self) -> tuple[int, ...]:
        return self._spec.level_dims

    @property
    def num_levels(self) -> int:
        return self._spec.num_levels

    def train(self, mode: bool = True) -> FeatureExtractor:
        """Stay in eval mode whatever is asked: batch-norm statistics must never change."""
        return super().train(False)

    def _level_maps(self, x: Tensor, prepared: object) -> Iterator[Tensor]:
        """Yield the feature map of level 1, 2, ... in order; the caller stops when done.
        ``prepared`` is what :meth:`_prepare_pass` returned for this batch."""
        raise NotImplementedError

    def _prepare_pass(self) -> object:
        """What :meth:`_level_maps` derives from the frozen weights alone, computed once a batch and
        shared by its slices (nothing here)."""
        return None

    def _check_dims(self, dims: Sequence[int]) -> None:
        """Fail loudly if the built network disagrees with the spec's channel counts."""
        spec = self._spec
        if tuple(dims) != spec.level_dims:
            raise RuntimeError(f"{spec.name}: level widths {tuple(dims)} != spec {spec.level_dims}")

    def normalise(self, images: Tensor) -> Tensor:
        """uint8 0..255 or float 0..1 images -> normalised network input on this module's device; on
        the CPU laid out channels-last in memory, where oneDNN's convolutions take 10-20% less time
        than on the channels-first batches of the data pipeline (docs/benchmarks.md). The same values:
        a layout, not a shape."""
        images = images.to(self.mean.device)
        if images.device.type == "cpu" and not torch.jit.is_tracing():
            images = images.contiguous(memory_format=torch.channels_last)
        return normalise_images(images, self.mean, self.std)

    def check_levels(self, levels: Sequence[int] | None) -> list[int]:
        """The requested levels as a sorted list without duplicates; all levels for None."""
        if levels is None:
            return list(range(1, self.num_levels + 1))
        wanted = sorted({int(level) for level in levels})
        if not wanted or wanted[0] < 1 or wanted[-1] > self.num_levels:
            raise UserError(
                f"levels {list(levels)} invalid for {self._spec.name}: choose from 1..{self.num_levels}"
            )
        return wanted

    def forward(
        self, images: Tensor, levels: Sequence[int] | None = None, grid: int | None = None
    ) -> list[Tensor]:
        """Pooled features ``(B, C_l)`` for each requested level (ascending; None = all).

        ``grid=k`` pools each level's map adaptively to ``k x k`` cells instead of
        globally and returns ``(B, C_l, k, k)`` tensors.
        """
        if grid is not None and (isinstance(grid, bool) or not isinstance(grid, int) or grid < 1):
            raise UserError(f"grid must be a positive whole number of cells per side, got {grid!r}")

        def pooled(maps: list[Tensor]) -> list[Tensor]:
            if grid is None:
                return [fmap.mean(dim=(2, 3), dtype=torch.float32) for fmap in maps]
            return [grid_means(fmap.float(), grid).contiguous() for fmap in maps]

        return self.feature_maps(images, levels, pooled)

    def feature_maps(
        self,
        images: Tensor,
        levels: Sequence[int] | None = None,
        reduce: Callable[[list[Tensor]], list[Tensor]] | None = None,
    ) -> list[Tensor]:
        """Unpooled feature maps ``(B, C_l, H_l, W_l)`` of the requested levels (ascending; None = all),
        contiguous as usual, or with ``reduce`` what it makes of them (one tensor a level, by image:
        e.g. pooled rows), which on the CPU are given the maps as the network made them, channels-last
        (:meth:`normalise`).

        A batch of more than :data:`PIXELS_PER_PASS` input pixels (on an accelerator
        :data:`ACCELERATOR_PIXELS_PER_PASS`) goes through the network in slices
        (the same maps: the backbone is in eval mode), so that the memory of the activations is
        bounded by one slice, not the batch; ``reduce`` takes each slice's maps, so that the batch's
        maps are never held at once. While tracing for export, the batch goes through whole.
        """
        wanted = self.check_levels(levels)
        reduce = reduce or (lambda maps: [fmap.contiguous() for fmap in maps])
        per_pass = images_per_pass(images)
        with torch.no_grad():
            prepared = self._prepare_pass()
        if images.shape[0] <= per_pass or torch.jit.is_tracing():
            return reduce(self._feature_maps(images, wanted, prepared))
        slices = [reduce(self._feature_maps(part, wanted, prepared)) for part in images.split(per_pass)]
        return [torch.cat(level) for level in zip(*slices, strict=True)]

    def _feature_maps(self, images: Tensor, wanted: list[int], prepared: object) -> list[Tensor]:
        x = self.normalise(images)
        maps: list[Tensor] = []
        with torch.no_grad():
            for level, fmap in enumerate(self._level_maps(x, prepared), start=1):
                if level in wanted:
                    maps.append(fmap)
                if level == wanted[-1]:
                    break
        return maps

    def classifier(self, images: Tensor) -> Tensor:
        """ImageNet logits ``(B, 1000)`` of the full network (for sanity checks, not features)."""
        if not self.classifier_loaded:
            raise RuntimeError(f"no trained classification layer was loaded for {self._spec.name}")
        x = self.normalise(images)
        with torch.no_grad():
            return self.net(x).float()
