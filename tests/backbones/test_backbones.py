"""Tests for anomaly.backbones: level structure, weights loading, freezing and offline errors."""

from __future__ import annotations

import urllib.error
from collections.abc import Container
from pathlib import Path

import pytest
import skimage.data
import torch
import torch.nn.functional as F
from efficientnet_pytorch import EfficientNet
from torch import Tensor, nn

from anomaly.backbones import BACKBONES, FeatureExtractor, backbone_spec, build_backbone
from anomaly.backbones import efficientnet as efficientnet_module
from anomaly.backbones import extractor as extractor_module
from anomaly.backbones.efficientnet import stage_ends
from anomaly.backbones.extractor import normalise_images
from anomaly.errors import UserError

EXPECTED_DIMS = {
    "efficientnet-b0": (32, 16, 24, 40, 80, 112, 192, 320, 1280),
    "efficientnet-b4": (48, 24, 32, 56, 112, 160, 272, 448, 1792),
    "efficientnet-lite0": (32, 16, 24, 40, 80, 112, 192, 320, 1280),
    "efficientnet-lite1": (32, 16, 24, 40, 80, 112, 192, 320, 1280),
    "efficientnet-lite2": (32, 16, 24, 48, 88, 120, 208, 352, 1280),
    "resnet18": (64, 64, 128, 256, 512),
    "resnet50": (64, 256, 512, 1024, 2048),
}
CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = {504, 967, 968}  # coffee mug, espresso, cup


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every download fails, as on an offline machine."""

    def offline(url: str, *args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)


@pytest.fixture
def empty_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch hub cache under ``tmp_path`` (via TORCH_HOME); returns its checkpoints dir."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # so TORCH_HOME decides even after set_dir()
    return tmp_path / "hub" / "checkpoints"


@pytest.fixture(scope="module")
def lite0() -> FeatureExtractor:
    return build_backbone("efficientnet-lite0")


def photo(size: int, which: str = "chelsea") -> Tensor:
    """A skimage test photograph as a (1, 3, size, size) float image in [0, 1]."""
    array = getattr(skimage.data, which)()
    x = torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.clamp(0, 1)


def random_images(size: int, batch: int = 2, seed: int = 0) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=generator)


# --- structure ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(EXPECTED_DIMS))
def test_level_dims_and_shapes(name: str) -> None:
    extractor = build_backbone(name, pretrained=False)
    expected = EXPECTED_DIMS[name]
    assert backbone_spec(name).level_dims == expected
    assert extractor.level_dims == expected
    assert extractor.num_levels == len(expected)
    feats = extractor(random_images(96))
    assert [tuple(f.shape) for f in feats] == [(2, dim) for dim in expected]
    assert all(f.dtype == torch.float32 for f in feats)


def test_every_backbone_has_a_consistent_spec() -> None:
    for name in BACKBONES:
        spec = backbone_spec(name)
        assert spec.name == name and spec.num_levels == len(spec.level_dims)
        assert spec.num_levels == (5 if spec.family == "resnet" else 9)
    sizes = {name: backbone_spec(name).image_size for name in BACKBONES}
    assert [sizes[f"efficientnet-b{k}"] for k in range(8)] == [224, 240, 260, 300, 380, 456, 528, 600]
    assert [sizes[f"efficientnet-lite{k}"] for k in range(3)] == [224, 240, 260]
    assert backbone_spec("efficientnet-lite0").mean == backbone_spec("efficientnet-lite0").std == (0.5,) * 3
    assert backbone_spec("resnet34").mean == (0.485, 0.456, 0.406)


@pytest.mark.parametrize("name", ["efficientnet-b1", "efficientnet-b3", "resnet34"])
def test_built_network_matches_spec(name: str) -> None:
    extractor = build_backbone(name, pretrained=False)  # the builder checks its widths against the spec
    assert extractor.image_size == backbone_spec(name).image_size


def test_b0_levels_are_stem_stage_ends_and_head() -> None:
    extractor = build_backbone("efficientnet-b0", pretrained=False)
    net: EfficientNet = extractor.net
    x = extractor.normalise(random_images(224, batch=1))
    with torch.no_grad():
        endpoints = net.extract_endpoints(x)
        head = net.extract_features(x)
    feats = extractor(random_images(224, batch=1))
    # efficientnet_pytorch's endpoints are the last maps before each downsampling (stages 1, 2, 3, 5, 7)
    for level, key in [(2, 1), (3, 2), (4, 3), (6, 4), (8, 5), (9, 6)]:
        torch.testing.assert_close(feats[level - 1], endpoints[f"reduction_{key}"].mean(dim=(2, 3)))
    torch.testing.assert_close(feats[-1], head.mean(dim=(2, 3)))


@pytest.mark.parametrize("name", ["efficientnet-lite0", "efficientnet-b0"])
@pytest.mark.parametrize("size", [64, 67])
def test_folded_batch_norms_give_the_networks_own_maps(name: str, size: int) -> None:
    """Each level equals the network's modules run one after the other (conv, batch norm, padding
    as ``Conv2dDynamicSamePadding``), at an even and an odd size (symmetric and one-sided padding)."""
    extractor = build_backbone(name, pretrained=False)
    net, generator = extractor.net, torch.Generator().manual_seed(1)
    for module in net.modules():  # batch norms that change their inputs
        if isinstance(module, nn.BatchNorm2d):
            for tensor in (module.weight, module.bias, module.running_mean):
                tensor.data.copy_(torch.randn(tensor.shape, generator=generator) * 0.5)
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
    images = random_images(size)
    with torch.no_grad():
        x = net._swish(net._bn0(net._conv_stem(extractor.normalise(images))))
        expected, ends = [x], set(stage_ends(net))
        for idx, block in enumerate(net._blocks):
            x = block(x)
            if idx in ends:
                expected.append(x)
        expected.append(net._swish(net._bn1(net._conv_head(x))))
    for level, (ours, theirs) in enumerate(zip(extractor.feature_maps(images), expected, strict=True), 1):
        scale = theirs.abs().max()
        torch.testing.assert_close(ours / scale, theirs / scale, rtol=0, atol=1e-5, msg=f"level {level}")


def test_b4_stage_boundaries_follow_scaled_repeats() -> None:
    extractor = build_backbone("efficientnet-b4", pretrained=False)
    assert len(extractor.net._blocks) == 32
    assert stage_ends(extractor.net) == (1, 5, 9, 15, 21, 29, 31)  # repeats 2, 4, 4, 6, 6, 8, 2


def test_resnet_last_level_is_the_classifier_input() -> None:
    extractor = build_backbone("resnet18", pretrained=False)
    images = random_images(224, batch=1)
    pooled = extractor(images, levels=[5])[0]
    with torch.no_grad():
        logits = extractor.net(extractor.normalise(images))
    torch.testing.assert_close(extractor.net.fc(pooled), logits)


def test_levels_are_sorted_deduplicated_and_validated() -> None:
    extractor = build_backbone("efficientnet-b0", pretrained=False)
    images = random_images(64)
    everything = extractor(images)
    some = extractor(images, levels=[7, 2, 2, 5])
    assert len(some) == 3
    for feat, level in zip(some, [2, 5, 7], strict=True):
        torch.testing.assert_close(feat, everything[level - 1])
    for bad in ([0], [10], []):
        with pytest.raises(UserError, match=r"choose from 1\.\.9"):
            extractor(images, levels=bad)


def test_only_needed_depth_is_computed() -> None:
    extractor = build_backbone("resnet18", pretrained=False)
    called: list[str] = []
    extractor.net.layer3.register_forward_hook(lambda *args: called.append("layer3"))
    extractor(random_images(64), levels=[1, 2])
    assert called == []
    extractor(random_images(64), levels=[4])
    assert called == ["layer3"]


def test_uint8_and_float_inputs_agree() -> None:
    extractor = build_backbone("resnet18", pretrained=False)
    images = random_images(64)
    as_uint8 = extractor(images)
    as_float = extractor(images.float() / 255)
    for a, b in zip(as_uint8, as_float, strict=True):
        torch.testing.assert_close(a, b)


def test_a_large_batch_goes_through_the_network_in_slices_with_the_same_features(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The activations of one slice, not of the whole batch, bound the memory of a pass."""
    extractor = build_backbone("efficientnet-lite0", pretrained=False)
    images = random_images(64, batch=7)
    whole = extractor(images, levels=[2, 5], grid=2)
    monkeypatch.setattr(extractor_module, "PIXELS_PER_PASS", 3 * 64 * 64 + 1)  # three 64 px images a pass
    passes: list[int] = []
    one_pass = extractor._feature_maps
    monkeypatch.setattr(
        extractor,
        "_feature_maps",
        lambda part, wanted, prepared: passes.append(len(part)) or one_pass(part, wanted, prepared),
    )
    sliced = extractor(images, levels=[2, 5], grid=2)
    assert passes == [3, 3, 1]
    for a, b in zip(sliced, whole, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert [m.shape[0] for m in extractor.feature_maps(images, [1])] == [7]


@pytest.mark.parametrize("name", ["efficientnet-lite0", "resnet18"])
def test_the_cpu_pass_runs_channels_last_with_the_features_of_a_channels_first_one(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    extractor = build_backbone(name, pretrained=False)
    images = random_images(64, batch=3)
    assert extractor.normalise(images).is_contiguous(memory_format=torch.channels_last)
    channels_last = extractor(images, levels=[2, 3, 5])
    monkeypatch.setattr(
        extractor, "normalise", lambda batch: normalise_images(batch, extractor.mean, extractor.std)
    )
    assert extractor.normalise(images).is_contiguous()
    channels_first = extractor(images, levels=[2, 3, 5])
    for a, b in zip(channels_last, channels_first, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    monkeypatch.undo()
    # what callers get is contiguous, as before
    assert all(fmap.is_contiguous() for fmap in extractor.feature_maps(images, [2, 3, 5]))
    assert all(cells.is_contiguous() for cells in extractor(images, [2, 3, 5], grid=4))


def test_the_kernels_are_folded_once_a_batch_not_once_a_slice(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every slice of a batch shares one folding of the batch norms into the convolutions."""
    extractor = build_backbone("efficientnet-lite0", pretrained=False)
    images = random_images(64, batch=7)
    folded: list[Tensor] = []
    fold = efficientnet_module.fuse_conv_bn_weights
    monkeypatch.setattr(
        efficientnet_module,
        "fuse_conv_bn_weights",
        lambda weight, *rest: folded.append(weight) or fold(weight, *rest),
    )
    whole = extractor(images)
    convolutions = len(folded)
    assert convolutions == sum(isinstance(module, nn.Conv2d) for module in extractor.net.modules())
    monkeypatch.setattr(extractor_module, "PIXELS_PER_PASS", 3 * 64 * 64)  # three slices
    sliced = extractor(images)
    assert len(folded) == 2 * convolutions
    for a, b in zip(sliced, whole, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_reduce_takes_each_slice_so_the_batchs_maps_are_never_held_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Pooling slice by slice gives the rows of pooling the whole batch's maps."""
    extractor = build_backbone("efficientnet-lite0", pretrained=False)
    images = random_images(64, batch=7)
    whole = [fmap.mean(dim=(2, 3)) for fmap in extractor.feature_maps(images, [3, 5])]
    monkeypatch.setattr(extractor_module, "PIXELS_PER_PASS", 3 * 64 * 64)
    reduced: list[int] = []

    def means(maps: list[torch.Tensor]) -> list[torch.Tensor]:
        reduced.append(len(maps[0]))
        return [fmap.mean(dim=(2, 3)) for fmap in maps]

    sliced = extractor.feature_maps(images, [3, 5], means)
    assert reduced == [3, 3, 1]
    for a, b in zip(sliced, whole, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# --- frozen ------------------------------------------------------------------------------------------


def test_frozen_and_always_in_eval() -> None:
    extractor = build_backbone("efficientnet-b0", pretrained=False)
    parent = nn.Sequential(extractor)
    parent.train()
    assert not extractor.training
    assert not any(module.training for module in extractor.modules())
    assert not any(p.requires_grad for p in extractor.parameters())
    bn_before = extractor.net._bn0.running_mean.clone()
    images = random_images(64)
    first, second = extractor(images), extractor(images)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
        assert not a.requires_grad
    assert torch.equal(extractor.net._bn0.running_mean, bn_before)


# --- real weights ------------------------------------------------------------------------------------


def test_lite0_checkpoint_loads_every_key(lite0: FeatureExtractor) -> None:
    assert lite0.weights_source is not None and lite0.weights_source.endswith(".pth")
    assert lite0.classifier_loaded
    state = torch.load(lite0.weights_source, map_location="cpu", weights_only=True)
    assert set(state) == set(lite0.net.state_dict())
    result = lite0.net.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


@pytest.mark.parametrize(("which", "classes"), [("chelsea", CAT_CLASSES), ("coffee", COFFEE_CLASSES)])
def test_lite0_classifies_photographs(lite0: FeatureExtractor, which: str, classes: Container[int]) -> None:
    logits = lite0.classifier(photo(lite0.image_size, which))
    probabilities = logits.softmax(dim=1)[0]
    assert int(probabilities.argmax()) in classes
    assert float(probabilities.max()) > 0.5


@pytest.mark.parametrize("name", ["efficientnet-lite1", "efficientnet-lite2"])
def test_larger_lites_classify_the_cat(name: str) -> None:
    extractor = build_backbone(name)
    logits = extractor.classifier(photo(extractor.image_size))
    assert int(logits.argmax()) in CAT_CLASSES


def test_lite0_head_features_feed_its_classifier(lite0: FeatureExtractor) -> None:
    image = photo(lite0.image_size)
    head = lite0(image, levels=[9])[0]
    torch.testing.assert_close(lite0.net._fc(head), lite0.classifier(image), rtol=1e-4, atol=1e-4)


# --- weights files and offline behaviour -------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "file_name"),
    [("efficientnet-b0", "efficientnet-b0-355c32eb.pth"), ("resnet18", "resnet18-f37072fd.pth")],
)
def test_offline_without_cached_weights_is_a_one_line_user_error(
    empty_hub: Path, name: str, file_name: str
) -> None:
    with pytest.raises(UserError) as info:
        build_backbone(name)
    message = str(info.value)
    assert "\n" not in message
    assert file_name in message
    assert "https://" in message and message.count(file_name) >= 2  # in the URL and the path
    assert str(empty_hub / file_name) in message
    assert "--model.weights" in message


def test_cached_weights_are_used_without_downloading(empty_hub: Path) -> None:
    reference = build_backbone("resnet18", pretrained=False)
    empty_hub.mkdir(parents=True)
    torch.save(reference.net.state_dict(), empty_hub / "resnet18-f37072fd.pth")
    extractor = build_backbone("resnet18")  # downloads would raise (see no_network)
    assert extractor.weights_source == str(empty_hub / "resnet18-f37072fd.pth")
    assert extractor.classifier_loaded
    for a, b in zip(extractor.net.state_dict().values(), reference.net.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_local_weights_file(tmp_path: Path) -> None:
    reference = build_backbone("efficientnet-b0", pretrained=False)
    path = tmp_path / "b0.pth"
    torch.save(reference.net.state_dict(), path)
    extractor = build_backbone("efficientnet-b0", weights=str(path))
    assert extractor.weights_source == str(path)
    images = random_images(64)
    for a, b in zip(extractor(images), reference(images), strict=True):
        torch.testing.assert_close(a, b)


def test_local_weights_without_classifier_are_accepted(tmp_path: Path) -> None:
    reference = build_backbone("resnet18", pretrained=False)
    state = {k: v for k, v in reference.net.state_dict().items() if not k.startswith("fc.")}
    torch.save(state, tmp_path / "trunk.pth")
    extractor = build_backbone("resnet18", weights=str(tmp_path / "trunk.pth"))
    assert not extractor.classifier_loaded
    with pytest.raises(RuntimeError, match="classification layer"):
        extractor.classifier(random_images(64))


def test_missing_weights_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "weights.pth"
    with pytest.raises(UserError, match="not found") as info:
        build_backbone("efficientnet-lite0", weights=str(missing))
    assert str(missing) in str(info.value)


def test_mismatched_weights_file_is_rejected(tmp_path: Path) -> None:
    torch.save(build_backbone("resnet18", pretrained=False).net.state_dict(), tmp_path / "r18.pth")
    with pytest.raises(UserError, match="do not fit"):
        build_backbone("resnet50", weights=str(tmp_path / "r18.pth"))
    state = build_backbone("efficientnet-lite0", pretrained=False).net.state_dict()
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "extra.pth")
    with pytest.raises(UserError, match="1 unexpected"):
        build_backbone("efficientnet-lite0", weights=str(tmp_path / "extra.pth"))


def test_another_backbones_weights_are_named_as_such(tmp_path: Path) -> None:
    torch.save(build_backbone("efficientnet-lite1", pretrained=False).net.state_dict(), tmp_path / "l1.pth")
    with pytest.raises(UserError) as info:
        build_backbone("efficientnet-lite2", weights=str(tmp_path / "l1.pth"))
    message = str(info.value)
    assert "tensor(s) have other shapes (first: " in message and "another backbone's weights?" in message
    assert "\n" not in message and len(message) < 400


def test_a_file_that_is_not_a_state_dict_says_so(tmp_path: Path) -> None:
    (tmp_path / "garbage.pth").write_bytes(b"these are not weights")
    with pytest.raises(UserError, match="not a PyTorch weights file, or it is damaged"):
        build_backbone("efficientnet-lite0", weights=str(tmp_path / "garbage.pth"))
    torch.save({"model": build_backbone("efficientnet-lite0", pretrained=False).net}, tmp_path / "whole.pth")
    with pytest.raises(UserError, match="holds more than tensors") as info:
        build_backbone("efficientnet-lite0", weights=str(tmp_path / "whole.pth"))
    assert "weights_only" not in str(info.value)


def test_unknown_backbone_lists_the_choices() -> None:
    for call in (lambda: backbone_spec("vgg16"), lambda: build_backbone("vgg16")):
        with pytest.raises(UserError) as info:
            call()
        message = str(info.value)
        assert "vgg16" in message and "\n" not in message
        assert all(name in message for name in BACKBONES)


def test_slices_are_small_on_the_cpu_and_whole_batches_on_an_accelerator() -> None:
    cpu = torch.empty(32, 3, 224, 224)
    elsewhere = torch.empty(32, 3, 224, 224, device="meta")  # stands for any accelerator
    assert extractor_module.images_per_pass(cpu) == extractor_module.PIXELS_PER_PASS // (224 * 224)
    assert extractor_module.images_per_pass(elsewhere) == 32
    assert extractor_module.images_per_pass(torch.empty(1, 3, 2048, 2048)) == 1
