"""The `anomaly` command: subcommands, one flag style, shipped configs, and fits on normal images only."""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from anomaly.commands import (
    ALLOCATOR_SETTINGS,
    BROKEN_PIPE_EXIT,
    SUBCOMMANDS,
    main,
    one_flag_style,
    reuse_freed_memory,
)
from anomaly.configs import CONFIG_DIR, resolve_config, resolve_config_args
from anomaly.errors import ArgumentsError
from tests.conftest import DEFAULT_SWITCHES, FEW_HELD_OUT

pytestmark = [FEW_HELD_OUT, DEFAULT_SWITCHES]

# the paper's detector (the tests below read its run folders), small and quick; no figures
FAST = ["--config", "paper", "--data.num_workers", "0", "--data.batch_size", "8", "--model.levels", "[3, 5]",
        "--trainer.enable_progress_bar", "false", "--figures", "false"]  # fmt: skip


def test_both_word_separators_reach_each_parser():
    assert one_flag_style(["--batch_size", "8", "--no_progress", "--input=a_b.png"], "-") == [
        "--batch-size", "8", "--no-progress", "--input=a_b.png",
    ]  # fmt: skip
    fit_args = ["--data.num-workers", "0", "--print-config", "--", "--keep-me"]
    assert one_flag_style(fit_args, "_") == ["--data.num_workers", "0", "--print_config", "--", "--keep-me"]


def test_overview_and_unknown_subcommand(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in SUBCOMMANDS)
    assert main(["trian"]) == 2
    assert "unknown subcommand 'trian'" in capsys.readouterr().err


def test_a_closed_pipe_ends_the_output_quietly(tmp_path: Path):
    """``anomaly configs | head -1``: the reader has left; no traceback, and the shell's SIGPIPE status."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first line is written
    env = {**os.environ, "PYTHONPATH": str(Path.cwd())}
    command = [sys.executable, "-m", "anomaly", "configs"]
    run = subprocess.run(command, stdout=write_end, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env)
    os.close(write_end)
    assert run.stderr == ""
    assert run.returncode == BROKEN_PIPE_EXIT


def python_exit(tmp_path: Path, code: str, **streams) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter that imports this checkout; its output buffered, as for a pipe."""
    env = {**os.environ, "PYTHONPATH": str(Path.cwd())}
    env.pop("PYTHONUNBUFFERED", None)
    return subprocess.run([sys.executable, "-c", code], text=True, cwd=tmp_path, env=env, **streams)


def test_the_command_ends_after_pythons_exit_work_without_the_teardown(tmp_path: Path):
    """Threads joined, then ``atexit`` handlers, then the buffered output, and main's exit code; the
    interpreter is not torn down (its modules' objects are not finalised)."""
    code = """
import atexit, os, threading, time
from anomaly.commands import exit_without_teardown
class Finalised:
    def __del__(self):
        os.write(1, b" finalised")
kept = Finalised()
atexit.register(print, "atexit handler")
threading.Thread(target=lambda: (time.sleep(0.3), print("thread done"))).start()
print("unflushed output ", end="")
exit_without_teardown(3)
"""
    run = python_exit(tmp_path, code, capture_output=True)
    assert run.returncode == 3
    assert run.stdout == "unflushed output thread done\natexit handler\n"
    assert run.stderr == ""


def test_a_thread_pool_left_open_is_shut_down_as_at_pythons_exit(tmp_path: Path):
    """An open ``ThreadPoolExecutor``'s threads wait for work until threading's exit callback shuts
    the pool down: joined before it, they would wait for ever. Its queued work still runs."""
    code = """
import time
from concurrent.futures import ThreadPoolExecutor
from anomaly.commands import exit_without_teardown
pool = ThreadPoolExecutor(2)
list(pool.map(abs, range(4)))  # both threads started, now idle
pool.submit(lambda: (time.sleep(0.3), print("queued work done")))
exit_without_teardown(3)
"""
    run = python_exit(tmp_path, code, capture_output=True, timeout=60)
    assert (run.returncode, run.stdout, run.stderr) == (3, "queued work done\n", "")


