"""Distributed fitting and testing: ``strategy=ddp`` on two CPU processes (gloo) equals one process.

Runs ``train.py`` through Lightning's own launcher, once with ``devices=1`` and once
with ``devices=2``, on a tiny generated category with an odd number of training and
test images (a padding sampler would count one image twice).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from anomaly.data import MVTecDataModule
from anomaly.errors import UserError
from anomaly.methods.distributed import StatisticsDDPStrategy, resolve_strategy, statistics_replacement
from anomaly.stats.low_rank import LowRankPrecision
from anomaly.stats.scorer import LOW_RANK_BUFFERS
from tests.conftest import make_mvtec_category

REPO = Path(__file__).resolve().parents[2]
N_TRAIN, N_GOOD, N_BAD = 11, 4, 3


class SaveFittedStatistics(pl.Callback):
    """Writes each process's fitted statistics (scorer buffers and merged moments) after fit."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        state = {
            k: v.detach().cpu()
            for k, v in pl_module.state_dict().items()
            if k.startswith(("detector.scorers.", "detector.moments."))
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        torch.save(state, self.folder / f"rank{trainer.global_rank}_of{trainer.world_size}.pt")


def run_train(root: Path, out: Path, devices: int, cache: Path | None = None) -> dict:
    config = out / "config.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(
        "trainer:\n  callbacks:\n"
        "    - class_path: tests.methods.test_ddp.SaveFittedStatistics\n"
        f"      init_args:\n        folder: {out / 'stats'}\n"
    )
    args = [
        sys.executable, "train.py", "--config", "paper", "--config", str(config),
        "--data.root", str(root), "--data.category", "widget", "--data.fold", "null",
        "--data.batch_size", "2", "--data.num_workers", "0",
        "--trainer.accelerator", "cpu", "--trainer.devices", str(devices), "--trainer.strategy", "ddp",
        "--trainer.default_root_dir", str(out / "runs"), "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    if cache is not None:
        args += ["--data.feature_cache", str(cache)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (results_file,) = (out / "runs").rglob("results.json")
    results = json.loads(results_file.read_text())
    with open(results_file.parent / "scores.csv", newline="") as handle:
        results["rows"] = list(csv.DictReader(handle))
    return results


def assert_same_statistics(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rtol: float = 1e-9
) -> None:
    assert a.keys() == b.keys()
    for key in a:
        x, y = a[key].double(), b[key].double()
        if y.numel() == 0:  # an unreduced level's projection: (D, 0), the identity
            assert x.shape == y.shape, key
            continue
        scale = max(float(y.abs().max()), 1e-300)
        assert float((x - y).abs().max()) <= rtol * scale, key


def precisions_as_matrices(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Scorer states with every low-rank precision as its matrix: the basis of the training rows' span
    is unique only up to the signs and order of its vectors, the precision is unique."""
    state = dict(state)
    for key in [k for k in state if k.endswith(".basis") and state[k].numel()]:
        prefix = key[: -len("basis")]
        form = LowRankPrecision(*(state.pop(prefix + name) for name in LOW_RANK_BUFFERS))
        state[prefix + "precision"] = form.dense()
    return state


@pytest.fixture(scope="module")
def single_and_ddp(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, Path, dict]:
    base = tmp_path_factory.mktemp("ddp")
    root = make_mvtec_category(base / "mvtec", n_train=N_TRAIN, n_good=N_GOOD, n_bad=N_BAD)
    one, two = base / "one", base / "two"
    return one, run_train(root, one, devices=1), two, run_train(root, two, devices=2)


@pytest.mark.slow
def test_ddp_fit_equals_single_process_fit(single_and_ddp):
    one, _, two, _ = single_and_ddp
    reference = torch.load(one / "stats" / "rank0_of1.pt")
    ranks = [torch.load(two / "stats" / f"rank{r}_of2.pt") for r in range(2)]
    for state in ranks:  # every process holds the merged statistics
        assert float(state["detector.moments.0.count"]) == N_TRAIN  # each image once: no padding
        fitted = {k: v for k, v in state.items() if k.startswith("detector.scorers.")}
        expected = {k: v for k, v in reference.items() if k.startswith("detector.scorers.")}
        assert_same_statistics(precisions_as_matrices(fitted), precisions_as_matrices(expected))


@pytest.mark.slow
def test_ddp_scores_every_test_image_once_and_auroc_over_all_ranks(single_and_ddp):
    _, single, _, ddp = single_and_ddp
    n_test = N_GOOD + N_BAD
    assert ddp["n_test"] == single["n_test"] == n_test
    assert ddp["n_train"] == N_TRAIN and ddp["n_fit_vectors"] == N_TRAIN
    paths = [row["path"] for row in ddp["rows"]]
    assert len(paths) == len(set(paths)) == n_test
    assert paths == [row["path"] for row in single["rows"]]
    labels = [int(row["label"]) for row in ddp["rows"]]
    summed = [float(row["mahalanobis_sum"]) for row in ddp["rows"]]
    assert ddp["image_auroc"] == pytest.approx(roc_auc_score(labels, summed), abs=1e-12)
    assert ddp["image_auroc"] == pytest.approx(single["image_auroc"], abs=1e-12)
    for row_ddp, row_single in zip(ddp["rows"], single["rows"], strict=True):
        for column in row_single:
            if column.startswith(("mahalanobis_", "l2_", "sed_")):
                assert float(row_ddp[column]) == pytest.approx(float(row_single[column]), rel=1e-6)


def test_lightning_distributed_sampler_with_several_devices_is_a_user_error(tiny_mvtec):
    dm = MVTecDataModule(str(tiny_mvtec), "widget", num_workers=0)
    connector = SimpleNamespace(use_distributed_sampler=True)
    dm.trainer = SimpleNamespace(world_size=2, _accelerator_connector=connector)
    with pytest.raises(UserError, match="use_distributed_sampler must be false"):
        dm.setup("fit")
    connector.use_distributed_sampler = False
    dm.setup("fit")


def test_ddp_strategy_names_map_to_the_statistics_strategy_for_models_without_gradients():
    frozen = nn.Linear(2, 2).requires_grad_(False)
    strategy = resolve_strategy("ddp", frozen)
    assert isinstance(strategy, StatisticsDDPStrategy) and strategy._start_method == "popen"
    assert resolve_strategy("ddp_spawn", frozen)._start_method == "spawn"
    assert resolve_strategy("ddp", nn.Linear(2, 2)) == "ddp"  # trainable: Lightning's own DDP
    assert resolve_strategy("auto", frozen) == "auto"


def test_auto_strategy_with_several_devices_gets_the_statistics_strategy(tmp_path):
    """``devices: 2`` alone makes Lightning choose its DDP, which refuses a model with nothing to train."""
    frozen = nn.Linear(2, 2).requires_grad_(False)
    chosen = pl.Trainer(accelerator="cpu", devices=2, logger=False, default_root_dir=tmp_path).strategy
    replacement = statistics_replacement(chosen, frozen)
    assert isinstance(replacement, StatisticsDDPStrategy)
    assert replacement._start_method == chosen._start_method
    assert statistics_replacement(chosen, nn.Linear(2, 2)) is None  # trainable: Lightning's own DDP
    single = pl.Trainer(accelerator="cpu", devices=1, logger=False, default_root_dir=tmp_path).strategy
    assert statistics_replacement(single, frozen) is None


@pytest.mark.slow
def test_ddp_with_feature_cache_extracts_each_image_once_and_scores_alike(single_and_ddp, tmp_path):
    one, single, _, _ = single_and_ddp
    root = one.parent / "mvtec"
    cache = tmp_path / "cache"
    cached = run_train(root, tmp_path / "two_cached", devices=2, cache=cache)
    assert len(list(cache.rglob("*.feat"))) == N_TRAIN + N_GOOD + N_BAD  # shared out between the ranks
    assert cached["n_fit_vectors"] == N_TRAIN and cached["n_test"] == N_GOOD + N_BAD
    assert cached["image_auroc"] == pytest.approx(single["image_auroc"], abs=1e-12)
    assert [row["path"] for row in cached["rows"]] == [row["path"] for row in single["rows"]]
    for row_cached, row_single in zip(cached["rows"], single["rows"], strict=True):
        assert float(row_cached["mahalanobis_sum"]) == pytest.approx(
            float(row_single["mahalanobis_sum"]), rel=1e-5
        )
