"""``explainkit serve``: the local web app."""

from __future__ import annotations

import argparse
import sys

from explainkit.cli.flags import add_spec_flags, check_spec_flags, load_spec_model
from explainkit.data.datasets import data_dir_from_env, load_split
from explainkit.errors import DataError
from explainkit.models.store import load_model, require_model_path
from explainkit.runtime.device import select_device


def add_serve_parser(sub, positive_int, device_choices) -> None:
    serve = sub.add_parser("serve", help="a local web app to explore and compare explanations (needs explainkit[ui])")
    serve.add_argument("--checkpoint", help="model weights with a .json card; default: newest under the model store")
    serve.add_argument("--models-dir", help="model store (default $EXPLAINKIT_MODELS_DIR or ./models)")
    serve.add_argument(
        "--data-dir", help="ImageFolder tree with test/ for the gallery (default $EXPLAINKIT_DATA_DIR; none: uploads only)"
    )
    serve.add_argument(
        "--limit", type=positive_int, default=1000, help="test images in the gallery, evenly spaced (default 1000)"
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=positive_int, default=7860, help="port (default 7860)")
    serve.add_argument("--batch-size", type=positive_int, default=128, help="images per forward when scanning (default 128)")
    serve.add_argument("--device", choices=device_choices, default="auto", help="default: cuda, else mps, else cpu")
    add_spec_flags(serve, positive_int)


def run_serve(args: argparse.Namespace) -> int:
    check_spec_flags(args)
    from explainkit.app.ui import _gradio, launch
    from explainkit.app.workbench import Workbench

    _gradio()  # a missing extra fails before the model loads
    device = select_device(args.device)
    if args.model:
        model = load_spec_model(args, device)
    else:
        model = load_model(require_model_path(args.checkpoint, args.models_dir), map_location=device)
    bench = Workbench(model, device)
    if data_dir_from_env(args.data_dir) is not None:
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
