"""Sharded sweeps (--shard K/N), several runs at once on several GPUs (--devices), merged evaluation."""

from __future__ import annotations

import hashlib
import itertools
import json
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

import anomaly.cli
from anomaly.errors import UserError
from anomaly.evaluation.evaluate import main as evaluate
from anomaly.experiments import runner
from anomaly.experiments.cells import RunIndex, job_text
from anomaly.experiments.cli import main as reproduce
from anomaly.experiments.grids import TABLES
from anomaly.experiments.runner import grid_cells, log_path, run_grid, worker_launcher
from anomaly.experiments.sharding import Shard, device_ids, run_on_devices
from anomaly.experiments.worker import run_job
from tests.conftest import make_mvtec_category
from tests.evaluation.fake_runs import fake_results

LITE = ["--backbone", "efficientnet-lite0"]


def option_values(args: list[str]) -> dict[str, str]:
    """The last value of each ``--name value`` option (a config file's path included)."""
    values = {}
    for name, value in itertools.pairwise(args):
        if name.startswith("--"):
            values[name] = value
    return values


def setting_of(args: list[str]) -> str:
    """The cell's own arguments (before the data root), as a short name."""
    own = args[: args.index("--data.root")]
    return hashlib.sha1(" ".join(own).encode()).hexdigest()[:8]


def fake_fit(calls: list):
    """Stands in for anomaly.cli.fit_and_test: a run directory per (setting, category, fold)."""

    def fit_and_test(args: list[str]) -> dict:
        option = option_values(args)
        calls.append((setting_of(args), option["--data.category"], int(option["--data.fold"])))
        setting = setting_of(args)
        run_dir = Path(option["--trainer.default_root_dir"]) / "gaussian" / f"lite0_{setting}"
        run_dir = run_dir / option["--data.category"] / f"fold_{option['--data.fold']}"
        run_dir.mkdir(parents=True, exist_ok=True)
        fold = int(option["--data.fold"])
        auroc = 0.8 + 0.01 * fold + 0.05 * (option["--data.category"] == "gadget")
        results = fake_results(option["--data.category"], fold, auroc, settings={"setting": setting})
        (run_dir / "results.json").write_text(json.dumps(results))
        return {**results, "run_dir": str(run_dir)}

    return fit_and_test


@pytest.fixture
def two_categories(tmp_path: Path) -> Path:
    root = tmp_path / "mvtec"
    make_mvtec_category(root, "widget", n_train=6, n_good=2, n_bad=2, size=16)
    make_mvtec_category(root, "gadget", n_train=6, n_good=2, n_bad=2, size=16)
    return root


def result_files(runs: Path) -> set[str]:
    return {str(p.relative_to(runs)) for p in runs.rglob("results.json")}


def test_shard_syntax_and_partition():
    assert Shard.parse("3/8") == Shard(3, 8) and str(Shard.parse(" 0 / 1 ")) == "0/1"
    for text in ("8/8", "-1/4", "1/0", "2", "a/b", "1/2/3"):
        with pytest.raises(UserError, match="--shard"):
            Shard.parse(text)
    cells = list(range(23))
    parts = [Shard(k, 4).select(cells) for k in range(4)]
    assert sorted(c for part in parts for c in part) == cells  # every cell in exactly one shard
    assert [len(part) for part in parts] == [6, 6, 6, 5]  # balanced
    assert parts[1] == [1, 5, 9, 13, 17, 21]  # cell i goes to shard i mod N


def test_grid_order_is_canonical_whatever_the_order_given():
    spec = TABLES["table3"]
    assert grid_cells(spec, ["b", "a"], [1, 0]) == grid_cells(spec, ["a", "b"], [0, 1])


