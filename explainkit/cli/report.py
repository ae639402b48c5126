"""``explainkit report``: rebuild report.html from an output folder."""

from __future__ import annotations

import argparse

from explainkit.jobs.report import write_report


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("report", help="rebuild DIR/report.html from the explain, evaluate and train outputs in DIR")
    parser.add_argument("dir", metavar="DIR", help="an output folder of explain, evaluate or train")
    parser.add_argument("--out", help="where to write the page (default DIR/report.html)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    print(write_report(args.dir, args.out))
    return 0
