"""Atomic file writes: a temp file in the destination folder, then ``os.replace``.

A crash or a full disk never leaves a half-written output under its final name.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from explainkit.errors import ExplainkitError


def _file_mode() -> int:
    """0o666 less the process umask: what ``open()`` would have created (mkstemp uses 0o600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it is renamed onto ``path`` if the block succeeds."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + path.suffix)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, _file_mode())
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_json(path: str | Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def ensure_writable_dir(path: str | Path, parameter: str = "out") -> Path:
    """Create ``path`` if needed and check that files can be written there; clear error if not."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".explainkit-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ExplainkitError(f"{parameter}={path}: cannot write there: {exc.strerror or exc}") from None
    return path
