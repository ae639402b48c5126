"""``python -m explainkit``: the command line, built from one module per command.

Each module in :data:`COMMANDS` exposes ``add_parser(subparsers)`` (its flags; shared groups come
from :mod:`explainkit.cli.flags`) and ``run(args) -> exit code``. User errors
(:class:`~explainkit.errors.ExplainkitError`) print one line and exit with 2;
``EXPLAINKIT_DEBUG=1`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from types import ModuleType
from typing import Sequence

from explainkit.cli import evaluate, explain, layers, lr_find, methods, plugins, report, serve, train
from explainkit.errors import ExplainkitError

#: the commands, in the order ``--help`` lists them
COMMANDS: tuple[ModuleType, ...] = (explain, train, lr_find, evaluate, layers, serve, report, methods, plugins)


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error on one line (exit 2) instead of usage + error, and
    never abbreviates flags (``--model`` must not silently mean ``--models-dir``)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="explainkit", description="Which parts of an image drive a classifier's score.")
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ARG001 - warnings' signature
    print(f"explainkit: warning: {message}", file=file or sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = bool(os.environ.get("EXPLAINKIT_DEBUG"))
    with warnings.catch_warnings():  # the filter and the one-line format last for this call only
        if not debug:
            warnings.filterwarnings("ignore", category=UserWarning)
            warnings.showwarning = _one_line_warning
        return _run(args, debug)


def _run(args: argparse.Namespace, debug: bool) -> int:
    try:
        return int(args.run(args))
    except ExplainkitError as exc:
        if debug:
            raise
        print(f"explainkit {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"explainkit {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: still one line, with a way to see more
        if debug:
            raise
        print(
            f"explainkit {args.command}: internal error: {type(exc).__name__}: {exc} "
            "(rerun with EXPLAINKIT_DEBUG=1 for the traceback, and please report it)",
            file=sys.stderr,
        )
        return 1
