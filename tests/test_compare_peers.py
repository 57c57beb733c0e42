"""benchmarks/compare_peers.py: its PatchCore glue, its per-process memory watch, its end-to-end table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.neighbors import NearestNeighbors
from torch.nn import functional as F

from tests.conftest import load_benchmark, make_mvtec_category

peers = load_benchmark("compare_peers")


def test_watch_reports_the_peak_rss_of_its_child():
    report = peers.watch([sys.executable, "-c", "b = b'x' * 300_000_000"], None, 60)
    assert report["returncode"] == 0 and report["stopped"] is None
    assert report["peak_rss_bytes"] >= 300_000_000


def test_watch_reports_the_cpu_time_of_its_child_not_its_waits():
    busy = (
        "import time\nend = time.process_time() + 0.5\nwhile time.process_time() < end: pass\ntime.sleep(1)"
    )
    report = peers.watch([sys.executable, "-c", busy], None, 60)
    assert report["returncode"] == 0
    assert 0.5 <= report["cpu_seconds"] < report["wall_seconds"] - 0.9


def test_watch_sees_its_child_end_within_a_fraction_of_its_memory_polls():
    """The wall time is the child's, not rounded up to the next second's reading of its memory."""
    report = peers.watch([sys.executable, "-c", "import time; time.sleep(1.3)"], None, 60)
    assert 1.3 <= report["wall_seconds"] < 1.3 + 0.5  # the interpreter's start, and one look for the end


def test_watch_writes_its_childs_output_to_the_log(tmp_path: Path):
    code = "import os, sys; print(os.getcwd()); print('to stderr', file=sys.stderr)"
    report = peers.watch([sys.executable, "-c", code], None, 60, log=tmp_path / "child.log", cwd=tmp_path)
    assert report["returncode"] == 0
    assert (tmp_path / "child.log").read_text().split() == [str(tmp_path), "to", "stderr"]


def test_watch_writes_the_log_whole_when_its_child_has_ended(tmp_path: Path):
    """The log replaces an earlier one only once the child has ended: never a part that looks complete."""
    log = tmp_path / "child.log"
    log.write_text("the earlier run\n")
    code = f"import pathlib; print(pathlib.Path({str(log)!r}).read_text().strip(), 'while running')"
    assert peers.watch([sys.executable, "-c", code], None, 60, log=log)["returncode"] == 0
    assert log.read_text() == "the earlier run while running\n"
    assert [p.name for p in tmp_path.iterdir()] == ["child.log"]  # no temporary left beside it


def test_watch_kills_a_child_above_the_memory_limit():
    grow = "import time\nb = b'x' * 300_000_000\nwhile True:\n    time.sleep(0.1)"
    report = peers.watch([sys.executable, "-c", grow], 0.1, 60)
    assert report["returncode"] == -9
    assert report["stopped"].startswith("killed at") and "limit 0.1 GB" in report["stopped"]
    assert report["group_peak_rss_bytes"] > 0.1 * peers.GB


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").is_file(), reason="needs Linux's smaps_rollup")
def test_group_memory_shares_a_forked_workers_pages_in_pss():
    """A parent and its forked child share 200 MB: the group's RSS counts it twice, its PSS once."""
    code = (
        "import os, sys\n"
        "block = bytearray(200_000_000)\n"  # zero-filled: every page is touched
        "os.fork()\n"
        "print('ready', flush=True)\n"
        "sys.stdin.read()\n"
    )
    pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE}
    with subprocess.Popen([sys.executable, "-c", code], start_new_session=True, **pipes) as child:
        assert child.stdout.readline() == child.stdout.readline() == b"ready\n"  # both processes are up
        rss, pss = peers.group_memory(child.pid)
        child.stdin.close()  # both read to its end and exit
    assert rss > 0.38 * peers.GB  # the block in each process
    assert 0.19 * peers.GB < pss < 0.3 * peers.GB  # the block once, with two interpreters


def synthetic_features(n: int) -> object:
    """Cached maps of PatchCore's two levels (4: 40 x 8 x 8, 6: 112 x 4 x 4), float16 as in the cache."""
    torch.manual_seed(0)
    maps = {4: torch.randn(n, 40, 8, 8).half(), 6: torch.randn(n, 112, 4, 4).half()}
    return peers.Features(paths=[str(i) for i in range(n)], pooled=[], grids={}, maps=maps)


