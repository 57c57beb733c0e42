"""benchmarks/peak_memory.py: the fold that anomalib's peers are given, its argument errors, a peer's run,
what it may write."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

from anomaly.data.folder import FolderDataModule
from tests.conftest import load_benchmark, make_mvtec_category
from tests.test_outputs import file_size_limit

peak_memory = load_benchmark("peak_memory")


@pytest.fixture
def category(tmp_path: Path) -> Path:
    """A folder category written by ``--make``: 10 normal images, 2 good and 3 defective test images."""
    source = make_mvtec_category(tmp_path / "mvtec", n_train=6, n_good=2, n_bad=3, size=32) / "widget"
    root = tmp_path / "category"
    peak_memory.make_category(root, source, 40, 10, 2, 3)
    return root


def targets(folder: Path) -> list[str]:
    return sorted(str(link.resolve()) for link in folder.iterdir())


def test_the_peers_fold_is_the_one_anomaly_fit_fits_and_tests(category: Path, tmp_path: Path):
    counts = peak_memory.fold_folders(category, tmp_path / "fold")
    assert counts == {"fit": 8, "holdout": 2, "good": 2, "defect": 3}  # fold 0 of 5 holds out 2 of 10
    # what `anomaly fit --config folder --data.root ROOT` builds (configs/folder.yaml)
    data = FolderDataModule(root=str(category), normal_dir="normal", test_dirs=["test/*"], fold=0)
    fitted = sorted(str(Path(s.path).resolve()) for s in data.fit_samples)
    assert targets(tmp_path / "fold" / "fit") == fitted
    held_out = sorted(str(Path(s.path).resolve()) for s in data.holdout_samples)
    assert targets(tmp_path / "fold" / "holdout") == held_out
    assert len(held_out) == 2 and not set(held_out) & set(fitted)
    for label, folder in (("good", "test/good"), ("defect", "test/defect")):
        assert targets(tmp_path / "fold" / label) == sorted(
            str(p.resolve()) for p in (category / folder).iterdir()
        )


def test_peers_without_anomalib_are_a_one_line_error(category: Path, monkeypatch, capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "anomalib" else real_find_spec(name, *a)
    )
    assert peak_memory.main([str(category), "--configs", "--peers", "anomalib DFM"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: --peers needs anomalib") and err.count("\n") == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--rounds", "0"], "error: --rounds must be at least 1"),
        (["--configs", "recommended"], "normal does not exist: give --make SOURCE"),
    ],
)
def test_bad_arguments_are_one_line_errors(argv: list[str], message: str, tmp_path: Path, capsys):
    assert peak_memory.main([str(tmp_path / "nothing"), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_help_lists_the_peers(capsys):
    """argparse formats help strings with %: a peer named "PatchCore 10%" must not break ``--help``."""
    with pytest.raises(SystemExit) as exit_:
        peak_memory.main(["--help"])
    assert exit_.value.code == 0
    assert "anomalib PatchCore 10%" in " ".join(capsys.readouterr().out.split())


def test_an_unknown_peer_is_refused_with_the_known_names(tmp_path: Path, capsys):
    with pytest.raises(SystemExit) as exit_:
        peak_memory.main([str(tmp_path), "--peers", "anomalib DFN"])
    assert exit_.value.code == 2
    assert "'anomalib DFM'" in capsys.readouterr().err


@pytest.mark.slow
def test_a_peer_fits_the_fold_and_tests_every_test_image(category: Path, tmp_path: Path):
    pytest.importorskip("anomalib")
    out = tmp_path / "results.json"
    argv = [str(category), "--configs", "--peers", "anomalib DFM", "--time-limit", "600", "--out", str(out)]
    assert peak_memory.main(argv) == 0
    (result,) = json.loads(out.read_text())["results"]
    assert result["exit_code"] == 0 and result["stopped"] is None
    assert result["images"] == [8, 5]
    assert 0 <= result["image_auroc"] <= 1 and result["peak_rss_mib"] > 100 and result["saved_mib"] > 0


def test_a_failed_run_keeps_the_end_of_its_output(tmp_path: Path, capsys):
    fail = "print('\\n'.join(map(str, range(20)))); raise SystemExit('error: what went wrong')"
    limits = argparse.Namespace(max_rss_gb=None, time_limit=60)
    result = peak_memory.run([sys.executable, "-c", fail], tmp_path / "run", limits)
    assert result["exit_code"] == 1 and result["stopped"] is None
    assert result["output_tail"] == [*map(str, range(11, 20)), "error: what went wrong"]
    result.update(method="ours: failing", image_auroc=None, pixel_auroc=None, saved_mib=None)
    peak_memory.report(result)
    table, err = capsys.readouterr()
    assert table.startswith("| ours: failing |") and table.rstrip().endswith("| 1 |")
    assert err.splitlines() == [
        "ours: failing failed; its last lines of output:",
        *("    " + line for line in result["output_tail"]),
    ]


def test_a_run_that_succeeds_keeps_no_output(tmp_path: Path):
    limits = argparse.Namespace(max_rss_gb=None, time_limit=60)
    result = peak_memory.run([sys.executable, "-c", "print('fine')"], tmp_path / "run", limits)
    assert result["exit_code"] == 0 and result["output_tail"] == []
    assert (tmp_path / "run" / "output.log").read_text() == "fine\n"


def test_a_config_file_runs_from_the_scratch_folder_under_its_name(tmp_path: Path, monkeypatch):
    """``--configs FILE``: the command, run in the scratch folder, gets the file's absolute path; the
    row is named by the file's stem."""
    (tmp_path / "configs").mkdir()
    config = tmp_path / "configs" / "candidate.yaml"
    config.write_text("model: {}\n")
    commands = []
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(peak_memory, "run", lambda argv, out, args: commands.append(argv) or {"exit_code": 0})
    args = argparse.Namespace(num_workers=2)
    result = peak_memory.measure_config("configs/candidate.yaml", tmp_path, tmp_path / "out", args)
    assert result["method"] == "ours: candidate"
    argv = commands[0]
    configs = [argv[i + 1] for i, arg in enumerate(argv) if arg == "--config"]
    assert configs == ["folder", str(config.resolve())]
    assert argv[argv.index("--data.num_workers") + 1] == "2"  # loading as the peers are told to
    own = argparse.Namespace(num_workers=None)  # --num-workers default
    peak_memory.measure_config("recommended", tmp_path, tmp_path / "own", own)
    assert "--data.num_workers" not in commands[1]  # anomaly fit's own default


