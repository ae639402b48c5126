"""Where a run's outputs came from: versions, the command, the model file's hash, the time."""

from __future__ import annotations

import hashlib
import platform
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


def sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def command_line(argv: list[str] | None = None) -> str:
    """The command as typed: ``python -m explainkit explain ...`` (``sys.argv[0]`` is a file path)."""
    args = list(sys.argv if argv is None else argv)
    if args and Path(args[0]).name in ("__main__.py", "explainkit"):
        return "python -m explainkit " + shlex.join(args[1:])
    return shlex.join(args)


def provenance(model_file: str | Path | None = None) -> dict[str, Any]:
    """``explainkit``/``torch``/Python versions, every loaded plugin's distribution and version,
    the command, the model file's sha256 (when it is a file) and the UTC time."""
    import torch

    from explainkit._version import __version__
    from explainkit.plugins import describe_plugins

    record: dict[str, Any] = {
        "explainkit": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "plugins": {p["name"]: f"{p['distribution']} {p['version']}".strip() for p in describe_plugins()},
        "command": command_line(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if model_file is not None and Path(model_file).is_file():
        record["model_sha256"] = sha256(model_file)
    return record