def patch_embeddings(feats, rows) -> np.ndarray:
    """PatchCore's patch vectors computed here: 3x3 mean, level 6 upsampled to level 4, concatenated."""
    fine = F.avg_pool2d(feats.maps[4][rows].float(), 3, 1, 1)
    coarse = F.interpolate(F.avg_pool2d(feats.maps[6][rows].float(), 3, 1, 1), size=(8, 8), mode="bilinear")
    return torch.cat([fine, coarse], 1).permute(0, 2, 3, 1).reshape(-1, 152).numpy()


class Size:
    image_size = 32


def test_patchcore_keeps_every_training_patch_at_ratio_one_and_scores_by_nearest_neighbour():
    pytest.importorskip("anomalib")
    feats, train, test = synthetic_features(6), torch.arange(4), torch.arange(4, 6)
    method = peers.AnomalibPatchCore(Size(), ratio=1.0)
    method.fit(feats, train, torch.arange(0))
    bank, reference = method.model.memory_bank.numpy(), patch_embeddings(feats, train)
    assert bank.shape == reference.shape  # 4 images x 64 patches
    distance, _ = NearestNeighbors(n_neighbors=1).fit(bank).kneighbors(reference)
    assert distance.max() < 1e-4  # the same vectors, in coreset order
    seen, _ = method.score(feats, train)
    scores, maps = method.score(feats, test)
    # a training image's patches are in the bank: zero up to anomalib's float32 |x|^2 + |y|^2 - 2xy
    assert seen.abs().max() < 0.01 * scores.min()
    nearest, _ = NearestNeighbors(n_neighbors=1).fit(reference).kneighbors(patch_embeddings(feats, test))
    largest = torch.tensor(nearest.reshape(2, -1).max(axis=1), dtype=torch.float32)
    assert maps.shape == (2, 32, 32)
    assert (scores > 0).all() and (scores <= largest + 1e-4).all()  # PatchCore's weight is in (0, 1]


def test_patchcore_coreset_ratio_sets_the_memory_bank_size():
    pytest.importorskip("anomalib")
    feats = synthetic_features(4)
    method = peers.AnomalibPatchCore(Size(), ratio=0.1)
    method.fit(feats, torch.arange(4), torch.arange(0))
    assert method.name == "anomalib PatchCore 10%"
    assert method.model.memory_bank.shape == (25, 152)  # int(256 * 0.1)
    assert peers.saved_bytes(method.state()) > 25 * 152 * 4


def test_our_configs_end_to_end_with_costs(tmp_path: Path):
    """Shipped configs by name, on a tiny bottle: scores, maps where the pooling makes them, costs."""
    root = make_mvtec_category(tmp_path / "mvtec", category="bottle", n_train=10, n_good=3, n_bad=3)
    out = tmp_path / "out.json"
    code = peers.main(
        ["--mvtec", str(root), "--datasets", "bottle", "--folds", "0", "--configs", "paper",
         "spatial_fine", "recommended", "--methods", "ours: paper", "ours: spatial_fine",
         "ours: recommended", "--repeats", "1", "--speed-images", "2", "--pixel-size", "48",
         "--out", str(out)]
    )  # fmt: skip
    assert code == 0
    methods = json.loads(out.read_text())["results"][0]["methods"]
    assert list(methods) == ["ours: paper", "ours: spatial_fine", "ours: recommended"]
    assert 0 <= methods["ours: recommended"]["pixel_auroc"][0] <= 1  # its fine cells from the cache
    for entry in methods.values():
        assert 0 <= entry["image_auroc"][0] <= 1
        assert entry["fit_seconds"][0] > 0 and entry["images_per_second"] > 0
    assert methods["ours: paper"]["pixel_auroc"] is None
    assert 0 <= methods["ours: spatial_fine"]["pixel_auroc"][0] <= 1
    # 196 cells' Gaussians of levels 3-6 (34 MB) against one Gaussian per level, whose 8 training
    # images (fewer than each level's dimensions) it keeps with the low-rank precision (under 1 MB;
    # 14 MB as D x D matrices, level 9's 1280 dimensions)
    sizes = [methods[name]["model_bytes"] for name in ("ours: spatial_fine", "ours: paper")]
    assert sizes[0] > 10_000_000 > 10 * sizes[1]


