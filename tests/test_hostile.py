"""Hostile input: every entry point answers with one line, the right exit code, and nothing half-written.

Each row of :data:`HOSTILE` is one case: the entry point, its arguments (``{data}``,
``{runs}``, ``{detector}``, ... are filled in from the workspace below), the start of
the one line it must print (or, for the Python API, of the ``ValueError``'s
message), the exit code (or the exception type), and what must be on disk after
it: by default the workspace is exactly as it was. Adding a case is one line.

Signals and file-size limits need a real process: they are the subprocess tests at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from anomaly.cli import main as train_main
from anomaly.detector import GaussianDetector, read_detector
from anomaly.evaluation.evaluate import main as evaluate_main
from anomaly.experiments.cli import main as experiments_main
from anomaly.export.__main__ import main as export_main
from anomaly.runfolder import RunLock
from predict import main as predict_main
from tests.conftest import make_mvtec_category
from tests.detector.helpers import demo_images, fit_demo_detector
from tests.hold_fit import MARKER

REPO = Path(__file__).resolve().parents[1]
TRAIN = (
    "--config paper --data.root {data} --data.category widget --data.num_workers 0 --data.batch_size 8 "
    "--figures false --trainer.default_root_dir {runs}"
)
RUN_DIR = "gaussian/efficientnet-lite0/widget/fold_0"  # the default model's run folder, below {runs}
LONG = "x" * 300
#: ``--model.levels`` as a YAML anchor bomb of under 300 characters: over 10^6 items once expanded.
ANCHOR_BOMB = (
    "["
    + ", ".join(
        ["&l0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
        + [f"&l{k} [{','.join([f'*l{k - 1}'] * 10)}]" for k in range(1, 6)]
    )
    + "]"
)
ENTRY_POINTS: dict[str, Callable[[list[str]], int]] = {
    "train": train_main,
    "predict": predict_main,
    "export": export_main,
    "evaluate": evaluate_main,
    "experiments": experiments_main,
}


@dataclass(frozen=True)
class Hostile:
    """One hostile case (see the module docstring)."""

    entry: str  # train | predict | export | evaluate | experiments | api
    call: str | Callable  # arguments with {placeholders}, or fn(workspace) for the API
    starts: str  # the line's start ("error: ...", "interrupted: ..."), or the API message's
    code: int | type[BaseException] = 2
    env: dict = field(default_factory=dict)
    setup: Callable[[Path], contextlib.AbstractContextManager] | None = None


def case(name: str, *args, xfail: str | None = None, slow: bool = False, **kwargs):
    marks = [pytest.mark.xfail(strict=True, reason=xfail)] if xfail else []
    return pytest.param(Hostile(*args, **kwargs), id=name, marks=marks + ([pytest.mark.slow] if slow else []))


# --------------------------------------------------------------- set-ups
@contextlib.contextmanager
def run_in_progress(workspace: Path) -> Iterator[None]:
    """Another run holds the run folder's lock (it has written its config already)."""
    run_dir = workspace / "busy" / RUN_DIR
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("from: the other run\n")
    lock = RunLock.acquire(run_dir)
    try:
        yield
    finally:
        lock.release()


@contextlib.contextmanager
def results_of_other_data(workspace: Path) -> Iterator[None]:
    """The run folder holds the results of a run on another data root with the same category."""
    run_dir = workspace / "shared_runs" / RUN_DIR
    run_dir.mkdir(parents=True)
    (run_dir / "results.json").write_text(json.dumps({"dataset": "/elsewhere/mvtec", "image_auroc": 0.9}))
    yield


def nan_features(_: Path) -> np.ndarray:
    features = np.random.default_rng(0).normal(size=(20, 4))
    features[[3, 11], 1] = [np.nan, np.inf]
    return features


def feature_detector() -> GaussianDetector:
    return GaussianDetector(backbone=None, fpr=0.1).fit(np.random.default_rng(0).normal(size=(30, 4)))