def test_without_cpythons_exit_call_the_command_ends_as_python_ends(tmp_path: Path):
    """``atexit._run_exitfuncs`` is CPython's, undocumented: where it is missing, Python's own exit
    (teardown included) ends the command, with its handlers and its exit code."""
    code = """
import atexit
from anomaly.commands import exit_without_teardown
del atexit._run_exitfuncs
atexit.register(print, "atexit handler")
exit_without_teardown(3)
"""
    done = python_exit(tmp_path, code, capture_output=True)
    assert (done.returncode, done.stdout, done.stderr) == (3, "atexit handler\n", "")


def test_output_left_for_a_closed_pipe_ends_quietly_too(tmp_path: Path):
    read_end, write_end = os.pipe()
    os.close(read_end)
    code = "from anomaly.commands import exit_without_teardown\nprint('a line'); exit_without_teardown(0)"
    run = python_exit(tmp_path, code, stdout=write_end, stderr=subprocess.PIPE)
    os.close(write_end)
    assert (run.returncode, run.stderr) == (BROKEN_PIPE_EXIT, "")


#: Page faults of allocating and freeing four 8 MiB blocks ten times over, printed by a command that
#: runs through ``run`` (``"run"``) or as a plain script; one round first, so that only reuse counts.
REUSE_FAULTS = """
import resource, sys
from anomaly.commands import run
def one_round():
    blocks = [bytearray(8 << 20) for _ in range(4)]  # zero-filled: every page is touched
    del blocks
def faults() -> int:
    one_round()
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        one_round()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
    return 0
run(faults) if "{how}" == "run" else sys.exit(faults())
"""
GLIBC = sys.platform == "linux" and bool(os.confstr("CS_GNU_LIBC_VERSION"))


@pytest.mark.skipif(not GLIBC, reason="glibc's allocator settings")
def test_a_command_reuses_freed_memory_where_glibc_would_fault_in_new_pages(tmp_path: Path, monkeypatch):
    """glibc's default returns 32 MiB of freed heap top to the kernel each round (8192 pages faulted in
    again); a command keeps it for reuse, unless the environment sets the allocator itself."""
    for name in ALLOCATOR_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    pages = 4 * (8 << 20) // os.sysconf("SC_PAGE_SIZE")

    def faults(how: str) -> int:
        done = python_exit(tmp_path, REUSE_FAULTS.format(how=how), capture_output=True)
        assert (done.returncode, done.stderr) == (0, "")
        return int(done.stdout)

    assert faults("plain") > 5 * pages
    assert faults("run") < pages / 10
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")  # the user's own setting stands
    assert faults("run") > 5 * pages
    assert not reuse_freed_memory()


#: The heaps in use after three threads allocated at once, as ``malloc_stats`` lists them on stderr
#: (one ``Arena N:`` line each), in a command that runs through ``run`` or in a plain script.
ARENAS_USED = """
import ctypes, sys, threading
from anomaly.commands import run
def allocate(start: threading.Barrier) -> None:
    start.wait()
    for _ in range(100):
        blocks = [bytearray(1 << 16) for _ in range(8)]
        del blocks
def arenas() -> int:
    start = threading.Barrier(3)
    threads = [threading.Thread(target=allocate, args=(start,)) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ctypes.CDLL(None).malloc_stats()
    return 0
run(arenas) if "{how}" == "run" else sys.exit(arenas())
"""


@pytest.mark.skipif(not GLIBC, reason="glibc's allocator settings")
def test_a_commands_threads_share_one_heap(tmp_path: Path, monkeypatch):
    """glibc gives each allocating thread a heap of its own, whose freed blocks it keeps; a command's
    threads share one, unless the environment sets the allocator itself."""
    for name in ALLOCATOR_SETTINGS:
        monkeypatch.delenv(name, raising=False)

    def arenas(how: str) -> int:
        done = python_exit(tmp_path, ARENAS_USED.format(how=how), capture_output=True)
        assert done.returncode == 0
        return len(re.findall(r"^Arena \d+:", done.stderr, flags=re.MULTILINE))

    assert arenas("plain") > 1
    assert arenas("run") == 1
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")  # the user's own setting stands
    assert arenas("run") > 1


@pytest.mark.parametrize("name", [n for n in SUBCOMMANDS if n not in ("fit", "configs")])
def test_every_subcommand_has_its_own_help(name: str, capsys):
    with pytest.raises(SystemExit) as done:
        main([name, "--help"])
    assert done.value.code == 0
    assert f"usage: anomaly {name}" in capsys.readouterr().out


