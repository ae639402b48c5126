"""``explainkit serve``: the local web app."""

from __future__ import annotations

import argparse
import sys

from explainkit.cli.flags import (
    add_data_flag,
    add_device_flags,
    add_model_flags,
    check_spec_flags,
    load_model_from_flags,
    positive_int,
)
from explainkit.data.datasets import data_dir_from_env, load_split
from explainkit.errors import DataError
from explainkit.runtime.device import select_device


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve", help="a local web app (and API) to explore and compare explanations (needs explainkit[ui])"
    )
    add_model_flags(parser)
    add_data_flag(parser, "ImageFolder tree with test/ for the gallery (default $EXPLAINKIT_DATA_DIR; none: uploads only)")
    parser.add_argument(
        "--limit", type=positive_int, default=1000, help="test images in the gallery, evenly spaced (default 1000)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=positive_int, default=7860, help="port (default 7860)")
    add_device_flags(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    check_spec_flags(args)
    from explainkit.app.ui import _gradio, launch
    from explainkit.app.workbench import Workbench

    _gradio()  # a missing extra fails before the model loads
    device = select_device(args.device)
    model = load_model_from_flags(args, device)
    bench = Workbench(model, device)
    if bench.task != "classify":  # the test-split gallery shows a classifier's predictions
        print(f"explainkit serve: a {bench.task} model: upload images in the page (no test-split gallery)", file=sys.stderr)
    elif data_dir_from_env(args.data_dir) is not None:
        split = load_split("test", bench.card, args.data_dir, download=False)
        count = bench.add_dataset(split, args.limit, args.batch_size)
        print(f"explainkit serve: {count} test images predicted for the gallery", file=sys.stderr)
    elif args.model is None:
        try:
            split = load_split("test", bench.card, None, download=False)
            bench.add_dataset(split, args.limit, args.batch_size)
        except DataError:
            print("explainkit serve: no test data (--data-dir); upload images in the page", file=sys.stderr)
    launch(bench, args.host, args.port)
    return 0