@pytest.mark.parametrize("threshold", [False, True])
def test_the_peers_set_a_threshold_on_the_held_out_images_only_when_asked(
    tmp_path: Path, monkeypatch, threshold: bool
):
    commands = []
    monkeypatch.setattr(peak_memory, "run", lambda argv, out, args: commands.append(argv) or {"exit_code": 0})
    args = argparse.Namespace(peers_threshold=threshold, num_workers=2)
    result = peak_memory.measure_peer("anomalib DFM", tmp_path / "fold", tmp_path / "out", args)
    given = {arg: commands[0][i + 1] for i, arg in enumerate(commands[0]) if arg.startswith("--")}
    folders = ["fit", "good", "defect", *(["holdout"] if threshold else [])]
    assert given == {
        **{f"--{name}": str(tmp_path / "fold" / name) for name in folders},
        "--num-workers": "2",
        "--out": given["--out"],
    }
    assert result["method"] == ("anomalib DFM, threshold" if threshold else "anomalib DFM")
    args.num_workers = None  # --num-workers default: anomalib_fit.py passes anomalib none
    peak_memory.measure_peer("anomalib DFM", tmp_path / "fold", tmp_path / "own", args)
    assert commands[1][commands[1].index("--num-workers") + 1] == "default"


@pytest.mark.parametrize("given", ["-1", "two"])
def test_num_workers_is_a_count_or_default(tmp_path: Path, capsys, given: str):
    with pytest.raises(SystemExit) as stopped:
        peak_memory.main([str(tmp_path), "--configs", "paper", "--num-workers", given])
    assert stopped.value.code == 2
    assert f"give 0 or more, or default, not '{given}'" in capsys.readouterr().err


def measured(config: str, root: Path, out: Path, args: argparse.Namespace) -> dict:
    """A stand-in for one measured run (the real one runs ``anomaly fit``)."""
    return {
        "method": f"ours: {config}", "exit_code": 0, "stopped": None, "peak_rss_mib": 900.0,
        "group_peak_rss_mib": 880.0, "group_peak_pss_mib": 870.0, "seconds": 3.0,
        "cpu_seconds": 2.5, "load_1min": 0.5, "output_tail": [], "image_auroc": 0.9, "pixel_auroc": None,
        "saved_mib": 1.0,
    }  # fmt: skip


