"""Detectors that keep learning: partial_fit, merge, anomaly update and merge equal one fit of the union."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import chi2

from anomaly.commands import main
from anomaly.detector import GaussianDetector, merge, read_detector
from anomaly.errors import UserError
from anomaly.pooling import build_pooling
from anomaly.stats.moments import Moments, RunningMoments
from tests.conftest import DEFAULT_SWITCHES

SIZE = 32
LEVELS = (2, 4)


def write_images(folder: Path, count: int, seed: int, defect: bool = False) -> list[Path]:
    """``count`` smooth random 64 px images (with ``defect``, a white square covers a quarter)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        image = np.clip(rng.normal(120, 10, size=(SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
        if defect:
            image[8:40, 8:40] = 255
        paths.append(folder / f"{seed}_{i:03d}.png")
        Image.fromarray(image).save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, list[Path]]:
    root = tmp_path_factory.mktemp("learning")
    return {
        "a": write_images(root / "a", 10, 1),
        "b": write_images(root / "b", 8, 2),
        "test": write_images(root / "test", 3, 3) + write_images(root / "bad", 2, 4, defect=True),
    }


def detector(**kwargs) -> GaussianDetector:
    return GaussianDetector(levels=LEVELS, image_size=SIZE, batch_size=4, **kwargs)


def case_detector(case: str) -> GaussianDetector:
    """An unfitted detector of one of the :data:`CASES`."""
    options = dict(CASES[case])
    if "pooling" in options:
        options["pooling"] = build_pooling(options["pooling"], grid_size=2, **options.pop("fine", {}))
    return detector(**options)


def summary(m: Moments) -> list[torch.Tensor]:
    """Count, mean, centred scatter and centred fourth moment: independent of the shift and of order."""
    if not isinstance(m, Moments):  # a level modelled by several Gaussians (e.g. fine cells)
        return [part for value in vars(m).values() for part in summary(value)]
    if m.count.ndim:  # per-cell moments
        cells = [Moments(*(getattr(m, f)[k] for f in RunningMoments.FIELDS)) for k in range(m.count.shape[0])]
        return [torch.stack(parts) for parts in zip(*map(summary, cells), strict=True)]
    return [m.count, m.mean, m.scatter(), m.centred_quartic()]


def assert_same_detector(got: GaussianDetector, want: GaussianDetector, test: list[Path]) -> None:
    for ours, theirs in zip(got.model_.moments, want.model_.moments, strict=True):
        for a, b in zip(summary(ours.moments()), summary(theirs.moments()), strict=True):
            assert float(torch.linalg.norm(a - b) / torch.linalg.norm(b)) < 1e-10
    ours, theirs = got.score_columns(test), want.score_columns(test)
    for name in theirs:
        np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-6, err_msg=name)
    if got.model_.makes_maps:
        np.testing.assert_allclose(got.anomaly_maps(test), want.anomaly_maps(test), rtol=1e-6)
    assert got.model_.absorbed == want.model_.absorbed


CASES = {
    "global": {"pooling": "global"},
    "global npca": {"pooling": "global", "reduction": "npca"},
    "grid": {"pooling": "grid"},
    "grid pca": {"pooling": "grid", "reduction": "pca", "variance_threshold": 0.9},
    "cells": {"pooling": "cells"},
    "grid_maps": {"pooling": "grid_maps"},
    "grid_maps fine": {"pooling": "grid_maps", "fine": {"fine_levels": [2], "fine_grid_size": 4}},
    "grid_maps coarse fine": {  # level 4 global for the image score, its 2x2 cells in the map
        "pooling": "grid_maps",
        "fine": {"coarse_levels": [4], "fine_levels": [2, 4], "fine_grid_size": [4, 2]},
    },
    "tiled": {"pooling": "global", "tiles": "1x2", "fit_rule": "pad"},
    "recommended": {},  # the default pooling
}
FAST_CASES = ("global", "global npca", "cells", "grid_maps fine", "grid_maps coarse fine")


@pytest.fixture(scope="module")
def fitted(images):
    """``fitted(case, *parts)``: a copy of the detector of ``case`` fitted on those parts of ``images``
    (each fitted once per module; tests change their copy, never the shared fit)."""
    fits = {}

    def copy_of(case: str, *parts: str) -> GaussianDetector:
        if (case, parts) not in fits:
            fits[case, parts] = case_detector(case).fit([path for part in parts for path in images[part]])
        return copy.deepcopy(fits[case, parts])

    return copy_of


@pytest.mark.parametrize(
    "case", [c if c in FAST_CASES else pytest.param(c, marks=pytest.mark.slow) for c in CASES]
)
def test_update_and_merge_equal_one_fit_of_the_union(case: str, images, fitted):
    union = fitted(case, "a", "b")
    first, second = fitted(case, "a"), fitted(case, "b")
    merged = merge([first, second])
    updated = first.partial_fit(images["b"])
    assert_same_detector(updated, union, images["test"])
    assert_same_detector(merged, union, images["test"])


@pytest.mark.parametrize(
    "case", ["global", "global npca", "cells", "grid_maps fine", "grid_maps coarse fine"]
)
def test_a_saved_detector_keeps_all_it_needs_to_learn_more(case: str, images, fitted, tmp_path: Path):
    more = write_images(tmp_path / "c", 3, 5)
    loaded = GaussianDetector.load(fitted(case, "a").save(tmp_path / "a.safetensors"))
    assert_same_detector(
        loaded.partial_fit(images["b"] + more),
        case_detector(case).fit(images["a"] + images["b"] + more),
        images["test"],
    )


def test_partial_fit_on_an_unfitted_detector_fits_and_skips_what_it_absorbed(images):
    first = detector().partial_fit(images["a"])
    assert first.model_.samples == 10 and len(first.model_.absorbed) == 10
    with pytest.warns(UserWarning, match="3 of 4 sample"):
        first.partial_fit([*images["a"][:3], images["b"][0]])
    assert first.model_.samples == 11


def test_features_update_exactly_and_a_mismatched_merge_names_the_field():
    rng = np.random.default_rng(0)
    a, b, test = rng.normal(size=(40, 6)), rng.normal(size=(30, 6)) + 0.5, rng.normal(size=(9, 6))
    union = GaussianDetector(backbone=None).fit(np.vstack([a, b]))
    updated = GaussianDetector(backbone=None).fit(a).partial_fit(b)
    np.testing.assert_allclose(updated.decision_function(test), union.decision_function(test), rtol=1e-10)
    with pytest.raises(UserError, match=r"differ in reduction \(\['none', None\] vs \['npca', 0.99\]\)"):
        merge(
            [GaussianDetector(backbone=None).fit(a), GaussianDetector(backbone=None, reduction="npca").fit(b)]
        )
    with pytest.raises(UserError, match="share 40 image"):
        merge([GaussianDetector(backbone=None).fit(a), GaussianDetector(backbone=None).fit(a)])


def test_only_eq8s_threshold_follows_an_update_or_merge_other_thresholds_are_kept():
    """After partial_fit or merge, a threshold that is eq. (8)'s (χ² at ``fpr_``) follows the refitted
    dimension (a PCA's changes with the data); one set on held-out images (a training run's, with or
    without its ``fpr_``) or by hand is kept."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(60, 6)) * [10, 5, 0.1, 0.1, 0.1, 0.1]  # two directions hold the variance
    b = rng.normal(size=(60, 6)) * [0.1, 0.1, 10, 5, 3, 0.1]  # three others

    def eq8(detector: GaussianDetector) -> float:
        return float(np.sqrt(chi2.ppf(0.99, detector.model_.scorers[0].dim)))

    def fitted(fpr, threshold=None) -> GaussianDetector:
        detector = GaussianDetector(backbone=None, fpr=fpr, reduction="pca", variance_threshold=0.9).fit(a)
        if threshold is not None:
            detector.threshold_ = threshold
        return detector

    on_a = fitted(0.01)
    assert on_a.threshold_ == pytest.approx(eq8(on_a), rel=1e-12)
    dim_a = on_a.model_.scorers[0].dim
    updated = fitted(0.01).partial_fit(b)
    assert updated.model_.scorers[0].dim != dim_a
    assert updated.threshold_ == pytest.approx(eq8(updated), rel=1e-12)
    on_b = GaussianDetector(backbone=None, reduction="pca", variance_threshold=0.9).fit(b)
    merged = merge([fitted(0.01), on_b])
    assert merged.model_.scorers[0].dim != dim_a
    assert merged.threshold_ == pytest.approx(eq8(merged), rel=1e-12)
    for fpr in (None, 0.01):  # a run's held-out threshold (with or without its fpr), or one set by hand
        assert fitted(fpr, threshold=7.5).partial_fit(b).threshold_ == 7.5
        assert merge([fitted(fpr, threshold=7.5), on_b]).threshold_ == 7.5


# ------------------------------------------------------------------------------ the commands
@pytest.fixture(scope="module")
def saved(images, fitted, tmp_path_factory) -> Path:
    """A detector fitted on the ``a`` images, its threshold well above held-out good scores, saved."""
    on_a = fitted("recommended", "a")
    on_a.threshold_ = 3 * float(on_a.decision_function(images["test"][:3]).max())
    return on_a.save(tmp_path_factory.mktemp("saved") / "a.safetensors")


def run(*args: str) -> int:
    return main([str(a) for a in args])


def test_update_command_equals_a_fit_of_the_union(saved: Path, images, fitted, tmp_path: Path, capsys):
    before = saved.read_bytes()
    folder = images["b"][0].parent
    out = tmp_path / "new.safetensors"
    assert run("update", "--detector", saved, "--input", folder, "--out", out) == 0
    err = capsys.readouterr().err
    assert "flags none of the 8 new images" in err and "threshold kept at" in err
    assert saved.read_bytes() == before
    updated = GaussianDetector.load(out)
    assert_same_detector(updated, fitted("recommended", "a", "b"), images["test"])
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["learning"]["images"] == 18 and len(meta["learning"]["digests"]) == 18
    # a second update with the same images skips them all: nothing to absorb, nothing written
    again = tmp_path / "again.safetensors"
    assert run("update", "--detector", out, "--input", folder, "--out", again) == 2
    err = capsys.readouterr().err
    assert "no new image to absorb: all 8 were absorbed before" in err and not again.exists()


def test_update_reports_and_rejects_flagged_images(saved: Path, images, tmp_path: Path, capsys):
    new = tmp_path / "new"
    write_images(new, 4, 7)
    write_images(new, 1, 8, defect=True)
    (new / "copy_of_an_absorbed_image.png").write_bytes(images["a"][0].read_bytes())
    out = tmp_path / "kept.safetensors"
    assert run("update", "--detector", saved, "--input", new, "--out", out, "--reject-flagged") == 0
    err = capsys.readouterr().err
    assert "1 image(s) absorbed before (or repeated) skipped: copy_of_an_absorbed_image.png" in err
    assert re.search(r"flags 1 of 5 new images as anomalous .*8_000\.png .*left out", err)
    assert GaussianDetector.load(out).model_.samples == 10 + 4
    out = tmp_path / "all.safetensors"
    assert run("update", "--detector", saved, "--input", new, "--out", out) == 0
    assert "absorbed anyway" in capsys.readouterr().err
    assert GaussianDetector.load(out).model_.samples == 10 + 5


def test_update_recalibrates_on_held_out_images_only(saved: Path, images, tmp_path: Path, capsys):
    out = tmp_path / "new.safetensors"
    held_out = images["test"][0].parent
    args = ["update", "--detector", saved, "--input", images["b"][0].parent, "--out", out]
    assert run(*args, "--calibrate", held_out, "--fpr", "0.5") == 0
    updated = GaussianDetector.load(out)
    scores = updated.decision_function(sorted(held_out.iterdir()))
    assert updated.threshold_ == pytest.approx(float(np.sort(scores)[1]), rel=1e-9)
    peaks = updated.anomaly_maps(sorted(held_out.iterdir())).reshape(3, -1).max(axis=1)
    assert updated.model_.map_threshold == pytest.approx(float(np.sort(peaks)[1]), rel=1e-9)
    assert "recalibrated on 3 held-out images" in capsys.readouterr().err
    bad = tmp_path / "bad.safetensors"
    assert run("update", "--detector", saved, "--input", held_out, "--out", bad, "--calibrate", held_out) == 2
    assert "were fitted on" in capsys.readouterr().err and not bad.exists()


def jpegs(folder: Path, count: int, seed: int, masks: bool = False) -> Path:
    """``count`` JPEG images in ``folder``; with ``masks``, a black PNG mask beside each (X.png)."""
    for path in write_images(folder, count, seed):
        Image.open(path).save(path.with_suffix(".jpg"))
        if masks:
            Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(path)
        else:
            path.unlink()
    return folder


@pytest.mark.parametrize("option", ["--input", "--calibrate"])
def test_update_refuses_masks_beside_the_images_until_excluded(
    option: str, saved: Path, tmp_path: Path, capsys
):
    """Good images with their masks beside them (X.jpg, X.png): one line, nothing written, until
    ``--exclude '*.png'`` leaves the masks out."""
    given = {"--input": jpegs(tmp_path / "new", 4, 9), "--calibrate": jpegs(tmp_path / "held_out", 3, 10)}
    folder = given[option] = jpegs(tmp_path / "with_masks", 3, 11, masks=True)
    out = tmp_path / "new.safetensors"
    argv = ["update", "--detector", saved, "--out", out, *[arg for pair in given.items() for arg in pair]]
    assert run(*argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: '{folder}' holds 3 sets of images that differ only in their extension")
    assert "(e.g. 11_000.jpg, 11_000.png)" in err and "--exclude '*.png'" in err
    assert len(err.splitlines()) == 1
    assert not out.exists()
    assert run(*argv, "--exclude", "*.png") == 0 and out.exists()


def test_update_refuses_existing_or_input_outputs(saved: Path, images, tmp_path: Path, capsys):
    folder = images["b"][0].parent
    for out in (saved, saved.with_suffix(".json"), saved.parent):
        before = saved.read_bytes()
        assert run("update", "--detector", saved, "--input", folder, "--out", out) == 2
        assert saved.read_bytes() == before
        assert run("update", "--detector", saved, "--input", folder, "--out", out, "--overwrite") == 2
        assert saved.read_bytes() == before
    err = capsys.readouterr().err
    assert err.count("error:") == 6 and len(err.splitlines()) == 6
    other = tmp_path / "other.safetensors"
    other.write_bytes(b"a file of the user's")
    assert run("update", "--detector", saved, "--input", folder, "--out", other) == 2
    assert other.read_bytes() == b"a file of the user's" and "--overwrite" in capsys.readouterr().err
    assert run("update", "--detector", saved, "--input", folder, "--out", other, "--overwrite") == 0
    assert GaussianDetector.load(other).model_.samples > GaussianDetector.load(saved).model_.samples


def test_an_interrupted_update_leaves_the_detector_and_no_output(
    saved, images, tmp_path, monkeypatch, capsys
):
    import anomaly.detector.file as file

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(file, "save_file", interrupted)
    before = saved.read_bytes()
    out = tmp_path / "new.safetensors"
    assert run("update", "--detector", saved, "--input", images["b"][0].parent, "--out", out) == 130
    assert saved.read_bytes() == before and list(tmp_path.iterdir()) == []
    assert "interrupted" in capsys.readouterr().err


def test_merge_command_equals_a_fit_of_the_union_and_refuses_mismatches(
    saved, images, fitted, tmp_path, capsys
):
    b = fitted("recommended", "b").save(tmp_path / "b.safetensors")
    out = tmp_path / "merged.safetensors"
    assert run("merge", "--detectors", saved, b, "--out", out) == 0
    assert_same_detector(GaussianDetector.load(out), fitted("recommended", "a", "b"), images["test"])
    calibrated = fitted("recommended", "a").calibrate(images["test"][:3])  # a map threshold too
    first = calibrated.save(tmp_path / "a.safetensors")
    assert run("merge", "--detectors", first, b, "--out", tmp_path / "kept.safetensors") == 0
    kept = GaussianDetector.load(tmp_path / "kept.safetensors").model_
    first_maps = calibrated.model_.map_threshold, calibrated.model_.map_floor
    assert (kept.map_threshold, kept.map_floor) == first_maps and None not in first_maps  # as its threshold
    capsys.readouterr()
    other = (
        detector(pooling=build_pooling("grid", grid_size=2))
        .fit(images["b"])
        .save(tmp_path / "grid.safetensors")
    )
    refused = tmp_path / "refused.safetensors"
    assert run("merge", "--detectors", saved, other, "--out", refused) == 2
    err = capsys.readouterr().err
    assert "differ in level widths" in err and len(err.splitlines()) == 1 and not refused.exists()
    assert run("merge", "--detectors", saved, out, "--out", refused) == 2
    assert "share 10 image(s)" in capsys.readouterr().err and not refused.exists()


def test_a_file_without_moments_loads_and_says_it_cannot_be_updated(images, fitted, tmp_path: Path, capsys):
    on_a = fitted("recommended", "a")
    small = on_a.save(tmp_path / "small.safetensors", moments=False)
    full = on_a.save(tmp_path / "full.safetensors")
    assert small.stat().st_size < full.stat().st_size
    loaded = GaussianDetector.load(small)
    assert loaded.decision_function(images["test"]).shape == (5,)
    with pytest.raises(UserError, match="cannot be updated"):
        loaded.partial_fit(images["b"])
    out = tmp_path / "new.safetensors"
    assert run("update", "--detector", small, "--input", images["b"][0].parent, "--out", out) == 2
    assert "cannot be updated: it holds no streamed moments" in capsys.readouterr().err


# ------------------------------------------------------------------------- an edited file
def edit_metadata(path: Path, out: Path, edit) -> Path:
    """``path`` with its metadata edited by ``edit`` (the tensors' checksum kept valid)."""
    from safetensors.torch import save_file

    tensors, meta = read_detector(path)
    edit(meta)
    save_file(tensors, str(out), metadata={"detector": json.dumps(meta)})
    return out


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m.update(threshold=m["threshold"] * 2),
        lambda m: m.update(decision_score="l2/sum"),
        lambda m: m["preprocessing"].update(image_size=96),
        lambda m: m["preprocessing"].update(fit="pad"),
    ],
    ids=["threshold", "decision_score", "image_size", "fit"],
)
def test_edited_metadata_is_refused_with_one_line(edit, saved: Path, images, tmp_path: Path, capsys):
    edited = edit_metadata(saved, tmp_path / "edited.safetensors", edit)
    with pytest.raises(UserError, match="the metadata does not match its checksum"):
        GaussianDetector.load(edited)
    assert run("predict", "--detector", edited, "--input", images["b"][0].parent) == 2
    assert len(capsys.readouterr().err.splitlines()) == 1


