"""Atomic writes and output-directory checks."""

from __future__ import annotations

import os

import pytest

from explainkit.errors import ExplainkitError
from explainkit.runtime.io import atomic_path, ensure_writable_dir, write_json


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError
    assert list(tmp_path.iterdir()) == []
    write_json(target, {"a": 1})
    assert target.read_text().strip().startswith("{") and len(list(tmp_path.iterdir())) == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere; covered by the file-as-dir case")
def test_unwritable_dir(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(ExplainkitError, match="out="):
        ensure_writable_dir(locked / "sub")


def test_out_path_that_is_a_file(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ExplainkitError, match="out=.*cannot write"):
        ensure_writable_dir(blocker / "sub")


def test_atomic_files_get_ordinary_permissions(tmp_path):
    target = tmp_path / "x.json"
    write_json(target, [])
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask
