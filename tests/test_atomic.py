"""Files are replaced whole, with the permissions a plain ``open`` would give them."""

from __future__ import annotations

import ast
import json
import os
import stat
import sys
from pathlib import Path

import numpy as np
import pytest

from anomaly.atomic import built_whole, open_atomically, replaced_atomically
from anomaly.data.store import EntryFolder, write_entry
from anomaly.evaluation.results import write_atomic
from tests.test_outputs import file_size_limit


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_new_files_get_the_permissions_of_open(tmp_path: Path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    write_atomic(tmp_path / "results.json", "{}")
    write_entry(tmp_path / "cache" / "entry.feat", "image", "identity", [np.zeros(3, np.float32)])
    assert mode(tmp_path / "results.json") == mode(plain) == 0o666 & ~current_umask()
    assert mode(tmp_path / "cache" / "entry.feat") == mode(plain)


def test_failure_leaves_the_old_file_and_no_temporary(tmp_path: Path):
    target = tmp_path / "scores.csv"
    target.write_text("old")
    with pytest.raises(RuntimeError), replaced_atomically(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["scores.csv"]


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_text_file_appears_only_when_complete(tmp_path: Path):
    log = tmp_path / "run.log"
    log.write_text("the earlier run's log\n")
    with open_atomically(log) as file:
        file.write("first line\n")
        file.flush()
        assert log.read_text() == "the earlier run's log\n"  # the new one is still beside it
    assert log.read_text() == "first line\n" and os.listdir(tmp_path) == ["run.log"]
    with pytest.raises(KeyboardInterrupt), open_atomically(log) as file:
        file.write("half")
        raise KeyboardInterrupt
    assert log.read_text() == "first line\n" and os.listdir(tmp_path) == ["run.log"]


def test_a_folder_is_built_whole_or_not_at_all(tmp_path: Path):
    target = tmp_path / "dataset"
    with pytest.raises(RuntimeError), built_whole(target) as building:
        (building / "normal").mkdir()
        (building / "normal" / "0000.png").write_bytes(b"image")
        assert not target.exists()
        raise RuntimeError("source unreadable")
    assert os.listdir(tmp_path) == []  # neither the folder nor its temporary
    target.mkdir()  # an empty folder is filled
    with built_whole(target) as building:
        (building / "normal").mkdir()
        (building / "normal" / "0000.png").write_bytes(b"image")
    assert os.listdir(tmp_path) == ["dataset"] and (target / "normal" / "0000.png").read_bytes() == b"image"
    assert mode(target) == 0o777 & ~current_umask()
    with pytest.raises(OSError) as error, built_whole(target) as building:  # never into a full folder
        (building / "other").write_text("x")
    assert error.value.filename == str(target) and os.listdir(target) == ["normal"]
    assert os.listdir(tmp_path) == ["dataset"]


def test_a_cache_identity_is_never_left_half_written(tmp_path: Path):
    """A disk that fills while ``identity.json`` is written leaves none (a later run writes it whole),
    not a truncated one that every later run would keep."""
    identity = {"backbone": "efficientnet-lite0", "image_size": 224, "levels": list(range(1, 10))}
    with file_size_limit(20), pytest.warns(UserWarning, match="cannot be written"):
        first = EntryFolder(tmp_path, identity, ".feat", "feature cache")
    assert not (first.path / "identity.json").exists() and os.listdir(first.path) == []
    later = EntryFolder(tmp_path, identity, ".feat", "feature cache")
    assert json.loads((later.path / "identity.json").read_text()) == identity


# ------------------------------------------------- no file written past the atomic writer
REPO = Path(__file__).resolve().parent.parent
#: Context managers under which a write is whole (or private to the process).
WRITTEN_WHOLE = {"replaced_atomically", "open_atomically", "built_whole", "TemporaryDirectory"}
#: Functions that write only into a folder that :func:`built_whole` fills (or a kernel control file).
WRITE_INSIDE = {
    ("anomaly/data/demo.py", "build_demo_dataset"),  # into ensure_demo_dataset's built_whole
    ("benchmarks/long_strips.py", "write_strips"),  # into build's built_whole
    ("benchmarks/compare_peers.py", "reset_peak_rss"),  # /proc/self/clear_refs
}


def called(node: ast.AST) -> str | None:
    """``f`` of ``f(...)`` or of ``x.f(...)``."""
    return node.id if isinstance(node, ast.Name) else getattr(node, "attr", None)


def written_path(call: ast.Call) -> ast.AST | None:
    """The path that ``call`` writes a file to, where it is one of the ways a file is written."""
    func, args, receiver = call.func, call.args, getattr(call.func, "value", None)
    name, owner = called(func), called(receiver)
    mode = next((k.value for k in call.keywords if k.arg == "mode"), None)
    if name in ("write_text", "write_bytes"):
        return receiver
    if name == "open":  # open(path, mode) or path.open(mode)
        at = 0 if receiver is not None else 1
        mode = mode or (args[at] if len(args) > at else None)
        if isinstance(mode, ast.Constant) and set(str(mode.value)) & set("wax"):
            return receiver if receiver is not None else args[0]
    if (owner, name) in (("torch", "save"), (None, "save_file")) and len(args) > 1:
        return args[1]
    if (owner, name) in (("np", "save"), ("cv2", "imwrite")) or name == "savefig":
        return args[0] if args else None
    if name == "save" and isinstance(receiver, ast.Call) and called(receiver.func) == "fromarray":
        return args[0] if args else None  # Image.fromarray(...).save(path)
    return None


def stray_writes(path: Path) -> list[str]:
    """``file:line`` of every file write in ``path`` that is not made whole by the atomic writer."""
    relative = str(path.relative_to(REPO))
    tree = ast.parse(path.read_text(), relative)
    whole: set[int] = set()
    for node in ast.walk(tree):
        inside_function = isinstance(node, ast.FunctionDef) and (relative, node.name) in WRITE_INSIDE
        guarded = isinstance(node, ast.With) and any(
            isinstance(item.context_expr, ast.Call) and called(item.context_expr.func) in WRITTEN_WHOLE
            for item in node.items
        )
        if inside_function or guarded:
            whole |= {id(inner) for inner in ast.walk(node)}
    stray = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and id(node) not in whole:
            target = written_path(node)
            if target is not None and not (isinstance(target, ast.Name) and target.id in ("tmp", "buffer")):
                stray.append(f"{relative}:{node.lineno}")
    return stray


def test_every_file_is_written_through_the_atomic_writer():
    """The package and the benchmark scripts write files only through :mod:`anomaly.atomic` (a
    temporary file or folder renamed into place), into a buffer, or into a temporary folder."""
    sources = [*REPO.glob("anomaly/**/*.py"), *REPO.glob("benchmarks/*.py"), *REPO.glob("*.py")]
    assert len(sources) > 100
    assert [where for path in sorted(sources) for where in stray_writes(path)] == []


def test_the_check_of_writes_sees_each_way_of_writing_a_file(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    script = tmp_path / "script.py"
    script.write_text(
        "out.write_text(text)\nopen(out, 'w')\nout.open(mode='a')\ntorch.save(data, out)\n"
        "np.save(out, array)\ncv2.imwrite(out, image)\nImage.fromarray(a).save(out)\nfigure.savefig(out)\n"
        "open(out)\nout.open()\nImage.fromarray(a).save(buffer)\ntmp.write_bytes(data)\nsave(image, out)\n"
        "with replaced_atomically(out) as written:\n    written.write_text(text)\n"
    )
    assert stray_writes(script) == [f"script.py:{line}" for line in range(1, 9)]