def test_an_unknown_resize_rule_is_refused(saved: Path, tmp_path: Path):
    def nonsense(meta):
        meta["preprocessing"]["resize"] = "nonsense"

    with pytest.raises(UserError, match=r"'preprocessing\.resize' must be one of area, linear, cubic"):
        GaussianDetector.load(edit_metadata(saved, tmp_path / "r.safetensors", nonsense))


def test_an_edited_json_copy_is_refused_when_named(saved: Path, tmp_path: Path):
    import shutil

    folder = tmp_path / "run"
    folder.mkdir()
    shutil.copy(saved, folder / "detector.safetensors")
    copy = folder / "detector.json"
    meta = json.loads(saved.with_suffix(".json").read_text())
    copy.write_text(json.dumps(meta))
    assert GaussianDetector.load(copy).threshold_ == meta["threshold"]
    meta["threshold"] = 123.0
    copy.write_text(json.dumps(meta))
    with pytest.raises(
        UserError, match=r"detector\.json differs from the detector it copies .* in 'threshold'"
    ):
        GaussianDetector.load(copy)
    assert GaussianDetector.load(folder).threshold_ != 123.0  # the .safetensors alone is complete


# ------------------------------------------------------------------ training runs, augmented epochs
def fitted_run(root: Path, images: list[Path], out: Path, **model_options) -> Path:
    """A training run (2 augmented epochs, no held-out fold) on ``images``; its detector file."""
    import pytorch_lightning as pl

    from anomaly.data import MVTecDataModule
    from anomaly.detector.run import save_run_detector
    from anomaly.methods.gaussian import GaussianAD
    from anomaly.methods.run import fit

    folder = root / "widget" / "train" / "good"
    folder.mkdir(parents=True)
    for path in images:
        (folder / path.name).write_bytes(path.read_bytes())
    (root / "widget" / "test" / "good").mkdir(parents=True)  # the layout needs one, the fit reads none
    (root / "widget" / "test" / "good" / "000.png").write_bytes(images[0].read_bytes())
    data = MVTecDataModule(str(root), "widget", fold=None, batch_size=4, num_workers=0, image_size=SIZE,
                           augment=True, seed=3)  # fmt: skip
    model = GaussianAD("efficientnet-lite0", **model_options)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
                         use_distributed_sampler=False)  # fmt: skip
    with pytest.warns(UserWarning):  # widget has no augmentation switches of its own; no held-out images
        fit(trainer, model, data)
    return save_run_detector(model, SIZE, out, data.geometry, data)


