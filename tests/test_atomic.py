"""Files are replaced whole, with the permissions a plain ``open`` would give them."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest

from anomaly.atomic import replaced_atomically
from anomaly.data.store import write_entry
from anomaly.evaluation.results import write_atomic


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
