"""Frozen ImageNet backbones that turn images into pooled features per level."""

from anomaly.backbones.extractor import BackboneSpec, FeatureExtractor
from anomaly.backbones.registry import BACKBONES, backbone_spec, build_backbone

__all__ = ["BACKBONES", "BackboneSpec", "FeatureExtractor", "backbone_spec", "build_backbone"]
