"""MkDocs hook: write the CLI reference into ``cli.md`` from the argparse parsers at build time.

``docs/cli.md`` holds the marker ``<!-- cli-reference -->``; this hook replaces it with one
section per subcommand of :func:`explainkit.cli.build_parser` (found by walking the parser's
subparsers, nested ones included, so a new or renamed command appears without editing the docs):
its one-line help and its full ``--help`` text. Registered under ``hooks:`` in ``mkdocs.yml``.
"""

from __future__ import annotations

import argparse
import os
from contextlib import contextmanager
from typing import Iterator

MARKER = "<!-- cli-reference -->"
WIDTH = 80  # columns argparse wraps the help at: the same page on every machine, no scrolling


@contextmanager
def _columns(width: int) -> Iterator[None]:
    """argparse wraps at ``$COLUMNS``; pin it so the page does not depend on the terminal."""
    saved = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(width)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = saved


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """``(name, one-line help, parser)`` for each subcommand, in the parser's order (aliases once)."""
    found: list[tuple[str, str, argparse.ArgumentParser]] = []
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        formatter = parser._get_formatter()
        helps = {choice.dest: _expand(formatter, choice) for choice in action._choices_actions}
        seen: set[int] = set()
        for name, sub in action.choices.items():
            if id(sub) in seen:  # an alias of a command already listed
                continue
            seen.add(id(sub))
            found.append((name, helps.get(name, ""), sub))
    return found


def _expand(formatter: argparse.HelpFormatter, action: argparse.Action) -> str:
    """An action's help as ``--help`` prints it (``%%`` -> ``%``, ``%(default)s`` filled in)."""
    if not action.help:
        return ""
    try:
        return formatter._expand_help(action)
    except (KeyError, TypeError, ValueError):
        return action.help


def walk(
    parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()
) -> list[tuple[tuple[str, ...], str, argparse.ArgumentParser]]:
    """Every (sub)command below ``parser``, depth first: ``(path of names, help, parser)``."""
    commands = []
    for name, text, sub in _subcommands(parser):
        path = (*prefix, name)
        commands.append((path, text, sub))
        commands.extend(walk(sub, path))
    return commands


def _inline(text: str) -> str:
    """Help text as literal Markdown text (backticks kept: they read as code in the help too)."""
    for char in "\\[]*_>":
        text = text.replace(char, "\\" + char)
    return text.replace("<", "&lt;").replace("|", "&#124;")


def _fence(text: str) -> str:
    fence = "```"
    while fence in text:
        fence += "`"
    return f"{fence}text\n{text.rstrip()}\n{fence}"


def render(parser: argparse.ArgumentParser | None = None) -> str:
    """The Markdown that replaces the marker: a command table, then each command's ``--help``."""
    if parser is None:
        from explainkit.cli import build_parser

        parser = build_parser()
    commands = walk(parser)
    prog = parser.prog
    with _columns(WIDTH):
        top = parser.format_help()
        sections = [(path, text, sub.format_help()) for path, text, sub in commands]
    lines = ["| command | what it does |", "| --- | --- |"]
    for path, text, _ in sections:
        anchor = "-".join(path)
        lines.append(f"| [`{' '.join(path)}`](#{anchor}) | {_inline(text)} |")
    out = ["\n".join(lines), "", f"## `{prog}`", "", _fence(top), ""]
    for path, text, help_text in sections:
        level = "#" * min(2 + len(path) - 1, 6)
        out += [f"{level} `{prog} {' '.join(path)}` {{ #{'-'.join(path)} }}", ""]
        if text:
            out += [_inline(text[0].upper() + text[1:]) + ".", ""]
        out += [_fence(help_text), ""]
    return "\n".join(out)


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ARG001 - MkDocs' hook signature
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, render())
