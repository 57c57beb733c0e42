"""What the feature-based methods share: a frozen backbone and a choice of levels."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from anomaly.backbones import build_backbone, resolve_levels
from anomaly.data.needs import DataNeeds
from anomaly.methods.base import AnomalyMethod


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

    def data_needs(self) -> DataNeeds:
        """The backbone's native input size, and its extractor for the data's feature cache."""
        return DataNeeds(image_size=self.extractor.image_size, extractor=self.extractor)

    def batch_features(self, batch: dict) -> list[Tensor]:
        """The batch's features: precomputed ones when the loader supplies them, else a forward pass."""
        if "features" in batch:
            return [batch["features"][level] for level in self.levels]
        return self.features(batch["image"])
