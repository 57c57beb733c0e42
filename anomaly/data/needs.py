"""What a model asks of the data: declared by the model, obeyed by the data module.

A method returns a :class:`DataNeeds` from ``data_needs()``; the code that wires a run hands
it to the data module once, before any set-up (:meth:`AnomalyDataModule.configure
<anomaly.data.datamodule.AnomalyDataModule.configure>`, called by :func:`anomaly.methods.run.fit`).
No hook of a model changes the data module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from anomaly.backbones.extractor import FeatureExtractor


@dataclass(frozen=True)
class DataNeeds:
    """A model's requirements of the data module.

    Attributes:
        image_size: the model's native square input size (``--data.image_size`` given by the
            user wins); ``None``: the model has none.
        shuffle: shuffle the training images every epoch (gradient descent).
        pad: give every process the same number of training images under DDP (equal gradient
            steps), repeating a few.
        noise: the augmentation may add noise (the autoencoder trains without, Appendix Fig. 2).
        masks: test batches carry the ground-truth masks, where the data have them (pixel metrics).
        extractor: the frozen feature extractor whose pooled features ``--data.feature_cache``
            stores; ``None`` for methods that need images.
    """

    image_size: int | None = None
    shuffle: bool = False
    pad: bool = False
    noise: bool = True
    masks: bool = False
    extractor: FeatureExtractor | None = None


__all__ = ["DataNeeds"]
