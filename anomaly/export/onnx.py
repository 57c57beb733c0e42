"""ONNX export of the whole detector (needs the ``export`` extra: ``pip install .[export]``)."""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import torch

from anomaly.atomic import write_bytes_atomic
from anomaly.detector.api import GaussianDetector
from anomaly.export.module import prepare_export

OPSET = 17
METADATA_KEY = "detector"


def export_onnx(detector: GaussianDetector, path: str | Path, input_dtype: str = "uint8") -> Path:
    """Write ``path``: input ``images`` (B, 3, S, S) of ``input_dtype``; outputs ``score`` (B,),
    ``level_scores`` (B, L) and, for a map-capable pooling, ``map`` (B, k, k).
    The detector's metadata (threshold, levels, ...) goes into the
    model's metadata properties under ``detector``. The model is built in memory and
    written whole (:mod:`anomaly.atomic`): an earlier file survives any failure.
    """
    try:
        import onnx
    except ImportError as exc:  # the optional extra is not installed
        from anomaly.errors import UserError

        raise UserError("ONNX export needs the onnx package: pip install 'gaussian-anomaly[export]'") from exc
    module, path, example = prepare_export(detector, path, input_dtype)
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # the backbone's SAME padding is fixed for this input size on purpose (see module.py)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # the constant pads of the stride-2 convolutions stay an unfolded Slice in the graph (harmless)
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1", category=UserWarning)
        torch.onnx.export(
            module,
            (example,),
            buffer,
            input_names=["images"],
            output_names=module.output_names,
            dynamic_axes={name: {0: "batch"} for name in ["images", *module.output_names]},
            opset_version=OPSET,
            dynamo=False,
        )
    model = onnx.load_from_string(buffer.getvalue())
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(detector.metadata())
    return write_bytes_atomic(path, model.SerializeToString())


def is_onnx_export(path: Path) -> bool:
    """Whether ``path`` is an ONNX model this package exported (it holds the detector's metadata)."""
    try:
        import onnx

        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # not ONNX, unreadable, or no onnx package
        return False
    return any(entry.key == METADATA_KEY for entry in model.metadata_props)