HOSTILE = [
    # train.py (bug numbers of the hostile-input report in brackets)
    case("train pixel bomb [1]", "train", f"{TRAIN} --data.root {{bomb_data}}", "error: image",
         env={"ANOMALY_MAX_IMAGE_PIXELS": "2000"}),
    case("train image_size 100000 [4]", "train", f"{TRAIN} --data.image_size 100000",
         "error: image_size 100000 is over the limit"),
    case("train long --config [5]", "train", f"{TRAIN} --config {LONG}.yaml", "error: cannot read or write"),
    case("train long --data.root [5]", "train", f"{TRAIN} --data.root {LONG}", "error: cannot read or write"),
    case("train long --data.category [5]", "train", f"{TRAIN} --data.category {LONG}",
         "error: the run folder"),
    case("train long root dir [5]", "train", f"{TRAIN} --trainer.default_root_dir {LONG}",
         "error: cannot read or write"),
    case("train long root dir below [5]", "train", f"{TRAIN} --trainer.default_root_dir {{runs}}/{LONG}",
         "error: the run folder"),
    case("train anchor bomb levels [6]", "train", f"{TRAIN} --model.levels '{ANCHOR_BOMB}'",
         "error: --model.levels: the value expands"),
    case("train busy run folder [12]", "train", f"{TRAIN} --trainer.default_root_dir {{workspace}}/busy",
         "error: run folder", setup=run_in_progress),
    case("train other data root [minor 5]", "train",
         f"{TRAIN} --trainer.default_root_dir {{workspace}}/shared_runs", "error: run folder",
         setup=results_of_other_data),
    case("train target_fpr nan [minor 6]", "train", f"{TRAIN} --model.target_fpr nan",
         "error: --model.target_fpr: must be a finite number in (0, 1)"),
    case("train 16-mixed on cpu [minor 11]", "train", f"{TRAIN} --trainer.precision 16-mixed",
         "error: --trainer.precision 16-mixed is not available"),
    case("train target_fpr inf", "train", f"{TRAIN} --model.target_fpr inf",
         "error: --model.target_fpr: must be a finite number"),
    case("train root is a file", "train", f"{TRAIN} --trainer.default_root_dir {{afile}}",
         "error: --trainer"),
    # predict.py
    case("predict pixel bomb [2]", "predict", "--detector {detector} --input {bomb} --no-progress",
         "error: no image could be scored", env={"ANOMALY_MAX_IMAGE_PIXELS": "2000"}),
    case("predict --out under a file [minor 7]", "predict",
         "--detector {detector} --input {bomb} --out {afile}/p.csv --no-progress", "error: --out"),
    case("predict long --input [5]", "predict", f"--detector {{detector}} --input {LONG} --no-progress",
         "error: cannot read or write"),
    case("predict long --detector [5]", "predict", f"--detector {LONG} --input {{bomb}} --no-progress",
         "error: cannot read or write"),
    case("predict NaN threshold [9]", "predict", "--detector {nan_detector} --input {bomb} --no-progress",
         "error:"),
    case("predict --out the detector (second probe 3)", "predict",
         "--detector {detector} --input {bomb} --out {detector}/detector.safetensors",
         "error: --out {detector}/detector.safetensors is an input"),
    case("predict --out the input image (second probe 3)", "predict",
         "--detector {detector} --input {bomb} --out {bomb}", "error: --out {bomb} is an input"),
    case("predict --maps the input folder (second probe 1)", "predict",
         "--detector {detector} --input {data}/widget/train/good --maps {data}/widget/train/good",
         "error: --maps {data}/widget/train/good holds files"),
    case("predict --input '' (second probe 10)", "predict", "--detector {detector} --input ''",
         "error: --input is empty"),
    case("predict glob of folders (second probe)", "predict",
         "--detector {detector} --input '{data}/widget/*'",
         "error: --input '{data}/widget/*' matches only folders"),
    # python -m anomaly.export
    case("export --out the detector (second probe 3)", "export",
         "--detector {detector} --out {detector}/detector.safetensors", "error: --out"),
    case("export --out under a file", "export", "--detector {detector} --out {afile}/d.onnx",
         "error: --out {afile}/d.onnx: {afile} is a file"),
    case("export long --out [5]", "export", f"--detector {{detector}} --out {LONG}.onnx",
         "error: cannot read or write"),
    # evaluate.py
    case("evaluate long runs folder [5]", "evaluate", LONG, "error: cannot read or write"),
    case("evaluate runs folder is a file", "evaluate", "{afile}", "error: runs folder"),
    # python -m anomaly.experiments
    case("experiments long --data.root [5]", "experiments", f"table1 --data.root {LONG}",
         "error: cannot read or write"),
    case("experiments unknown category", "experiments", "table1 --data.root {data} --categories nowhere",
         "error: categories nowhere"),
    # the Python API: a ValueError whose message starts as given
    case("api NaN rows [13]", "api", lambda w: GaussianDetector(backbone=None).fit(nan_features(w)),
         "features hold NaN or infinite values in row(s) 3, 11", ValueError),
    case("api 1e200 [13]", "api", lambda w: GaussianDetector(backbone=None).fit(np.full((5, 3), 1e200)),
         "features hold values beyond", ValueError),
    case("api NaN rows scored [13]", "api", lambda w: feature_detector().score_samples(nan_features(w)),
         "features hold NaN", ValueError),
    case("api NaN calibration [13]", "api", lambda w: feature_detector().calibrate(nan_features(w)),
         "features hold NaN", ValueError),
    case("api zero width [minor 8]", "api", lambda w: GaussianDetector(backbone=None).fit(np.zeros((10, 0))),
         "features have no columns", ValueError),
    case("api 150528 features [minor 8]", "api",
         lambda w: GaussianDetector(backbone=None).fit(np.zeros((3, 150528), np.float32)),
         "a Gaussian of 150528 features needs", ValueError),
    case("api float images up to 255 [minor 8]", "api",
         lambda w: fit_demo_detector().score_samples(torch.full((1, 3, 224, 224), 255.0)),
         "float image tensors must lie in [0, 1]", ValueError),
    case("api image_size 100000 [4]", "api",
         lambda w: GaussianDetector(levels=[2], pooling="global", image_size=100000).fit(
             demo_images()[0][:2]),
         "image_size 100000 is over the limit", ValueError),
    case("api pixel bomb [1]", "api", lambda w: fit_demo_detector().score_samples([w / "bomb.png"]),
         "image", ValueError, env={"ANOMALY_MAX_IMAGE_PIXELS": "2000"}),
]  # fmt: skip


