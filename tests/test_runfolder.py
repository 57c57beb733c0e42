"""The run-folder lock, the data-root check, and how a failed run leaves its folders."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from anomaly.errors import UserError
from anomaly.runfolder import (
    LOCK_FILE,
    PREVIOUS_RUN,
    RunLock,
    check_folder_names,
    check_same_dataset,
    hold_run_folder,
    replacing_outputs,
)


def test_a_second_run_into_a_locked_folder_is_refused(tmp_path: Path):
    """Bug 12: two runs into one folder mixed their config, hparams, events and results."""
    first = RunLock.acquire(tmp_path / "run")
    with pytest.raises(UserError, match=rf"run folder .* is in use by another run \(process {os.getpid()}\)"):
        RunLock.acquire(tmp_path / "run")
    first.release()
    assert not (tmp_path / "run" / LOCK_FILE).exists()
    RunLock.acquire(tmp_path / "run").release()  # free again


def test_the_lock_of_a_killed_run_is_taken_over(tmp_path: Path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = (
        "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
        "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'%d' % os.getpid()); print('locked', flush=True); "
        "time.sleep(60)"
    )
    with subprocess.Popen(
        [sys.executable, "-c", holder, str(run_dir / LOCK_FILE)], stdout=subprocess.PIPE, text=True
    ) as process:
        assert process.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=f"process {process.pid}"):
            RunLock.acquire(run_dir)
        process.send_signal(signal.SIGKILL)  # no clean-up: the file stays, the lock goes with the process
    assert (run_dir / LOCK_FILE).exists()
    lock = RunLock.acquire(run_dir)
    assert (run_dir / LOCK_FILE).read_text().strip() == str(os.getpid())
    lock.release()


def test_results_of_another_data_root_are_not_replaced(tmp_path: Path):
    """Minor 5: a run on another root with the same category deleted the first dataset's results."""
    (tmp_path / "results.json").write_text(json.dumps({"dataset": "/data/a"}))
    check_same_dataset(tmp_path, "/data/a")
    with pytest.raises(UserError, match="holds the results of data root /data/a, not /data/b"):
        check_same_dataset(tmp_path, "/data/b")


def test_names_longer_than_the_file_system_allows_are_refused(tmp_path: Path):
    """Bug 5: a 300-character category became an OSError traceback and empty run folders."""
    check_folder_names(tmp_path / ("x" * 255), "the category")
    with pytest.raises(
        UserError, match="is 256 bytes, over the file system's limit of 255: shorten the category"
    ):
        check_folder_names(tmp_path / ("x" * 256) / "fold_0", "the category")


def test_a_failed_run_removes_the_folders_it_created_and_no_others(tmp_path: Path):
    root = tmp_path / "runs"
    (root / "other").mkdir(parents=True)
    run_dir = root / "gaussian" / "name" / "widget" / "fold_0"
    with pytest.raises(RuntimeError), hold_run_folder(run_dir, root, "/data"):
        assert (run_dir / LOCK_FILE).is_file()
        raise RuntimeError
    assert sorted(p.name for p in root.iterdir()) == ["other"]
    fresh = tmp_path / "fresh_runs"
    with pytest.raises(RuntimeError), hold_run_folder(fresh / "a" / "fold_0", fresh, "/data"):
        raise RuntimeError
    assert not fresh.exists()  # the run created its root folder: nothing is left
    with hold_run_folder(run_dir, root, "/data"):
        (run_dir / "results.json").write_text("{}")
    assert sorted(p.name for p in run_dir.iterdir()) == ["results.json"]


def outputs_of(run_dir: Path) -> list[Path]:
    return [path for path in (run_dir / "detector.safetensors", run_dir / "results.json") if path.exists()]


@pytest.mark.parametrize("stop", [RuntimeError("fit failed"), KeyboardInterrupt()], ids=["failure", "ctrl-c"])
def test_a_failed_rerun_keeps_the_earlier_run(tmp_path: Path, stop: BaseException):
    """An earlier run's detector and results stay until the rerun succeeds (the rerun deleted them first)."""
    run_dir = tmp_path / "fold_0"
    run_dir.mkdir()
    (run_dir / "detector.safetensors").write_text("earlier detector")
    (run_dir / "results.json").write_text("earlier results")
    with pytest.raises(type(stop)), replacing_outputs(run_dir, outputs_of):
        assert not (run_dir / "detector.safetensors").exists()  # the new run starts from a clean folder
        (run_dir / "results.json").write_text("half of a new run")
        raise stop
    assert (run_dir / "detector.safetensors").read_text() == "earlier detector"
    assert (run_dir / "results.json").read_text() == "earlier results"
    assert sorted(p.name for p in run_dir.iterdir()) == ["detector.safetensors", "results.json"]
    with replacing_outputs(run_dir, outputs_of):
        (run_dir / "results.json").write_text("new results")
    assert sorted(p.name for p in run_dir.iterdir()) == ["results.json"]  # the earlier detector went


def test_the_earlier_run_kept_by_a_killed_rerun_comes_back(tmp_path: Path):
    run_dir = tmp_path / "fold_0"
    (run_dir / PREVIOUS_RUN).mkdir(parents=True)
    (run_dir / PREVIOUS_RUN / "detector.safetensors").write_text("earlier detector")
    (run_dir / "results.json").write_text("half of a killed run")
    with pytest.raises(RuntimeError), replacing_outputs(run_dir, outputs_of):
        raise RuntimeError
    assert sorted(p.name for p in run_dir.iterdir()) == ["detector.safetensors"]
