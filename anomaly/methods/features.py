"""What the feature-based methods share: a frozen backbone and a choice of levels."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from anomaly.backbones import build_backbone
from anomaly.data.transforms import Geometry
from anomaly.errors import UserError
from anomaly.features import FeatureCache
from anomaly.methods.base import AnomalyMethod


def resolve_levels(levels: Sequence[int] | int | None, num_levels: int, backbone: str) -> list[int]:
    """Sorted unique levels (paper numbering, 1-based); ``None`` means all of ``1..num_levels``."""
    if levels is None:
        return list(range(1, num_levels + 1))
    if isinstance(levels, int):
        levels = [levels]
    chosen = sorted(set(levels))
    bad = [
        level
        for level in chosen
        if isinstance(level, bool) or not isinstance(level, int) or not 1 <= level <= num_levels
    ]
    if bad or not chosen:
        raise UserError(
            f"levels {list(levels)} are not valid for {backbone}, which has levels 1..{num_levels}"
        )
    return chosen


def take_geometry(method: AnomalyMethod, geometry: Geometry | None) -> None:
    """Hand the data's resize rule, fit rule and tiles to the method's fitted model, which cuts the
    tiles (:class:`~anomaly.detector.model.GaussianDetectorModel`); tiles without one are refused."""
    if geometry is None:
        return
    detector = getattr(method, "detector", None)
    if detector is not None and hasattr(detector, "set_geometry"):
        detector.set_geometry(geometry)
    elif geometry.tiles.count > 1:
        raise UserError(
            f"--data.tiles {geometry.tiles} needs a Gaussian method (gaussian, spatial): "
            f"{method.method_name} scores whole images; use --data.fit pad or crop instead"
        )


class FeatureMethod(AnomalyMethod):
    """A method on the pooled per-level features of a frozen ImageNet backbone.

    Subclasses call ``super().__init__(backbone, levels, weights, pretrained)``
    and get ``self.extractor``, ``self.levels`` and :meth:`batch_features`.
    """

    epochs_are_samples = True  # augmented passes are streamed into the fit: their number is a setting

    def __init__(
        self,
        backbone: str,
        levels: Sequence[int] | None,
        weights: str | None,
        pretrained: bool,
    ) -> None:
        super().__init__()
        self.extractor = build_backbone(backbone, weights=weights, pretrained=pretrained)
        self.levels = resolve_levels(levels, self.extractor.num_levels, backbone)

    @property
    def input_size(self) -> int:
        return self.extractor.image_size

    @property
    def level_dims(self) -> list[int]:
        return [self.extractor.level_dims[level - 1] for level in self.levels]

    def run_name(self) -> str:
        name = super().run_name()
        if self.levels != list(range(1, self.extractor.num_levels + 1)):
            name += "_levels-" + "-".join(map(str, self.levels))
        return name

    def features(self, images: Tensor) -> list[Tensor]:
        """Pooled features of the chosen levels, one (B, C_l) tensor per level."""
        return self.extractor(images, self.levels)

    def setup(self, stage: str) -> None:
        """Besides the base's set-up, hand the data's geometry to the fitted model and the extractor
        to the data module's feature cache, if any."""
        super().setup(stage)
        dm = self.datamodule
        take_geometry(self, getattr(dm, "geometry", None))
        if dm is None or getattr(dm, "feature_cache", None) is None:
            return
        current = dm.feature_source
        if current is None or current.extractor is not self.extractor:
            trainer = self.trainer
            dm.attach_feature_cache(
                FeatureCache(
                    dm.feature_cache,
                    self.extractor,
                    dm.image_size,
                    compute=f"{trainer.strategy.root_device.type}/{trainer.precision}",
                    forward_context=trainer.precision_plugin.forward_context,
                    resize=dm.geometry,
                )
            )

    def batch_features(self, batch: dict) -> list[Tensor]:
        """The batch's features: precomputed ones when the loader supplies them, else a forward pass."""
        if "features" in batch:
            return [batch["features"][level] for level in self.levels]
        return self.features(batch["image"])
