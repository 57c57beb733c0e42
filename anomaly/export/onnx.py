"""ONNX export of the whole detector (needs the ``export`` extra: ``pip install .[export]``)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from anomaly.detector.api import GaussianDetector
from anomaly.export.module import prepare_export

OPSET = 17


def export_onnx(detector: GaussianDetector, path: str | Path, input_dtype: str = "uint8") -> Path:
    """Write ``path``: input ``images`` (B, 3, S, S) of ``input_dtype``; outputs ``score`` (B,),
    ``level_scores`` (B, L) and, for a map-capable pooling, ``map`` (B, k, k).
    The detector's metadata (threshold, levels, ...) goes into the
    model's metadata properties under ``detector``.
    """
    try:
        import onnx
    except ImportError as exc:  # the optional extra is not installed
        from anomaly.errors import UserError

        raise UserError("ONNX export needs the onnx package: pip install 'gaussian-anomaly[export]'") from exc
    module, path, example = prepare_export(detector, path, input_dtype)
    with torch.no_grad(), warnings.catch_warnings():
        # the backbone's SAME padding is fixed for this input size on purpose (see module.py)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            module,
            (example,),
            str(path),
            input_names=["images"],
            output_names=module.output_names,
            dynamic_axes={name: {0: "batch"} for name in ["images", *module.output_names]},
            opset_version=OPSET,
            dynamo=False,
        )
    model = onnx.load(str(path))
    entry = model.metadata_props.add()
    entry.key, entry.value = "detector", json.dumps(detector.metadata())
    onnx.save(model, str(path))
    return path