# ------------------------------------------------------------- workspace
@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """Data, a detector, a pixel bomb (64 x 64: over a limit of 2000 set per case) and a plain file."""
    root = tmp_path_factory.mktemp("hostile")
    make_mvtec_category(root / "data", n_train=10, n_good=3, n_bad=3, size=32)
    make_mvtec_category(root / "bomb_data", n_train=10, n_good=3, n_bad=3, size=32)
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(
        root / "bomb_data" / "widget" / "train" / "good" / "big.png"
    )
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(root / "bomb.png")
    detector = fit_demo_detector()
    detector.save(root / "detector" / "detector.safetensors")
    tensors, meta = read_detector(root / "detector")  # saving refuses a NaN threshold: edit the file
    (root / "nan_detector").mkdir()
    save_file(tensors, str(root / "nan_detector" / "detector.safetensors"),
              metadata={"detector": json.dumps({**meta, "threshold": float("nan")})})  # fmt: skip
    (root / "afile").write_text("a file, not a folder\n")
    return root


def placeholders(workspace: Path) -> dict[str, str]:
    names = ("data", "bomb_data", "detector", "nan_detector", "afile")
    return {
        "workspace": str(workspace),
        "runs": str(workspace / "runs"),
        "bomb": str(workspace / "bomb.png"),
        **{name: str(workspace / name) for name in names},
    }


def disk_state(folder: Path) -> dict[str, tuple]:
    """Every path below ``folder``: a folder, or a file's size and modification time."""
    state = {}
    for path in folder.rglob("*"):
        info = path.lstat()
        state[str(path.relative_to(folder))] = "folder" if path.is_dir() else (info.st_size, info.st_mtime_ns)
    return state


def one_line(stderr: str, starts: str) -> None:
    """Exactly one ``error:``/``interrupted:`` line, the last one, no traceback."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    reports = [line for line in lines if line.startswith(("error:", "interrupted:"))]
    assert len(reports) == 1 and lines[-1] == reports[0], stderr
    assert reports[0].startswith(starts), reports[0]


@pytest.mark.parametrize("hostile", HOSTILE)
def test_hostile_input(hostile: Hostile, workspace: Path, monkeypatch, capsys):
    for name, value in hostile.env.items():
        monkeypatch.setenv(name, value)
    names = placeholders(workspace)
    with hostile.setup(workspace) if hostile.setup else contextlib.nullcontext():
        before = disk_state(workspace)
        if hostile.entry == "api":
            with pytest.raises(hostile.code) as raised:
                hostile.call(workspace)
            assert str(raised.value).startswith(hostile.starts), raised.value
        else:
            args = [token.format(**names) for token in shlex.split(hostile.call)]
            code = ENTRY_POINTS[hostile.entry](args)
            _, err = capsys.readouterr()
            one_line(err, hostile.starts.format(**names))
            assert code == hostile.code
        assert disk_state(workspace) == before, "the workspace changed"


def test_the_anchor_bomb_is_short_and_huge():
    import yaml

    from anomaly.arguments import expanded_items

    assert len(ANCHOR_BOMB) < 300
    assert expanded_items(yaml.compose(ANCHOR_BOMB)) > 10**6


# ------------------------------------------------------- real processes
def start_training(workspace: Path, runs: Path, *extra: str, **popen) -> subprocess.Popen:
    args = [token.format(data=workspace / "data", runs=runs) for token in shlex.split(TRAIN)]
    return subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *args, *extra],
        cwd=workspace, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen,
    )  # fmt: skip


def wait_for_file(path: Path, process: subprocess.Popen, timeout: float = 300.0) -> None:
    """Until ``process`` creates ``path``; fails with the process's output if it ends or times out first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            out, err = process.communicate()
            pytest.fail(f"{path.name} did not appear (exit {process.returncode}):\n{out}\n{err}")
        time.sleep(0.02)


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_mid_fit_exits_with_its_code_and_leaves_no_run(signum, code, workspace, tmp_path):
    """[10], [minor 3]: Lightning made SIGTERM exit 0 and Ctrl-C exit 1; a scheduler must see them."""
    runs, fitting = tmp_path / "runs", tmp_path / "fitting"
    hold = ["--trainer.callbacks+=tests.hold_fit.HoldFit"]  # the run waits at its first batch
    process = start_training(workspace, runs, *hold, env={**os.environ, MARKER: str(fitting)})
    wait_for_file(fitting, process)
    process.send_signal(signum)
    _, err = process.communicate(timeout=240)
    one_line(err, "interrupted:")
    assert process.returncode == code
    assert not runs.exists() or not any(path.is_file() for path in runs.rglob("*")), "files were left"


