"""``python -m explainkit``: the command line, built from one module per command.

Each module in :data:`COMMANDS` exposes ``add_parser(subparsers)`` (its flags; shared groups come
from :mod:`explainkit.cli.flags`) and ``run(args) -> exit code``. User errors
(:class:`~explainkit.errors.ExplainkitError`) print one line and exit with 2;
``EXPLAINKIT_DEBUG=1`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
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
    _plugin_commands(subparsers)
    return parser


def _plugin_commands(subparsers: argparse._SubParsersAction) -> None:
    """Commands plugins add through the ``register_commands`` hook; a plugin that fails is skipped
    with one warning naming it, as for explainers."""
    from explainkit.plugins import plugin_manager

    for impl in plugin_manager().hook.register_commands.get_hookimpls():
        taken = set(subparsers.choices)
        try:
            impl.function(subparsers=subparsers)
        except argparse.ArgumentError as error:  # a name already taken
            warnings.warn(
                f"explainkit plugin {impl.plugin_name!r}: its command was skipped: {error}", RuntimeWarning, stacklevel=2
            )
        except Exception as error:  # noqa: BLE001 - one plugin's failure stays its own
            warnings.warn(
                f"explainkit plugin {impl.plugin_name!r}: register_commands raised {type(error).__name__}: {error}",
                RuntimeWarning,
                stacklevel=2,
            )
        for name in set(subparsers.choices) - taken:
            if "run" not in subparsers.choices[name]._defaults:
                subparsers.choices[name].set_defaults(run=functools.partial(_no_run, name, impl.plugin_name))


def _no_run(name: str, plugin: str, args: argparse.Namespace) -> int:
    raise ExplainkitError(f"command {name!r} of plugin {plugin!r} sets no run function (parser.set_defaults(run=...))")


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ARG001 - warnings' signature
    print(f"explainkit: warning: {message}", file=file or sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = bool(os.environ.get("EXPLAINKIT_DEBUG"))
    with warnings.catch_warnings():  # the filter and the one-line format last for this call only
        if not debug:
            warnings.filterwarnings("ignore", category=UserWarning)
            warnings.showwarning = _one_line_warning
        return _run(args, debug, flag_names(parser, args.command))


# Library parameters whose name is not the flag's argparse dest.
PARAMETER_FLAGS = {"spec": "--model"}


def flag_names(parser: argparse.ArgumentParser, command: str) -> dict[str, str]:
    """``{dest: flag}`` for the command's flags (its first long spelling), plus :data:`PARAMETER_FLAGS`."""
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    flags = {
        action.dest: next(o for o in action.option_strings if o.startswith("--"))
        for action in subparsers.choices[command]._actions
        if any(o.startswith("--") for o in action.option_strings) and action.dest != "help"
    }
    return {**PARAMETER_FLAGS, **flags}


def speak_flags(message: str, flags: dict[str, str]) -> str:
    """The library names parameters as ``name=`` (``lr=0: must be positive``); the CLI shows the
    flag (``--lr 0: must be positive``; switches: ``resume=False`` is ``no --resume``)."""
    if not flags:
        return message
    pattern = re.compile(
        r"(?<![\w.-])(" + "|".join(map(re.escape, sorted(flags, key=len, reverse=True))) + r")=(True\b|False\b|\S?)"
    )

    def flag(match: re.Match) -> str:
        name, value = flags[match.group(1)], match.group(2)
        if value in ("True", "False"):  # a switch: resume=True is --resume, resume=False no --resume
            return name if value == "True" else f"no {name}"
        return f"{name} {value}" if value else name

    return pattern.sub(flag, message)


def _run(args: argparse.Namespace, debug: bool, flags: dict[str, str]) -> int:
    try:
        return int(args.run(args))
    except ExplainkitError as exc:
        if debug:
            raise
        print(f"explainkit {args.command}: error: {speak_flags(str(exc), flags)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"explainkit {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `explainkit methods | head`: the reader left; not an error of ours
        # Point stdout at devnull so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as exc:  # a bug: still one line, with a way to see more
        if debug:
            raise
        print(
            f"explainkit {args.command}: internal error: {type(exc).__name__}: {exc} "
            "(rerun with EXPLAINKIT_DEBUG=1 for the traceback, and please report it)",
            file=sys.stderr,
        )
        return 1