def test_out_never_replaces_a_file_of_another_origin(tmp_path: Path, monkeypatch, capsys):
    """``--out`` is claimed before any work: a user's file is refused in one line and stays as it was."""
    runs = []
    monkeypatch.setattr(peak_memory, "measure_config", lambda *a: runs.append(a) or measured(*a))
    (tmp_path / "category" / "normal").mkdir(parents=True)
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": true}\n')
    assert peak_memory.main([str(tmp_path / "category"), "--configs", "paper", "--out", str(notes)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith(
        f"error: --out {notes} already exists and was not written by benchmarks/peak_memory.py"
    )
    assert notes.read_text() == '{"mine": true}\n' and runs == []
    argv = [str(tmp_path / "category"), "--configs", "paper", "--out", str(notes), "--overwrite"]
    assert peak_memory.main(argv) == 0 and len(runs) == 1
    assert json.loads(notes.read_text())["results"][0]["method"] == "ours: paper"


def test_a_rerun_replaces_its_own_results(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setattr(peak_memory, "measure_config", measured)
    (tmp_path / "category" / "normal").mkdir(parents=True)
    out = tmp_path / "results" / "peak.json"
    for configs in (["paper"], ["paper", "recommended"]):
        assert peak_memory.main([str(tmp_path / "category"), "--configs", *configs, "--out", str(out)]) == 0
    written = json.loads(out.read_text())
    assert written["written_by"] == "benchmarks/peak_memory.py"
    assert [r["method"] for r in written["results"]] == ["ours: paper", "ours: recommended"]
    assert os.listdir(out.parent) == ["peak.json"]  # no temporary left beside it


def test_make_never_writes_into_a_folder_of_other_files(category: Path, tmp_path: Path, capsys):
    """``--make`` fills only a new or empty ROOT: a category already there keeps its images."""
    before = {p: p.read_bytes() for p in category.rglob("*.png")}
    argv = [
        str(category),
        "--make",
        str(tmp_path / "mvtec" / "widget"),
        "--size",
        "40",
        "--counts",
        "3",
        "1",
        "1",
    ]
    assert peak_memory.main([*argv, "--configs"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line == (
        f"error: ROOT {category} already exists and is not empty: benchmarks/peak_memory.py --make fills "
        "only a new or empty folder; give another name, or remove it"
    )
    assert {p: p.read_bytes() for p in category.rglob("*.png")} == before


def test_make_writes_the_whole_category_or_nothing(tmp_path: Path, capsys):
    """A disk that fills while ROOT is written (``ulimit -f`` stands for it) leaves no ROOT, nor a
    half-written one beside it, and names ROOT."""
    source = make_mvtec_category(tmp_path / "mvtec", n_train=3, n_good=1, n_bad=1, size=32) / "widget"
    root = tmp_path / "large"
    with file_size_limit(100):
        assert peak_memory.main([str(root), "--make", str(source), "--size", "40", "--configs"]) == 2
    assert capsys.readouterr().err == f"error: cannot read or write {root}: File too large\n"
    assert sorted(os.listdir(tmp_path)) == ["mvtec"]
    peak_memory.make_category(root, source, 40, 4, 1, 1)
    assert sorted(os.listdir(tmp_path)) == ["large", "mvtec"]
    assert len(peak_memory.images_in(root)) == 6


def test_every_other_round_runs_the_methods_the_other_way_round(tmp_path: Path, monkeypatch, capsys):
    """No method always goes first: the machine's speed drifts within a round."""
    monkeypatch.setattr(peak_memory, "measure_config", measured)
    (tmp_path / "category" / "normal").mkdir(parents=True)
    out = tmp_path / "peak.json"
    argv = [
        str(tmp_path / "category"),
        "--configs",
        "paper",
        "recommended",
        "--rounds",
        "3",
        "--out",
        str(out),
    ]
    assert peak_memory.main(argv) == 0
    methods = [r["method"] for r in json.loads(out.read_text())["results"]]
    forward, backward = ["ours: paper", "ours: recommended"], ["ours: recommended", "ours: paper"]
    assert methods == forward + backward + forward
    assert peak_memory.round_order(["paper"], ["anomalib DFM"], 1) == [
        ("peer", "anomalib DFM"),
        ("config", "paper"),
    ]
