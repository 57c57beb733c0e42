"""python -m anomaly.experiments: the tables' grids, resumable runs, and the printout beside the paper."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import anomaly.cli
from anomaly.configs import CONFIG_DIR
from anomaly.console import Terminated
from anomaly.errors import UserError
from anomaly.evaluation.paper_values import paper_level_value, paper_table
from anomaly.experiments.cells import RunIndex, run_context
from anomaly.experiments.cli import main
from anomaly.experiments.grids import PAPER_CONFIG, TABLES
from anomaly.experiments.runner import grid_cells, measured_table
from tests.conftest import DEFAULT_SWITCHES, FEW_HELD_OUT
from tests.evaluation.fake_runs import fake_results

pytestmark = [FEW_HELD_OUT, DEFAULT_SWITCHES]

LITE = ["--backbone", "efficientnet-lite0"]


def test_every_column_has_the_papers_value():
    for name, spec in TABLES.items():
        for setting in spec.settings:
            if spec.layout == "levels":
                assert paper_level_value(name, setting.paper_column, "sum") is not None, (name, setting.label)
            elif spec.layout == "working_point":
                assert setting.paper_column in paper_table("table4")["columns"], setting.label
            else:
                assert setting.paper_column in paper_table("table8")["columns"], (name, setting.label)


def test_grids_share_runs_and_backbone_option():
    table1 = grid_cells(TABLES["table1"], ["bottle", "cable"], [0, 1])
    assert len(table1) == 4  # L2, SED and Mahalanobis read the same runs
    table2 = grid_cells(TABLES["table2"], ["bottle", "cable"], [0, 1])
    table3 = grid_cells(TABLES["table3"], ["bottle", "cable"], [0, 1])
    assert len(table2) == 8 * 4 and len(table3) == 6 * 4
    assert set(table1) <= set(table2) and set(table1) <= set(table3)  # EN-B4 / no compression: same runs
    lite = TABLES["table3"].with_backbones(["efficientnet-lite0"])
    assert all(s.args[:4] == (*PAPER_CONFIG, "--model.backbone", "efficientnet-lite0") for s in lite.settings)
    assert ("--config", str(CONFIG_DIR / "paper.yaml")) == PAPER_CONFIG  # the paper's method, not the default
    assert "efficientnet-lite0" in lite.title
    assert [s.label for s in TABLES["table2"].with_backbones(["efficientnet-b0"]).settings] == [
        "EfficientNet-B0"
    ]
    with pytest.raises(UserError, match="no column for resnet18"):
        TABLES["table2"].with_backbones(["resnet18"])
    with pytest.raises(UserError, match="give --backbone once"):
        TABLES["table1"].with_backbones(["resnet18", "resnet34"])


def fake_fit(calls: list):
    """Stands in for anomaly.cli.fit_and_test: writes a run directory the way the CLI does."""

    def fit_and_test(args: list[str]) -> dict:
        option = dict(zip(args[::2], args[1::2], strict=False))
        calls.append(args)
        run_dir = Path(option["--trainer.default_root_dir"]) / "gaussian" / option["--model.backbone"]
        run_dir = run_dir / option["--data.category"] / f"fold_{option['--data.fold']}"
        run_dir.mkdir(parents=True, exist_ok=True)
        auroc = 0.9 + 0.01 * int(option["--data.fold"])
        results = fake_results(option["--data.category"], int(option["--data.fold"]), auroc)
        (run_dir / "results.json").write_text(json.dumps(results))
        return {**results, "run_dir": str(run_dir)}

    return fit_and_test


def test_runs_resume_and_print_beside_paper(tiny_mvtec: Path, tmp_path: Path, capsys, monkeypatch):
    calls: list = []
    monkeypatch.setattr(anomaly.cli, "fit_and_test", fake_fit(calls))
    args = ["table1", "--data.root", str(tiny_mvtec), "--folds", "0", "1", "--runs-dir", str(tmp_path), *LITE]
    assert main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("table1: 2 runs, 0 done, 2 to run")
    paper = " ".join(PAPER_CONFIG)
    assert (
        f"[todo] anomaly fit {paper} --model.backbone efficientnet-lite0 --data.resize linear --data.root"
        in out
    )
    assert not calls
    assert f"--data.feature_cache {tmp_path / 'feature_cache'}" in out and "--figures" not in out
    assert main([*args, "--dry-run", "--no-figures", "--image-cache", str(tmp_path / "images")]) == 0
    out = capsys.readouterr().out
    assert out.count("--figures false") == 2
    assert out.count(f"--data.image_cache {tmp_path / 'images'}") == 2

    assert main([*args, "--", "--data.num_workers", "0"]) == 0
    out, err = capsys.readouterr()
    assert len(calls) == 2 and calls[0][-2:] == ["--data.num_workers", "0"]
    assert "| level | L2 | L2 (paper) | SED | SED (paper) | Mahalanobis | Mahalanobis (paper) |" in out
    assert "| sum | 80.5 ± 0.5† | 75.3 ± 4.5 | 70.5 ± 0.5† | 79.5 ± 6.6 | 90.5 ± 0.5† | 94.8 ± 1.6 |" in out
    assert "table1: 2 runs done now, 0 finished before" in err

    assert main(args) == 0  # resumed: nothing left to run
    assert len(calls) == 2 and "0 runs done now, 2 finished before" in capsys.readouterr().err
    next(tmp_path.rglob("fold_1/results.json")).write_text("{}")  # an incomplete result is run again
    assert main([*args, "--dry-run"]) == 0
    assert "2 runs, 1 done, 1 to run" in capsys.readouterr().out
    assert main(args) == 0 and len(calls) == 3
    # other data or other result-changing options are new runs; how runs are computed is not
    assert main([*args, "--dry-run", "--", "--data.image_size", "160"]) == 0
    assert "2 runs, 0 done, 2 to run" in capsys.readouterr().out
    other_root = tmp_path / "copy"
    shutil.copytree(tiny_mvtec, other_root)
    assert main([*args, "--dry-run", "--data.root", str(other_root)]) == 0
    assert "2 runs, 0 done, 2 to run" in capsys.readouterr().out
    assert main([*args, "--dry-run", "--", "--data.batch_size=4", "--trainer.accelerator", "cpu"]) == 0
    assert "2 runs, 2 done, 0 to run" in capsys.readouterr().out


def test_missing_folds_are_warned(tiny_mvtec: Path, tmp_path: Path, capsys, monkeypatch):
    calls: list = []
    monkeypatch.setattr(anomaly.cli, "fit_and_test", fake_fit(calls))
    base = ["table1", "--data.root", str(tiny_mvtec), "--runs-dir", str(tmp_path), *LITE]
    assert main([*base, "--folds", "0"]) == 0
    capsys.readouterr()
    spec = TABLES["table1"].with_backbones(["efficientnet-lite0"])
    table, warnings = measured_table(spec, ["widget"], [0, 1], RunIndex(tmp_path, tiny_mvtec))
    assert "L2: 1 of the grid's runs have no complete results" in warnings
    assert "L2: widget lacks folds 1 (its mean is over folds 0 only)" in warnings
    assert set(warnings) <= set(table.notes)
    sum_row = table.rows[-1]
    assert sum_row[1].mean == pytest.approx(80.0) and sum_row[1].sem is None  # fold 0 only: no SEM


REPRODUCE_START = {
    "md": "<!-- written by anomaly reproduce -->\n",
    "csv": "# written by anomaly reproduce\n",
    "latex": "% written by anomaly reproduce\n",
}


@pytest.mark.parametrize("fmt", ["md", "csv", "latex"])
def test_out_is_replaced_on_a_rerun_in_any_format(tiny_mvtec: Path, tmp_path: Path, capsys, monkeypatch, fmt):
    monkeypatch.setattr(anomaly.cli, "fit_and_test", fake_fit([]))
    out_file = tmp_path / "table1.txt"
    args = ["table1", "--data.root", str(tiny_mvtec), "--folds", "0", "--runs-dir", str(tmp_path / "runs"),
            *LITE, "--out", str(out_file)]  # fmt: skip
    assert main(args) == 0  # an earlier table, in Markdown
    out_file.write_text(out_file.read_text() + "a line the rerun drops\n")
    capsys.readouterr()
    assert main([*args, "--format", fmt]) == 0
    assert out_file.read_text() == REPRODUCE_START[fmt] + capsys.readouterr().out


def test_out_refuses_a_file_it_did_not_write(tiny_mvtec: Path, tmp_path: Path, capsys, monkeypatch):
    calls: list = []
    monkeypatch.setattr(anomaly.cli, "fit_and_test", fake_fit(calls))
    results = tmp_path / "results.csv"
    results.write_text("level,auroc\n7,0.9\n")
    args = ["table1", "--data.root", str(tiny_mvtec), "--folds", "0", "--runs-dir", str(tmp_path / "runs"),
            *LITE, "--format", "csv", "--out", str(results)]  # fmt: skip
    assert main(args) == 2
    out, err = capsys.readouterr()
    assert err == f"error: --out {results} already exists and was not written by anomaly reproduce: " \
        "give another name, or --overwrite to replace it\n"  # fmt: skip
    assert not calls and out == "" and results.read_text() == "level,auroc\n7,0.9\n"  # nothing was run
    assert main([*args, "--overwrite"]) == 0 and len(calls) == 1
    assert results.read_text() == REPRODUCE_START["csv"] + capsys.readouterr().out


def test_out_is_never_an_input_of_the_runs(tiny_mvtec: Path, tmp_path: Path, capsys, monkeypatch):
    monkeypatch.setattr(anomaly.cli, "fit_and_test", fake_fit([]))
    runs = tmp_path / "runs"
    base = ["table1", "--data.root", str(tiny_mvtec), "--folds", "0", "--runs-dir", str(runs), *LITE]
    image_cache = tmp_path / "images"
    image_cache.mkdir()
    (image_cache / "cached.npy").write_bytes(b"cached")
    assert main([*base, "--image-cache", str(image_cache)]) == 0
    config = tmp_path / "mine.yaml"
    config.write_text("seed_everything: 0\n")
    inputs = [
        next(tiny_mvtec.rglob("*.png")),  # an image of the data root
        next(runs.rglob("results.json")),  # a run's results
        next((runs / ".experiments").glob("*.json")),  # the record that links the run to its folder
        image_cache / "cached.npy",
        config,  # a file named in the runs' arguments
    ]
    for path in inputs:
        before = path.read_bytes()
        capsys.readouterr()
        extra = ["--", "--config", str(config)] if path == config else []
        args = [*base, "--image-cache", str(image_cache), "--out", str(path), "--overwrite", *extra]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --out {path} is an input of anomaly reproduce"), err
        assert len(err.splitlines()) == 1 and path.read_bytes() == before


def test_rejected_option_is_one_line(tiny_mvtec: Path, tmp_path: Path, capsys):
    base = ["table3", "--data.root", str(tiny_mvtec), "--folds", "0", "--runs-dir", str(tmp_path), *LITE]
    assert main([*base, "--", "--data.num_workers", "0", "--model.no_such_option", "1"]) == 2
    err = capsys.readouterr().err
    assert "usage:" not in err and "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert line.startswith("error: the training command rejected the arguments of run")
    assert "--model.no_such_option is not an option of GaussianAD" in line
    assert main(["table1", "--data.root", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["table1", "--data.root", str(tiny_mvtec), "--categories", "nut"]) == 2
    assert "nut" in capsys.readouterr().err
    assert main(["table1", "--data.root", str(tiny_mvtec), "--folds", "7"]) == 2


@pytest.mark.slow
def test_real_run_in_process(tiny_mvtec: Path, tmp_path: Path, capsys):
    args = ["table1", "--data.root", str(tiny_mvtec), "--folds", "0", "--runs-dir", str(tmp_path), *LITE,
            "--format", "csv", "--", "--data.num_workers", "0", "--data.batch_size", "8"]  # fmt: skip
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert "table1: 1 runs done now" in err
    lines = out.splitlines()
    assert lines[0].startswith("level,L2 mean,L2 sem,L2 (paper) mean,L2 (paper) sem,SED mean")
    assert lines[-1].startswith("sum,") and lines[-1].endswith(",94.8000,1.6000")
    run_dir = (
        tmp_path / "gaussian" / "efficientnet-lite0_resize-linear" / "widget" / "fold_0"
    )  # the paper's resize
    assert (run_dir / "results.json").is_file() and (run_dir / "roc.png").is_file()
    assert any((tmp_path / "feature_cache").rglob("*.feat")), "the run did not fill the shared feature cache"


def test_batch_size_counts_only_for_methods_trained_by_gradient_descent(tmp_path: Path):
    extra = ["--data.batch_size", "4", "--data.num_workers=2", "--data.image_size", "160"]
    root = str(tmp_path.resolve())
    assert run_context(tmp_path, extra, feature_based=True) == [root, "--data.image_size", "160"]
    assert run_context(tmp_path, extra) == [root, "--data.batch_size", "4", "--data.image_size", "160"]


def lightning_exit_on(interrupt: type[BaseException]):
    """A training command that stops as Lightning's trainer does on ``interrupt``: Ctrl-C becomes
    ``sys.exit(1)`` raised while handling the KeyboardInterrupt; anything else is re-raised."""

    def fit_and_test(args):
        try:
            raise interrupt()
        except KeyboardInterrupt:
            raise SystemExit(1) from None  # Lightning's _call_and_handle_interrupt: plain exit(1)

    return fit_and_test


@pytest.mark.parametrize(("interrupt", "code"), [(KeyboardInterrupt, 130), (Terminated, 143)])
def test_interrupted_reproduce_is_an_interrupt_not_an_argument_error(
    tiny_mvtec: Path, tmp_path: Path, capsys, monkeypatch, interrupt, code
):
    monkeypatch.setattr(anomaly.cli, "fit_and_test", lightning_exit_on(interrupt))
    args = ["table1", "--data.root", str(tiny_mvtec), "--folds", "0", "--runs-dir", str(tmp_path), *LITE]
    assert main(args) == code
    err = capsys.readouterr().err
    assert "rejected the arguments" not in err and "Traceback" not in err
    assert "interrupted: finished runs are kept" in err
