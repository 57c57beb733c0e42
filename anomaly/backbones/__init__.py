"""Frozen ImageNet backbones that turn images into pooled features per level."""

from anomaly.backbones.extractor import BackboneSpec, FeatureExtractor
from anomaly.backbones.registry import BACKBONES, backbone_spec, build_backbone, resolve_levels

__all__ = [
    "BACKBONES",
    "BackboneSpec",
    "FeatureExtractor",
    "backbone_spec",
    "build_backbone",
    "resolve_levels",
]
