"""The supported backbones: their specs by name, and :func:`build_backbone`."""

from __future__ import annotations

from collections.abc import Sequence
from importlib import import_module

from anomaly.backbones.extractor import BackboneSpec, FeatureExtractor
from anomaly.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LITE_MEAN = (0.5, 0.5, 0.5)  # the Lite models were trained on (x - 127) / 128 inputs
LITE_STD = (0.5, 0.5, 0.5)

# name: (native resolution, channels per level)
_EFFICIENTNETS: dict[str, tuple[int, tuple[int, ...]]] = {
    "efficientnet-b0": (224, (32, 16, 24, 40, 80, 112, 192, 320, 1280)),
    "efficientnet-b1": (240, (32, 16, 24, 40, 80, 112, 192, 320, 1280)),
    "efficientnet-b2": (260, (32, 16, 24, 48, 88, 120, 208, 352, 1408)),
    "efficientnet-b3": (300, (40, 24, 32, 48, 96, 136, 232, 384, 1536)),
    "efficientnet-b4": (380, (48, 24, 32, 56, 112, 160, 272, 448, 1792)),
    "efficientnet-b5": (456, (48, 24, 40, 64, 128, 176, 304, 512, 2048)),
    "efficientnet-b6": (528, (56, 32, 40, 72, 144, 200, 344, 576, 2304)),
    "efficientnet-b7": (600, (64, 32, 48, 80, 160, 224, 384, 640, 2560)),
}
_LITES: dict[str, tuple[int, tuple[int, ...]]] = {
    "efficientnet-lite0": (224, (32, 16, 24, 40, 80, 112, 192, 320, 1280)),
    "efficientnet-lite1": (240, (32, 16, 24, 40, 80, 112, 192, 320, 1280)),
    "efficientnet-lite2": (260, (32, 16, 24, 48, 88, 120, 208, 352, 1280)),
}
_RESNETS: dict[str, tuple[int, tuple[int, ...]]] = {
    "resnet18": (224, (64, 64, 128, 256, 512)),
    "resnet34": (224, (64, 64, 128, 256, 512)),
    "resnet50": (224, (64, 256, 512, 1024, 2048)),
}


def _specs() -> dict[str, BackboneSpec]:
    families = (
        ("efficientnet", _EFFICIENTNETS, IMAGENET_MEAN, IMAGENET_STD),
        ("efficientnet-lite", _LITES, LITE_MEAN, LITE_STD),
        ("resnet", _RESNETS, IMAGENET_MEAN, IMAGENET_STD),
    )
    return {
        name: BackboneSpec(name, size, mean, std, len(dims), dims, family)
        for family, table, mean, std in families
        for name, (size, dims) in table.items()
    }


SPECS: dict[str, BackboneSpec] = _specs()
BACKBONES: tuple[str, ...] = tuple(SPECS)

#: The module whose ``build(spec, weights, pretrained)`` makes a family's extractor, imported when first
#: used: the ResNets need torchvision (almost 2 s to import), which EfficientNet detectors never touch.
_BUILDERS = {
    "efficientnet": "anomaly.backbones.efficientnet",
    "efficientnet-lite": "anomaly.backbones.efficientnet",
    "resnet": "anomaly.backbones.resnet",
}


def backbone_spec(name: str) -> BackboneSpec:
    """The spec of backbone ``name``; :class:`UserError` listing the choices if unknown."""
    try:
        return SPECS[name]
    except KeyError:
        raise UserError(f"unknown backbone {name!r}; choose one of: {', '.join(BACKBONES)}") from None


def build_backbone(name: str, weights: str | None = None, pretrained: bool = True) -> FeatureExtractor:
    """A frozen feature extractor for backbone ``name``.

    ``weights`` is a local state-dict file (the network's own key names) and takes
    precedence; otherwise ``pretrained`` loads the ImageNet weights (downloaded
    into, or found in, the torch hub cache; packaged for the Lite models);
    ``pretrained=False`` leaves the random initialisation (for tests).
    """
    spec = backbone_spec(name)
    return import_module(_BUILDERS[spec.family]).build(spec, weights=weights, pretrained=pretrained)


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
