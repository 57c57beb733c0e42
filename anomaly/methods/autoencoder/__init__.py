"""The pixel-shuffle autoencoder baseline with map-mean and CCA scores (Table V, VIII)."""

from anomaly.methods.autoencoder.module import PixelShuffleAutoencoder

__all__ = ["PixelShuffleAutoencoder"]