def test_the_recommended_levels_come_from_the_feature_cache():
    """Every level of the recommended detector (level 6: global for the image score, 14x14 cells for
    the map) is served by the cache, pooled as the detector pools the level's feature map."""
    method = peers.config_method("recommended", extractor=None)
    method.model = method.make()
    assert all(method._cacheable(level) for level in method.model.levels)
    generator = torch.Generator().manual_seed(0)
    level_maps = {lv: torch.randn(3, 8, 14, 14, generator=generator) for lv in peers.MAP_LEVELS}
    pooled = [level_maps.get(lv, torch.randn(3, 8, 7, 7)).mean(dim=(2, 3)) for lv in range(1, 10)]
    feats = peers.Features(paths=["a", "b", "c"], pooled=pooled, grids={}, maps=level_maps)
    rows = torch.tensor([2, 0])
    pooling = method.model.pooling.for_level(6)
    want = pooling.rows_from(lambda k: F.adaptive_avg_pool2d(level_maps[6][rows], k))
    assert want.shape == (2, (1 + 14 * 14) * 8)
    torch.testing.assert_close(method._cached_rows(feats, 6, rows), want)


def test_bad_arguments_are_one_line_errors(capsys):
    assert peers.main(["--datasets", "bottle", "--mvtec", "x", "--isolate"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --isolate needs --cache: the methods' processes share its features"
    )
    assert peers.main(["--datasets", "bottle", "--mvtec", "x", "--methods", "anomalib SVM"]) == 2
    assert capsys.readouterr().err.startswith("error: no method ['anomalib SVM']: choose among")


def stub_the_work(monkeypatch) -> list[str]:
    """No backbone, no dataset: each dataset's result names its methods as stopped; returns what ran."""
    ran = []

    def run_dataset(name, args, methods, extractor):
        ran.append(name)
        return {"dataset": name, "methods": {m.name: {"stopped": "not run here"} for m in methods}}

    monkeypatch.setattr(peers, "build_backbone", lambda name: None)
    monkeypatch.setattr(peers, "run_dataset", run_dataset)
    return ran


def test_out_never_replaces_a_file_of_another_origin(tmp_path: Path, monkeypatch, capsys):
    """``--out`` is claimed before any work: a user's file is refused in one line and stays as it was;
    ``--overwrite`` replaces it."""
    ran = stub_the_work(monkeypatch)
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": true}\n')
    argv = ["--datasets", "bottle", "--mvtec", "x", "--configs", "paper", "--methods", "ours: paper"]
    assert peers.main([*argv, "--out", str(notes)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == (
        f"error: --out {notes} already exists and was not written by benchmarks/compare_peers.py: give "
        "another name, or --overwrite to replace it\n"
    )
    assert notes.read_text() == '{"mine": true}\n' and ran == []
    assert peers.main([*argv, "--out", str(notes), "--overwrite"]) == 0 and ran == ["bottle"]
    assert json.loads(notes.read_text())["results"][0]["methods"] == {
        "ours: paper": {"stopped": "not run here"}
    }


def test_a_rerun_replaces_its_own_results_but_never_an_input(tmp_path: Path, monkeypatch, capsys):
    stub_the_work(monkeypatch)
    out = tmp_path / "runs" / "compare.json"
    argv = ["--datasets", "bottle", "--mvtec", "x", "--out", str(out)]
    for configs in (["paper"], ["paper", "recommended"]):
        methods = [f"ours: {config}" for config in configs]
        assert peers.main([*argv, "--configs", *configs, "--methods", *methods]) == 0
    written = json.loads(out.read_text())
    assert (
        written["written_by"] == "benchmarks/compare_peers.py" and "| ours: recommended |" in written["table"]
    )
    assert list(written["results"][0]["methods"]) == ["ours: paper", "ours: recommended"]
    assert [p.name for p in out.parent.iterdir()] == ["compare.json"]
    config = tmp_path / "candidate.yaml"
    config.write_text("model:\n  class_path: anomaly.methods.gaussian.GaussianAD\n")
    code = peers.main(["--datasets", "bottle", "--mvtec", "x", "--configs", str(config), "--out", str(config),
                       "--overwrite"])  # fmt: skip
    assert code == 2 and "is an input of benchmarks/compare_peers.py" in capsys.readouterr().err
    assert config.read_text().startswith("model:")