def test_two_shards_make_exactly_the_runs_of_one_sweep(two_categories, tmp_path, capsys, monkeypatch):
    calls: list = []
    monkeypatch.setattr(anomaly.cli, "fit_and_test", fake_fit(calls))
    base = ["table3", "--data.root", str(two_categories), "--folds", "0", "1", "2", *LITE]
    whole, sharded = tmp_path / "whole", tmp_path / "sharded"
    assert reproduce([*base, "--runs-dir", str(whole)]) == 0
    unsharded_calls = list(calls)
    assert len(unsharded_calls) == len(set(unsharded_calls)) == 6 * 2 * 3
    capsys.readouterr()

    calls.clear()
    assert reproduce([*base, "--runs-dir", str(sharded), "--shard", "1/2"]) == 0
    shard1 = list(calls)
    out, err = capsys.readouterr()
    assert "shard 1/2 is complete" in err and out == ""  # a shard prints no partial table
    assert reproduce([*base, "--runs-dir", str(sharded), "--shard", "1/2"]) == 0  # resumed: nothing to do
    assert calls == shard1
    assert reproduce([*base, "--runs-dir", str(sharded), "--shard", "0/2", "--dry-run"]) == 0
    assert capsys.readouterr().out.startswith("shard 0/2 of table3: 18 runs, 0 done, 18 to run")
    assert reproduce([*base, "--runs-dir", str(sharded), "--shard", "0/2"]) == 0
    shard0 = calls[len(shard1) :]
    assert not set(shard0) & set(shard1) and len(shard0) == len(shard1) == 18
    assert sorted(shard0 + shard1) == sorted(unsharded_calls)
    assert result_files(sharded) == result_files(whole)
    capsys.readouterr()

    # the unsharded command on the shards' shared runs folder finds every run done and prints the table
    assert reproduce([*base, "--runs-dir", str(whole)]) == 0
    table_whole = capsys.readouterr().out
    assert reproduce([*base, "--runs-dir", str(sharded)]) == 0
    out, err = capsys.readouterr()
    assert "0 runs done now, 36 finished before" in err and out == table_whole
    assert len(calls) == 36


def test_evaluate_merges_runs_folders(two_categories, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(anomaly.cli, "fit_and_test", fake_fit([]))
    base = ["table1", "--data.root", str(two_categories), "--folds", "0", "1", *LITE]
    assert reproduce([*base, "--runs-dir", str(tmp_path / "whole")]) == 0
    for k in range(3):  # one runs folder per shard, as on machines without a shared disk
        assert reproduce([*base, "--runs-dir", str(tmp_path / f"shard{k}"), "--shard", f"{k}/3"]) == 0
    capsys.readouterr()
    assert evaluate([str(tmp_path / "whole")]) == 0
    whole = capsys.readouterr().out
    assert "| sum | 83.0 ± 2.5 |" in whole  # per-category means 80.5 and 85.5
    assert evaluate([str(tmp_path / "shard*")]) == 0  # a glob
    merged, err = capsys.readouterr()
    assert merged == whole and err == ""
    shards = [str(tmp_path / f"shard{k}") for k in range(3)]
    assert evaluate([*shards, shards[0], str(tmp_path / "shard1" / "gaussian")]) == 0  # repeats, nested
    assert capsys.readouterr() == (whole, "")

    # a cell present in two folders counts once: the most recently written results.json
    copy = tmp_path / "rerun" / "gaussian"
    original = next(tmp_path.glob("shard*/gaussian/*/widget/fold_0/results.json"))
    rerun = copy / original.relative_to(original.parents[4] / "gaussian")
    rerun.parent.mkdir(parents=True)
    results = json.loads(original.read_text())
    rerun.write_text(json.dumps({**results, "image_auroc": 0.5}))
    assert evaluate([*shards, str(tmp_path / "rerun")]) == 0
    out, err = capsys.readouterr()
    assert f"widget fold 0: 2 runs, using {rerun} (not {original})" in err
    assert out != whole
    assert evaluate([str(tmp_path / "nothing*")]) == 2
    assert "no runs folder matches" in capsys.readouterr().err


def test_device_ids():
    assert device_ids("3", {}) == ["0", "1", "2"]
    assert device_ids("2", {"CUDA_VISIBLE_DEVICES": "4,6,7"}) == ["4", "6"]  # e.g. SLURM's GPUs
    assert device_ids("0,2, 5", {}) == ["0", "2", "5"]
    for bad in ("0", "1,1", "1,,2"):
        with pytest.raises(UserError, match="--devices"):
            device_ids(bad, {})
    with pytest.raises(UserError, match="only 3 GPUs are visible"):
        device_ids("4", {"CUDA_VISIBLE_DEVICES": "0,1,2"})


class FakeDevices:
    """A launcher that records which device ran which cell and how many ran at once.

    The first ``together`` runs wait for each other before they finish, so that that many devices
    are busy at once however the threads are scheduled.
    """

    def __init__(self, index: RunIndex, fail: set = frozenset(), together: int = 1) -> None:
        self.index, self.fail = index, fail
        self.lock = threading.Lock()
        self.first = threading.Barrier(together, timeout=60)
        self.busy: set[str] = set()
        self.ran: list[tuple] = []
        self.most_at_once = self.started = 0

    def __call__(self, cell, device: str) -> int:
        with self.lock:
            assert device not in self.busy, "two runs on one device"
            self.busy.add(device)
            self.most_at_once = max(self.most_at_once, len(self.busy))
            self.started += 1
            waits = self.started <= self.first.parties
        if waits:
            self.first.wait()
        run_dir = self.index.folder.parent / f"{cell.category}_{cell.fold}_{abs(hash(cell.args))}"
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "results.json").write_text(json.dumps(fake_results(cell.category, cell.fold, 0.9)))
        failed = (cell.category, cell.fold) in self.fail
        if not failed:
            self.index.store(cell, str(run_dir))
        with self.lock:
            self.busy.remove(device)
            self.ran.append((cell, device))
        return 1 if failed else 0


