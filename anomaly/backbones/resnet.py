"""torchvision ResNet-18/34/50 as 5-level feature extractors.

Levels: 1 = stem (conv1, bn1, relu, maxpool); 2..5 = layer1..layer4. The final
pooling and classification layer are never part of a level. Pretrained weights
are torchvision's ``IMAGENET1K_V1``, cached where torchvision caches them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

from torch import Tensor, nn
from torchvision import models
from torchvision.models import ResNet

from anomaly.backbones.extractor import BackboneSpec, FeatureExtractor
from anomaly.backbones.weights import cached_checkpoint, load_weights

# name: (constructor, ImageNet weights)
RESNETS: dict[str, tuple[Callable[..., ResNet], models.WeightsEnum]] = {
    "resnet18": (models.resnet18, models.ResNet18_Weights.IMAGENET1K_V1),
    "resnet34": (models.resnet34, models.ResNet34_Weights.IMAGENET1K_V1),
    "resnet50": (models.resnet50, models.ResNet50_Weights.IMAGENET1K_V1),
}


class ResNetExtractor(FeatureExtractor):
    """Five levels of a torchvision ResNet."""

    def __init__(
        self,
        spec: BackboneSpec,
        net: ResNet,
        weights_source: str | None = None,
        classifier_loaded: bool = False,
    ) -> None:
        super().__init__(spec, net, weights_source, classifier_loaded)
        stages = (net.layer1, net.layer2, net.layer3, net.layer4)
        self._check_dims([net.bn1.num_features, *(_out_channels(stage) for stage in stages)])

    def _level_maps(self, x: Tensor, prepared: object) -> Iterator[Tensor]:
        net = self.net
        x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        yield x
        for stage in (net.layer1, net.layer2, net.layer3, net.layer4):
            x = stage(x)
            yield x


def _out_channels(stage: nn.Sequential) -> int:
    """Channels leaving a ResNet stage (its last block's last batch norm)."""
    norms = [module for module in stage[-1].modules() if isinstance(module, nn.BatchNorm2d)]
    return norms[-1].num_features


def build(spec: BackboneSpec, weights: str | None = None, pretrained: bool = True) -> ResNetExtractor:
    """Build the extractor for ``spec`` and load its weights (see :func:`weights.load_weights`)."""
    constructor, imagenet = RESNETS[spec.name]
    net = constructor(weights=None)

    def default() -> Path:
        return cached_checkpoint(imagenet.url, check_hash=True)

    source, head = load_weights(net, weights, pretrained, default, optional_prefix="fc.")
    return ResNetExtractor(spec, net, source, head)
