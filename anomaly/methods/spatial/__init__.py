"""Spatially-aware Gaussians and label-free level weighting (beyond the paper)."""

from anomaly.methods.spatial.module import SpatialGaussianAD

__all__ = ["SpatialGaussianAD"]
