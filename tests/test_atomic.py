"""Files are replaced whole, with the permissions a plain ``open`` would give them."""

from __future__ import annotations

import json
import os
import stat
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
