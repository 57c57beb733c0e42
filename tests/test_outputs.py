"""What the commands write: never over an input, the detector or a file of another origin; maps named
after their input, overlays of bounded size; every image listed the same way by every command."""

from __future__ import annotations

import csv
import errno
import json
import os
import resource
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anomaly.console import Terminated
from anomaly.data.folder import FolderDataModule
from anomaly.data.images import collect_images
from anomaly.detector.file import claim_detector_output, detector_files
from anomaly.detector.maps import OVERLAY_SIDE, map_file_names, overlay_size
from anomaly.errors import UserError
from anomaly.export.__main__ import main as export_main
from anomaly.outputs import (
    MANIFEST,
    OutputFolder,
    claim_json,
    claim_new_folder,
    claim_output,
    starts_with,
    write_json,
)
from anomaly.pooling import build_pooling
from predict import main as predict_main
from tests.detector.helpers import fit_demo_detector


def save_image(path: Path, height: int = 40, width: int = 40, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def read_rows(path: Path) -> list[dict]:
    with open(path) as file:
        return list(csv.DictReader(file))


def one_error_line(capsys, *fragments: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert err.strip().splitlines()[-1] == line, err
    for fragment in fragments:
        assert fragment in line, line
    return line


@pytest.fixture(scope="module")
def maps_detector(tmp_path_factory) -> Path:
    """A detector with anomaly maps (pooling cells, a 2 x 2 grid) on the demo images."""
    detector = fit_demo_detector(pooling=build_pooling("cells", grid_size=2))
    return detector.save(tmp_path_factory.mktemp("maps_detector") / "detector.safetensors")


@pytest.fixture(scope="module")
def detector_file(tmp_path_factory) -> Path:
    return fit_demo_detector().save(tmp_path_factory.mktemp("detector") / "detector.safetensors")


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------ the output policy


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of an image file, closed after reading."""
    with Image.open(path) as image:
        return image.size


def test_claim_output_refuses_inputs_links_and_files_of_another_origin(tmp_path: Path):
    image = save_image(tmp_path / "x.png")
    (tmp_path / "link.png").symlink_to(image)
    os.link(image, tmp_path / "hard.png")
    ours = starts_with(b"path,score,")
    for name in ("x.png", "link.png", "hard.png"):
        with pytest.raises(UserError, match="never writes over its input"):
            claim_output(tmp_path / name, inputs=[image], ours=ours, overwrite=True)
    (tmp_path / "notes.csv").write_text("my own notes\n")
    with pytest.raises(UserError, match=r"notes\.csv already exists and was not written by"):
        claim_output(tmp_path / "notes.csv", inputs=[image], ours=ours)
    assert claim_output(tmp_path / "notes.csv", inputs=[image], ours=ours, overwrite=True).name == "notes.csv"
    (tmp_path / "earlier.csv").write_text("path,score,decision,error\n")
    assert claim_output(tmp_path / "earlier.csv", inputs=[image], ours=ours) == tmp_path / "earlier.csv"
    with pytest.raises(UserError, match="is a folder"):
        claim_output(tmp_path, ours=ours)
    with pytest.raises(UserError, match="--out is empty"):
        claim_output("", ours=ours)
    assert (tmp_path / "notes.csv").read_text() == "my own notes\n"  # claiming writes nothing


def test_an_output_folder_takes_only_what_it_wrote(tmp_path: Path):
    folder = tmp_path / "maps"
    first = OutputFolder(folder, option="--maps", command="anomaly predict --maps")
    assert first.claim(["a.npy"]) == [folder / "a.npy"]
    (folder / "a.npy").write_bytes(b"map")
    again = OutputFolder(folder, option="--maps", command="anomaly predict --maps")
    assert again.claim(["a.npy", "b.npy"]) == [folder / "a.npy", folder / "b.npy"]  # a rerun: its own files
    (folder / "c.npy").write_bytes(b"the user's")
    with pytest.raises(UserError, match=r"c\.npy already exists and was not written by"):
        again.claim(["c.npy"])
    assert json.loads((folder / MANIFEST).read_text())["files"] == ["a.npy", "b.npy"]
    with pytest.raises(UserError, match="holds files that anomaly predict --maps did not write"):
        OutputFolder(tmp_path, option="--maps", command="anomaly predict --maps")  # maps/ is not listed


def test_a_json_result_is_replaced_only_by_the_command_that_wrote_it(tmp_path: Path):
    out = tmp_path / "results.json"
    assert claim_json(out, command="bench a") == out and not out.exists()
    write_json(out, {"results": [1]}, command="bench a")
    assert json.loads(out.read_text()) == {"written_by": "bench a", "results": [1]}
    assert claim_json(out, command="bench a") == out  # a rerun replaces its own result
    for command in ("bench b", "bench"):  # another script's result, or a prefix of its name
        with pytest.raises(UserError, match="already exists and was not written by bench"):
            claim_json(out, command=command)
    notes = tmp_path / "notes.json"
    notes.write_text('{\n  "results": []\n}\n')
    with pytest.raises(UserError, match="give another name, or --overwrite to replace it"):
        claim_json(notes, command="bench a")
    assert claim_json(notes, command="bench a", overwrite=True) == notes
    with pytest.raises(UserError, match="never writes over its input"):
        claim_json(out, command="bench a", inputs=[out], overwrite=True)


def test_a_folder_filled_whole_must_be_new_or_empty(tmp_path: Path):
    kw = {"option": "--out", "command": "bench build"}
    assert claim_new_folder(tmp_path / "new", **kw) == tmp_path / "new"
    (tmp_path / "empty").mkdir()
    assert claim_new_folder(tmp_path / "empty", **kw) == tmp_path / "empty"
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.png").write_bytes(b"x")
    with pytest.raises(UserError, match="already exists and is not empty: bench build fills only a new"):
        claim_new_folder(tmp_path / "full", **kw)
    with pytest.raises(UserError, match="is a file, not a folder"):
        claim_new_folder(tmp_path / "full" / "mine.png", **kw)
    with pytest.raises(UserError, match=r"mine\.png is a file, not a folder: give a path in a folder"):
        claim_new_folder(tmp_path / "full" / "mine.png" / "below", **kw)
    assert os.listdir(tmp_path / "full") == ["mine.png"]


# ---------------------------------------------------------------------- [1], [2]
@pytest.fixture
def colliding_inputs(tmp_path: Path) -> Path:
    """Inputs whose map files collided: a/x.png beside a__x.png; x.png, x.jpg and x.png.png (each its
    own size)."""
    folder = tmp_path / "in"
    names = ["a/x.png", "a__x.png", "x.png", "x.jpg", "x.png.png"]
    for k, name in enumerate(names):
        save_image(folder / name, height=30 + 4 * k, width=50 - 3 * k, seed=k)
    return folder


def test_map_names_are_unique_by_construction():
    """[2]: ``a/x.png`` and ``a__x.png``, and ``x.png``, ``x.jpg``, ``x.png.png``, got the same map file."""
    names = map_file_names(
        [Path("/in") / name for name in ("a/x.png", "a__x.png", "x.png", "x.jpg", "x.png.png")]
    )
    assert names == ["a%2Fx.png", "a__x.png", "x.png", "x.jpg", "x.png.png"]
    escaped = map_file_names([Path("/in/100%/x.png"), Path("/in/100%2Fx.png")])
    assert escaped == ["100%25%2Fx.png", "100%252Fx.png"]
    deep = [Path("/in") / ("d" * 100) / ("e" * 100) / f"{'f' * 100}{k}.png" for k in range(2)]
    long_names = map_file_names(deep)
    assert len(set(long_names)) == 2
    assert all(len(name.encode()) <= 255 - len(".overlay.png") for name in long_names)


def test_maps_of_inputs_with_colliding_names_each_get_their_own_file(
    maps_detector: Path, colliding_inputs: Path, tmp_path: Path
):
    """[2]: map files of different inputs overwrote each other; the CSV now names each row's files."""
    out, maps = tmp_path / "scores.csv", tmp_path / "maps"
    args = ["--detector", str(maps_detector), "--input", str(colliding_inputs), "--out", str(out)]
    assert predict_main([*args, "--maps", str(maps), "--no-progress"]) == 0
    rows = read_rows(out)
    assert len(rows) == 5 and len({row["map_file"] for row in rows}) == 5
    assert len(list(maps.glob("*.map.npy"))) == len(list(maps.glob("*.overlay.png"))) == 5
    for row in rows:
        width, height = image_size(row["path"])
        assert np.load(row["map_file"]).shape == (height, width), row  # the row's own map
        assert image_size(row["overlay_file"]) == (width, height)
    assert Path(rows[0]["map_file"]).name == "a%2Fx.png.map.npy"


def test_maps_into_the_input_folder_are_refused_and_the_images_stay(
    maps_detector: Path, tmp_path: Path, capsys
):
    """[1]: ``--maps in`` replaced ``in/x.png`` with its overlay, exit 0."""
    folder = tmp_path / "in"
    save_image(folder / "x.png")
    before = snapshot(folder)
    args = ["--detector", str(maps_detector), "--input", str(folder), "--maps", str(folder), "--no-progress"]
    assert predict_main(args) == 2
    one_error_line(capsys, f"--maps {folder} holds files that anomaly predict --maps did not write", "x.png")
    assert snapshot(folder) == before


def test_a_rerun_with_maps_inside_the_input_does_not_score_its_own_overlays(
    maps_detector: Path, colliding_inputs: Path, tmp_path: Path
):
    """[minor]: a second run listed the first run's overlays as input images."""
    maps, out = colliding_inputs / "maps", tmp_path / "scores.csv"
    args = ["--detector", str(maps_detector), "--input", str(colliding_inputs), "--out", str(out)]
    for _ in range(2):
        assert predict_main([*args, "--maps", str(maps), "--no-progress"]) == 0
        rows = read_rows(out)
        assert len(rows) == 5 and not any("maps" in Path(row["path"]).parts for row in rows)
    pngs = f"{colliding_inputs}/**/*.png"
    assert (
        predict_main(["--detector", str(maps_detector), "--input", pngs, "--out", str(out), "--no-progress"])
        == 0
    )
    assert len(read_rows(out)) == 4  # the PNGs, not the overlays


# ------------------------------------------------------------------------- [11]
def test_overlay_size_is_bounded_and_keeps_the_aspect():
    assert overlay_size(20000, 20) == (OVERLAY_SIDE, 1)
    assert overlay_size(20, 20000) == (1, OVERLAY_SIDE)
    assert overlay_size(900, 600) == (900, 600)
    assert overlay_size(3000, 2000) == (OVERLAY_SIDE, 683)


def test_degenerate_images_get_bounded_overlays_and_their_rows(maps_detector: Path, tmp_path: Path):
    """[11]: a 20 x 20000 image made a 160-megapixel overlay (12.6 GB); its 20000 x 20 twin stopped the
    run."""
    folder = tmp_path / "in"
    save_image(folder / "tall.png", height=20000, width=20)
    save_image(folder / "wide.png", height=20, width=20000)
    out, maps = tmp_path / "scores.csv", tmp_path / "maps"
    args = ["--detector", str(maps_detector), "--input", str(folder), "--out", str(out), "--maps", str(maps)]
    assert predict_main([*args, "--no-progress"]) == 0
    rows = {Path(row["path"]).name: row for row in read_rows(out)}
    assert set(rows) == {"tall.png", "wide.png"} and all(row["score"] for row in rows.values())
    assert image_size(rows["tall.png"]["overlay_file"]) == (1, OVERLAY_SIDE)
    assert image_size(rows["wide.png"]["overlay_file"]) == (OVERLAY_SIDE, 1)
    assert np.load(rows["wide.png"]["map_file"]).shape == (20, 20000)


# ---------------------------------------------------------------- [3], [4], [5]
def test_predict_never_writes_over_the_detector_or_an_input(detector_file: Path, tmp_path: Path, capsys):
    """[3]: ``--out`` the detector (or the input image) replaced it with the CSV, exit 0."""
    image = save_image(tmp_path / "img.png")
    json_copy = detector_file.with_suffix(".json")
    before = {path: path.read_bytes() for path in (detector_file, json_copy, image)}
    for out in before:
        args = ["--detector", str(detector_file), "--input", str(image), "--out", str(out), "--no-progress"]
        assert predict_main([*args, "--overwrite"]) == 2
        one_error_line(capsys, f"--out {out} is an input of anomaly predict")
    assert {path: path.read_bytes() for path in before} == before


def test_export_never_writes_over_the_detector(detector_file: Path, capsys):
    """[3]: ``anomaly export --out`` the detector replaced it."""
    before = detector_file.read_bytes()
    assert export_main(["--detector", str(detector_file), "--out", str(detector_file), "--overwrite"]) == 2
    one_error_line(
        capsys, f"--out {detector_file} is an input of anomaly export", "never writes over its input"
    )
    assert detector_file.read_bytes() == before


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_refuses_a_folder_or_a_file_of_another_origin(
    detector_file: Path, tmp_path: Path, capsys, fmt
):
    """[5]: TorchScript onto a folder printed a raw RuntimeError traceback."""
    assert export_main(["--detector", str(detector_file), "--format", fmt, "--out", str(tmp_path)]) == 2
    one_error_line(capsys, f"--out {tmp_path} is a folder")
    notes = tmp_path / "notes.txt"
    notes.write_text("the user's")
    assert export_main(["--detector", str(detector_file), "--format", fmt, "--out", str(notes)]) == 2
    one_error_line(capsys, "already exists and was not written by anomaly export", "--overwrite")
    assert notes.read_text() == "the user's"


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("stop", [KeyboardInterrupt(), Terminated()], ids=["ctrl-c", "sigterm"])
def test_an_interrupted_export_keeps_the_earlier_one(
    detector_file: Path, tmp_path: Path, monkeypatch, fmt, stop
):
    """[4]: an interrupt while the file was written left an empty file, or an ONNX model without the
    detector's metadata, in place of the earlier export."""
    pytest.importorskip("onnx")
    out = tmp_path / f"detector.{'onnx' if fmt == 'onnx' else 'pt'}"
    args = ["--detector", str(detector_file), "--format", fmt, "--out", str(out)]
    assert export_main(args) == 0
    earlier = out.read_bytes()
    if fmt == "onnx":  # once the graph is written, while its metadata are added
        monkeypatch.setattr("anomaly.export.onnx.json.dumps", raising(stop))
    else:  # while the archive is written
        save = torch.jit.save

        def half_then_stop(module, target, **kwargs):
            save(module, target, **kwargs)
            if isinstance(target, str):
                Path(target).write_bytes(Path(target).read_bytes()[:100])
            raise stop

        monkeypatch.setattr("anomaly.export.torchscript.torch.jit.save", half_then_stop)
    assert export_main(args) == (130 if isinstance(stop, KeyboardInterrupt) else 143)
    assert out.read_bytes() == earlier
    assert sorted(tmp_path.iterdir()) == [out]  # no temporary file left


def raising(error: BaseException):
    def fail(*args, **kwargs):
        raise error

    return fail


@contextmanager
def file_size_limit(size: int):
    """``ulimit -f`` in this process while the block runs: a file growing past ``size`` bytes is an
    ``OSError`` (EFBIG; Python ignores SIGXFSZ), as on a full disk."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_onto_a_full_disk_is_one_line_naming_the_file(
    detector_file: Path, tmp_path: Path, capsys, fmt
):
    """[4], [5]: TorchScript onto a full disk aborted the process (SIGABRT, a C++ stack: here, the test
    run itself) and both formats left a truncated file. ``ulimit -f`` stands for the full disk."""
    if fmt == "onnx":
        pytest.importorskip("onnx")
    out = tmp_path / f"d.{fmt}"
    with file_size_limit(50_000):
        code = export_main(["--detector", str(detector_file), "--format", fmt, "--out", str(out)])
    assert code == 2
    assert one_error_line(capsys) == f"error: cannot read or write {out}: File too large"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="permissions (root may write anywhere)")
def test_export_into_a_read_only_folder_is_one_line(detector_file: Path, tmp_path: Path, capsys):
    """[5]: TorchScript into a read-only folder printed a raw RuntimeError traceback."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        out = folder / "d.pt"
        args = ["--detector", str(detector_file), "--format", "torchscript", "--out", str(out)]
        assert export_main(args) == 2
        one_error_line(capsys, f"cannot read or write {out}")
    finally:
        folder.chmod(0o755)


# ------------------------------------------------------------- [minor] files whole
def test_a_full_disk_while_writing_maps_names_the_file_and_leaves_no_empty_map(
    maps_detector: Path, tmp_path: Path, monkeypatch, capsys
):
    """[minor]: the full-disk message named no file, and ``--maps`` left a 0-byte ``.npy``."""
    folder = tmp_path / "in"
    save_image(folder / "x.png")
    write_bytes = Path.write_bytes

    def full_disk(self, data):
        if not self.name.startswith(".x.png.map.npy."):  # the map's temporary file
            return write_bytes(self, data)
        write_bytes(self, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    maps = tmp_path / "maps"
    args = ["--detector", str(maps_detector), "--input", str(folder), "--maps", str(maps), "--no-progress"]
    assert predict_main([*args, "--out", str(tmp_path / "scores.csv")]) == 2
    one_error_line(capsys, f"cannot read or write {maps}/x.png.map.npy: No space left on device")
    assert [p.name for p in maps.iterdir()] == [MANIFEST]  # no map, whole or empty
    assert not (tmp_path / "scores.csv").exists()


def test_a_full_disk_while_writing_the_csv_names_the_file(
    detector_file: Path, tmp_path: Path, monkeypatch, capsys
):
    """[minor]: ``error: cannot read or write: No space left on device`` named no file."""
    import anomaly.commands.predict as command

    class FullDisk:
        def __init__(self, file) -> None:
            self.file = file

        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def flush(self):
            pass

    named = command.NamedFile
    monkeypatch.setattr(command, "NamedFile", lambda file, path: named(FullDisk(file), path))
    out = tmp_path / "scores.csv"
    image = save_image(tmp_path / "x.png")
    assert predict_main(["--detector", str(detector_file), "--input", str(image), "--out", str(out)]) == 2
    one_error_line(capsys, f"cannot read or write {out}: No space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]


def test_a_successful_rerun_removes_the_partial_rows_of_an_interrupted_one(
    detector_file: Path, tmp_path: Path
):
    """[minor]: ``out.csv.partial`` of an interrupted run stayed beside the complete result."""
    out = tmp_path / "out.csv"
    partial = tmp_path / "out.csv.partial"
    partial.write_text("path,score,mahalanobis_2,mahalanobis_4,decision,error\nx.png,1,1,1,0,\n")
    image = save_image(tmp_path / "x.png")
    assert predict_main(["--detector", str(detector_file), "--input", str(image), "--out", str(out)]) == 0
    assert out.is_file() and not partial.exists()


# --------------------------------------------------------- [7], [8], [9], [10]
@pytest.mark.skipif(os.name != "posix", reason="symbolic links")
def test_folders_follow_symbolic_links_and_report_loops(tmp_path: Path):
    """[7]: ``predict --input DIR`` skipped a symlinked subfolder that ``DIR/**/*.png`` scored."""
    elsewhere = tmp_path / "elsewhere"
    save_image(elsewhere / "linked.png")
    folder = tmp_path / "in"
    save_image(folder / "own.png")
    (folder / "link").symlink_to(elsewhere, target_is_directory=True)
    (folder / "loop").symlink_to(folder, target_is_directory=True)
    with pytest.warns(UserWarning, match=r"1 symbolic link loop \(e.g. loop\)"):
        images = collect_images(folder)
    assert images == [folder / "link" / "linked.png", folder / "own.png"]


def test_an_unreadable_folder_is_reported(tmp_path: Path, monkeypatch):
    """[8]: an unreadable subfolder was dropped without a word."""
    folder = tmp_path / "in"
    save_image(folder / "a.png")
    save_image(folder / "locked" / "b.png")
    iterdir = Path.iterdir

    def locked(self):
        if self.name == "locked":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return iterdir(self)

    monkeypatch.setattr(Path, "iterdir", locked)
    with pytest.warns(UserWarning, match=r"1 unreadable folder \(Permission denied\) \(e.g. locked\)"):
        assert collect_images(folder) == [folder / "a.png"]


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="permissions (root reads anything)")
def test_a_folder_without_read_permission_is_reported(tmp_path: Path):
    """[8], with real permissions."""
    folder = tmp_path / "in"
    save_image(folder / "a.png")
    save_image(folder / "locked" / "b.png")
    (folder / "locked").chmod(0)
    try:
        with pytest.warns(UserWarning, match="unreadable folder"):
            assert collect_images(folder) == [folder / "a.png"]
    finally:
        (folder / "locked").chmod(0o755)


def test_fit_lists_a_folder_as_predict_does(tmp_path: Path):
    """[9]: ``anomaly fit --data.root normal`` ignored images in subfolders, which ``predict`` scored;
    test folders and masks nested in the normal folder stay theirs."""
    root = tmp_path / "normal"
    normals = ["a.png", "line2/b.png", "line2/deep/c.png"]
    for k, name in enumerate([*normals, "test/scratch/d.png", "masks/d.png"]):
        save_image(root / name, seed=k)
    data = FolderDataModule(root=str(root), test_dirs=["test/*"], masks="masks", test_normal_fraction=0.0)
    train, test = data.scan()
    assert sorted(Path(s.path).relative_to(root).as_posix() for s in train) == normals
    assert [Path(s.path).name for s in test] == ["d.png"] and test[0].mask == str(root / "masks" / "d.png")
    listed = collect_images(root, leave_out=[root / "test", root / "masks"])
    assert sorted(map(str, listed)) == sorted(s.path for s in train)


def test_an_empty_input_is_refused(detector_file: Path, tmp_path: Path, monkeypatch, capsys):
    """[10]: ``--input ''`` (an unset ``$DIR``) scored the whole working directory, exit 0."""
    save_image(tmp_path / "here.png")
    monkeypatch.chdir(tmp_path)
    assert predict_main(["--detector", str(detector_file), "--input", "", "--out", "s.csv"]) == 2
    one_error_line(capsys, "--input is empty (an unset variable?)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here.png"]


def test_a_glob_of_folders_hints_at_double_star(tmp_path: Path):
    """[minor]: a glob that matched only folders said nothing about ``**``."""
    save_image(tmp_path / "in" / "a" / "x.png")
    with pytest.raises(UserError, match=r"matches only folders .*use \*\* to search inside them"):
        collect_images(f"{tmp_path}/in/*")
    assert collect_images(f"{tmp_path}/in/**/*.png") == [tmp_path / "in" / "a" / "x.png"]


def test_the_csv_may_go_into_the_maps_folder(maps_detector: Path, tmp_path: Path):
    image = save_image(tmp_path / "in" / "x.png")
    maps = tmp_path / "maps"
    args = ["--detector", str(maps_detector), "--input", str(image), "--maps", str(maps), "--no-progress"]
    for _ in range(2):  # and a rerun replaces both
        assert predict_main([*args, "--out", str(maps / "scores.csv")]) == 0
    expected = [MANIFEST, "scores.csv", "x.png.map.npy", "x.png.overlay.png"]
    assert sorted(p.name for p in maps.iterdir()) == expected


def test_a_detector_output_is_never_an_input_and_replaces_a_file_only_when_asked(
    detector_file: Path, tmp_path: Path
):
    """For commands that save a detector: the ``.safetensors`` and its ``.json`` are claimed together."""
    inputs = detector_files(detector_file)
    with pytest.raises(UserError, match="is an input of anomaly update"):
        claim_detector_output(detector_file, inputs=inputs, overwrite=True, command="anomaly update")
    earlier = fit_demo_detector().save(tmp_path / "earlier.safetensors")
    with pytest.raises(UserError, match=r"earlier\.safetensors already exists.*--overwrite"):
        claim_detector_output(earlier, inputs=inputs, command="anomaly update")
    claimed = claim_detector_output(earlier, inputs=inputs, overwrite=True, command="anomaly update")
    assert claimed == earlier
    (tmp_path / "notes.json").write_text('{"mine": 1}')
    with pytest.raises(UserError, match=r"notes\.json already exists and was not written by anomaly update"):
        claim_detector_output(tmp_path / "notes.safetensors", inputs=inputs, command="anomaly update")
    with pytest.raises(UserError, match=r"ending in \.safetensors"):
        claim_detector_output(tmp_path / "notes.txt", inputs=inputs, command="anomaly update")
