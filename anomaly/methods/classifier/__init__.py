"""The fully supervised fine-tuning baseline, a non-deployable upper bound (Table V, VIII)."""

from anomaly.methods.classifier.module import FineTunedClassifier

__all__ = ["FineTunedClassifier"]
