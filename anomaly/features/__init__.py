"""The on-disk cache of pooled, un-augmented per-level features (one extraction serves every run)."""

from anomaly.features.cache import CacheStats, FeatureCache
from anomaly.features.dataset import FeatureDataset
from anomaly.features.keys import extractor_identity, file_digest, identity_key

__all__ = [
    "CacheStats",
    "FeatureCache",
    "FeatureDataset",
    "extractor_identity",
    "file_digest",
    "identity_key",
]
