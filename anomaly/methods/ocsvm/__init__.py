"""The oc-SVM baseline on pooled pretrained features (Table V, VIII)."""

from anomaly.methods.ocsvm.module import OneClassSVMAD

__all__ = ["OneClassSVMAD"]
