"""``explainkit plugins``: the loaded plugins as JSON."""

from __future__ import annotations

import argparse
import json

from explainkit.plugins import describe_plugins


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("plugins", help="list loaded plugins as JSON")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    print(json.dumps(describe_plugins(), indent=2))
    return 0