def test_devices_run_one_cell_per_gpu_at_a_time(tmp_path: Path):
    cells = grid_cells(TABLES["table3"], ["gadget", "widget"], [0, 1, 2])
    index = RunIndex(tmp_path, tmp_path)
    launch = FakeDevices(index, together=3)
    assert run_grid(cells, tmp_path, tmp_path, devices=["0", "1", "3"], launch=launch) == (36, 0)
    ran = [c for c, _ in launch.ran]
    assert len(ran) == len(set(ran)) == len(cells) and set(ran) == set(cells)  # each cell once
    assert launch.most_at_once == 3 and {d for _, d in launch.ran} == {"0", "1", "3"}
    assert all(index.record(c) is not None for c in cells)
    assert run_grid(cells, tmp_path, tmp_path, devices=["0"], launch=launch) == (0, 36)  # resumable

    other = RunIndex(tmp_path / "other", tmp_path)
    failing = FakeDevices(other, fail={("widget", 1)})
    with pytest.raises(UserError, match="6 of 36 runs failed \\(the others are kept\\)"):
        run_grid(cells, tmp_path, tmp_path / "other", devices=["0", "1"], launch=failing)
    assert sum(other.record(c) is None for c in cells) == 6  # widget fold 1 of each of the 6 settings
    assert len(failing.ran) == 36


def test_run_on_devices_yields_each_item_as_it_finishes():
    finished = dict(run_on_devices(range(5), ["a", "b"], lambda item, device: item * 10))
    assert finished == {0: 0, 1: 10, 2: 20, 3: 30, 4: 40}


def test_worker_records_its_cell(tiny_mvtec: Path, tmp_path: Path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(anomaly.cli, "fit_and_test", fake_fit(calls))
    (cell,) = grid_cells(TABLES["table1"].with_backbones(["efficientnet-lite0"]), ["widget"], [0])
    index = RunIndex(tmp_path, tiny_mvtec, ["--data.num_workers", "0"])
    command = cell.command(tiny_mvtec, tmp_path, index.extra)
    assert run_job(job_text(cell, command, index)) == 0
    assert len(calls) == 1 and index.record(cell).category == "widget"


def test_a_workers_log_replaces_an_earlier_one_when_the_worker_has_ended(
    tiny_mvtec: Path, tmp_path: Path, monkeypatch
):
    """While a cell runs again its earlier log stays whole; the new one replaces it at the end."""
    (cell,) = grid_cells(TABLES["table1"].with_backbones(["efficientnet-lite0"]), ["widget"], [0])
    index = RunIndex(tmp_path, tiny_mvtec, [])
    log = log_path(index, cell)
    log.parent.mkdir(parents=True)
    log.write_text("the earlier attempt\n")

    def worker(argv, env, stdout, stderr, check):
        stdout.write(f"run on device {env['CUDA_VISIBLE_DEVICES']}; the log reads: {log.read_text()}")
        return SimpleNamespace(returncode=0)

    monkeypatch.setattr(runner.subprocess, "run", worker)
    assert worker_launcher(index, tiny_mvtec, tmp_path, [], None)(cell, "1") == 0
    assert log.read_text() == "run on device 1; the log reads: the earlier attempt\n"
    assert [p.name for p in log.parent.iterdir()] == [log.name]


@pytest.mark.slow
def test_real_workers_on_devices(tiny_mvtec: Path, tmp_path: Path, capsys):
    """--devices runs each cell in a worker process that sees one device, and records it for resuming."""
    args = ["table1", "--data.root", str(tiny_mvtec), "--folds", "0", "1", "--runs-dir", str(tmp_path), *LITE,
            "--devices", "0,1", "--no-figures", "--", "--data.num_workers", "0", "--data.batch_size", "8",
            "--trainer.accelerator", "cpu"]  # fmt: skip
    assert reproduce(args) == 0
    out, err = capsys.readouterr()
    assert "table1: 2 runs done now" in err and "| sum |" in out
    logs = sorted((tmp_path / ".experiments" / "logs").glob("*.log"))
    assert len(logs) == 2 and all("image AUROC" in log.read_text() for log in logs)
    assert len(list(tmp_path.rglob("results.json"))) == 2
    assert reproduce(args) == 0 and "0 runs done now, 2 finished before" in capsys.readouterr().err