@pytest.mark.slow
@DEFAULT_SWITCHES
@pytest.mark.parametrize(
    "options", [{"levels": [2, 4]}, {"levels": [2], "reduction": "npca"}], ids=["none", "npca"]
)
def test_an_augmented_run_updated_equals_the_run_of_the_union(options: dict, images, tmp_path: Path):
    """Every augmentation draw depends on (seed, the image's SHA-256, epoch) only: an update replays
    the run's augmented epochs for the new images exactly as one run of all the images drew them.
    (NPCA on level 2 only: 16 features and 20 samples; with fewer samples than features the kept
    components may cut the zero-variance eigenspace, and then no two fits agree.)"""
    a, b = images["a"][:6], images["b"][:4]
    run_a = fitted_run(tmp_path / "a", a, tmp_path / "run_a", **options)
    run_all = fitted_run(tmp_path / "all", a + b, tmp_path / "run_all", **options)
    meta = json.loads(run_a.with_suffix(".json").read_text())["learning"]
    assert (meta["images"], meta["samples"], meta["epochs"]) == (6, 12, 2) and meta["augmentation"][
        "seed"
    ] == 3
    updated = GaussianDetector.load(run_a)
    updated.batch_size = 4
    assert_same_detector(updated.partial_fit(b), GaussianDetector.load(run_all), images["test"])


# ------------------------------------------------------------------------------ real features
@pytest.mark.real_data
@pytest.mark.slow
@pytest.mark.parametrize("case", ["global", "global npca", "cells"])
def test_bottle_halves_update_and_merge_to_the_fit_of_all(case: str):
    from anomaly.data.images import list_images
    from tests.conftest import BOTTLE, require

    train = list_images(require(BOTTLE) / "train" / "good")[:60]
    test = list_images(BOTTLE / "test" / "good")[:4] + list_images(BOTTLE / "test" / "broken_large")[:4]
    options = dict(CASES[case])
    if "pooling" in options:
        options["pooling"] = build_pooling(options["pooling"], grid_size=2, **options.pop("fine", {}))

    def bottle_detector() -> GaussianDetector:
        return GaussianDetector(levels=(3, 5), image_size=128, batch_size=10, **options)

    half = len(train) // 2
    union = bottle_detector().fit(train)
    first, second = bottle_detector().fit(train[:half]), bottle_detector().fit(train[half:])
    assert_same_detector(merge([first, second]), union, test)
    assert_same_detector(first.partial_fit(train[half:]), union, test)
