"""A dataset of precomputed per-level features, in place of decoded images."""

from __future__ import annotations

from torch import Tensor
from torch.utils.data import Dataset

from anomaly.data.datasets import Sample


class FeatureDataset(Dataset):
    """Yields ``{"features": {level: (C_l,)}, "label", "index", "path"}`` for each sample.

    ``features[l - 1]`` is the ``(N, C_l)`` tensor of level ``l`` for ``samples``
    in order. Keys may encode an epoch as ``epoch * len(self) + index``, as
    :class:`~anomaly.data.samplers.EpochShardSampler` yields them.
    """

    def __init__(self, samples: list[Sample], features: list[Tensor]) -> None:
        if any(f.shape[0] != len(samples) for f in features):
            raise ValueError("one feature row per sample is required")
        self.samples = samples
        self.features = features

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int) -> dict:
        index = key % len(self.samples)
        sample = self.samples[index]
        return {
            "features": {level: f[index] for level, f in enumerate(self.features, start=1)},
            "label": sample.label,
            "index": index,
            "path": sample.path,
        }