def test_fit_help_lists_the_model_and_data_options(capsys):
    assert main(["fit", "--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: anomaly fit" in out and "--trainer.max_epochs" in out
    assert "--model.backbone" in out and "--model.threshold_method" in out
    assert "--data.root" in out and "--data.augment_options" in out
    assert main(["fit", "--config", "spatial_grid", "--config", "folder", "--help"]) == 0
    out = capsys.readouterr().out
    assert "options of anomaly.methods.spatial.SpatialGaussianAD" in out and "--model.grid_size" in out
    assert "options of anomaly.data.folder.FolderDataModule" in out and "--data.test_dirs" in out


def test_configs_resolve_by_name(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # away from the clone, whose configs/NAME.yaml are files
    assert resolve_config("spatial_grid") == str(CONFIG_DIR / "spatial_grid.yaml")
    assert resolve_config("spatial_grid.yaml") == str(CONFIG_DIR / "spatial_grid.yaml")
    assert resolve_config("configs/spatial_grid.yaml") == str(CONFIG_DIR / "spatial_grid.yaml")
    (tmp_path / "spatial_grid.yaml").write_text("model: {}\n")
    assert resolve_config("spatial_grid.yaml") == "spatial_grid.yaml"  # a file beats a shipped name
    assert resolve_config_args(["--config=ocsvm", "--x", "1"]) == [
        f"--config={CONFIG_DIR / 'ocsvm.yaml'}",
        "--x",
        "1",
    ]
    with pytest.raises(ArgumentsError, match=r"no shipped config of that name.*spatial_grid"):
        resolve_config("spatial_gird")
    assert main(["fit", "--config", "nope"]) == 2
    assert "error: --config nope: no such file" in capsys.readouterr().err
    assert main(["configs"]) == 0
    assert "spatial_grid" in capsys.readouterr().out


def good_images(tiny_mvtec: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "good_parts"
    shutil.copytree(tiny_mvtec / "widget" / "train" / "good", folder)
    return folder


def test_fit_on_normal_images_only_saves_a_calibrated_detector(tiny_mvtec: Path, tmp_path: Path, capsys):
    folder, runs = good_images(tiny_mvtec, tmp_path), tmp_path / "runs"
    code = main(["fit", "--data.root", str(folder), "--trainer.default_root_dir", str(runs), *FAST])
    out, err = capsys.readouterr()
    assert code == 0, err
    run_dir = runs / "gaussian" / "efficientnet-lite0_levels-3-5" / "good_parts" / "fold_0"
    detector = run_dir / "detector.safetensors"
    assert detector.is_file() and not (run_dir / "results.json").exists()
    assert "fitted on 9 normal images, 3 held out for the threshold" in out
    assert "no AUROC" in out and str(detector) in out
    assert "the largest of 3 held-out normal scores (aiming at 1.00% false positives takes 100)" in out
    scores = tmp_path / "scores.csv"
    code = main(["predict", "--detector", str(detector), "--input", str(tiny_mvtec / "widget" / "test"),
                 "--out", str(scores), "--no_progress"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    rows = list(csv.DictReader(scores.read_text().splitlines()))
    assert len(rows) == 8 and all(row["decision"] in ("0", "1") for row in rows)


def test_normal_images_with_a_test_folder_give_the_full_report(tiny_mvtec: Path, tmp_path: Path, capsys):
    folder, runs = good_images(tiny_mvtec, tmp_path), tmp_path / "runs"
    tests = str(tiny_mvtec / "widget" / "test" / "*")
    code = main(["fit", "--data.root", str(folder), "--data.test_dirs", f"[{tests}]",
                 "--trainer.default_root_dir", str(runs), *FAST])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "image AUROC (%)" in out and "4 test images" not in out and "8 test images" in out
    assert (
        runs / "gaussian" / "efficientnet-lite0_levels-3-5" / "good_parts" / "fold_0" / "results.json"
    ).is_file()


def test_a_root_of_categories_is_still_mvtec(tiny_mvtec: Path, capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--data.root", str(tiny_mvtec), "--print_config"])
    assert "anomaly.data.MVTecDataModule" in capsys.readouterr().out