def loader_workers(pid: int) -> list[int]:
    """The child processes of ``pid`` (its data loader workers), from /proc."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(child) for child in children.read_text().split()] if children.exists() else []


def wait_until_workers(process: subprocess.Popen, count: int, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while len(loader_workers(process.pid)) < count:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the loader workers never started"
        time.sleep(0.02)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads child processes from /proc")
@pytest.mark.parametrize("moment", ["fit starts", "workers load"] * 3)
def test_ctrl_c_to_the_process_group_with_loader_workers_exits_130_and_leaves_no_run(
    moment, workspace, tmp_path
):
    """A terminal's Ctrl-C reaches the workers too: they ignore it, and the main process stops them.
    No "DataLoader worker exited unexpectedly", no interrupt swallowed into exit 0."""
    runs, fitting = tmp_path / "runs", tmp_path / "fitting"
    hold = ["--trainer.callbacks+=tests.hold_fit.HoldFit"]  # the run waits at its first batch
    env = {**os.environ, MARKER: str(fitting)}
    process = start_training(
        workspace, runs, "--data.num_workers", "2", *hold, env=env, start_new_session=True
    )
    wait_for_file(fitting, process)
    if moment == "workers load":
        wait_until_workers(process, 2)
    os.killpg(process.pid, signal.SIGINT)
    _, err = process.communicate(timeout=240)
    one_line(err, "interrupted:")
    assert process.returncode == 130
    assert not runs.exists() or not any(path.is_file() for path in runs.rglob("*")), "files were left"


def file_size_limit(size: int) -> Callable[[], None]:
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (size, resource.RLIM_INFINITY))


@pytest.mark.slow
def test_a_full_disk_while_training_is_one_line(workspace: Path, tmp_path: Path):
    """[11]: ``ulimit -f`` (the run's files cannot grow past 100 KB): one line, and no run left."""
    runs = tmp_path / "runs"
    process = start_training(workspace, runs, preexec_fn=file_size_limit(100_000))
    _, err = process.communicate(timeout=600)
    one_line(err, "error: cannot read or write")
    assert process.returncode == 2
    assert not runs.exists() or not any(path.is_file() for path in runs.rglob("*")), "files were left"


@pytest.mark.slow
def test_a_full_disk_while_predicting_is_one_line(workspace: Path, tmp_path: Path):
    """[11]: predict.py whose CSV cannot grow past 300 bytes: one line, and no CSV."""
    out = tmp_path / "p.csv"
    args = ["--detector", str(workspace / "detector"), "--input", str(workspace / "data"), "--out", str(out),
            "--no-progress", "--batch-size", "2"]  # fmt: skip
    done = subprocess.run(
        [sys.executable, str(REPO / "predict.py"), *args], cwd=tmp_path, capture_output=True, text=True,
        preexec_fn=file_size_limit(300), timeout=600,
    )  # fmt: skip
    one_line(done.stderr, f"error: cannot read or write {out}: File too large")  # the file is named
    assert done.returncode == 2
    assert list(tmp_path.iterdir()) == [], "a partial CSV was left"


def test_signal_exit_codes_without_lightning():
    """SIGTERM raised in the main thread (before Lightning is involved) exits 143."""
    from anomaly.console import run_command

    def terminated() -> int:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        return 0

    def interrupted() -> int:
        raise KeyboardInterrupt

    before = signal.getsignal(signal.SIGTERM)
    assert run_command(terminated) == 143
    assert run_command(interrupted) == 130
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is only installed while running
