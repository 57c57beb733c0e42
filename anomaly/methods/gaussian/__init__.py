"""The paper's Gaussian method."""

from anomaly.methods.gaussian.module import GaussianAD

__all__ = ["GaussianAD"]
