"""``python -m explainkit``: the command line. Each subcommand parses flags and calls the library.

User errors (:class:`~explainkit.errors.ExplainkitError`) print one line and exit with 2;
``EXPLAINKIT_DEBUG=1`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from typing import Sequence

from explainkit.errors import ExplainkitError
from explainkit.runtime.device import DEVICE_CHOICES


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error on one line (exit 2) instead of usage + error, and
    never abbreviates flags (``--model`` must not silently mean ``--models-dir``)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint", help="model weights (.pt/.safetensors) with a .json card beside; default: newest under the model store"
    )
    parser.add_argument("--models-dir", help="model store (default $EXPLAINKIT_MODELS_DIR or ./models)")
    parser.add_argument(
        "--data-dir", help="ImageFolder tree with train/ and test/ (default $EXPLAINKIT_DATA_DIR, else CIFAR-10 download)"
    )
    parser.add_argument("--batch-size", type=_positive_int, default=128, help="images per forward (default 128)")
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="auto", help="default: cuda, else mps, else cpu")
    from explainkit.cli.flags import add_spec_flags

    add_spec_flags(parser, _positive_int)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="explainkit", description="Which parts of an image drive a classifier's score.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    explain = sub.add_parser("explain", help="per-class and misclassified CAM grids")
    explain.add_argument(
        "--method", "--methods", dest="methods", default="gradcam", help="NAME[,NAME...] (see `explainkit methods`)"
    )
    explain.add_argument("--layer", help="dotted submodule path, e.g. layer4 or layer3.1 (default: the model's last stage)")
    explain.add_argument("--image", nargs="+", metavar="PATH", help="explain these image files instead of the test split")
    explain.add_argument(
        "--targets",
        default="auto",
        metavar="auto|all|topk:K",
        help="classes in per_class.png: every class, or each image's K most probable (default auto: all up to 20 classes, else topk:5)",
    )
    explain.add_argument("--out", default="outputs", help="output directory (default: outputs/)")
    explain.add_argument("--samples", type=_non_negative_int, default=3, help="images in per_class.png (default 3)")
    explain.add_argument("--misclassified", type=_non_negative_int, default=10, help="rows in misclassified.png (default 10)")
    explain.add_argument("--limit", type=_positive_int, help="test images scanned, evenly spaced over the split (default: all)")
    explain.add_argument("--bf16", action="store_true", help="run the model under bf16 autocast (gradcam, gradcam++; for CUDA)")
    explain.add_argument(
        "--save-maps",
        action="store_true",
        help="also write every map, prediction and probability to OUT/maps.zarr (read with explainkit.load_maps)",
    )
    explain.add_argument(
        "--resume", action="store_true", help="continue an interrupted --save-maps run from the chunks it finished"
    )
    _add_model_flags(explain)

    explain.add_argument("--no-train", action="store_true", help="with no model anywhere, fail instead of training a quick one")
    from explainkit.cli.train import add_train_parser

    add_train_parser(sub, _positive_int, DEVICE_CHOICES)

    from explainkit.cli.evaluate import add_evaluate_parser

    add_evaluate_parser(sub, _positive_int, DEVICE_CHOICES)

    layers = sub.add_parser("layers", help="a model's candidate CAM layers, their output shapes and the default")
    layers.add_argument("--checkpoint", help="model weights with a .json card; default: newest under the model store")
    layers.add_argument("--models-dir", help="model store (default $EXPLAINKIT_MODELS_DIR or ./models)")
    layers.add_argument("--all", action="store_true", help="every submodule, not only stages, blocks and their norms")
    from explainkit.cli.flags import add_spec_flags

    add_spec_flags(layers, _positive_int)

    from explainkit.cli.serve import add_serve_parser

    add_serve_parser(sub, _positive_int, DEVICE_CHOICES)

    report = sub.add_parser("report", help="rebuild DIR/report.html from the explain, evaluate and train outputs in DIR")
    report.add_argument("dir", metavar="DIR", help="an output folder of explain, evaluate or train")
    report.add_argument("--out", help="where to write the page (default DIR/report.html)")

    methods = sub.add_parser("methods", help="list registered explainers and the plugin of each")
    methods.add_argument("--json", action="store_true", help="machine-readable output")
    sub.add_parser("plugins", help="list loaded plugins as JSON")
    return parser


def _cmd_methods(args: argparse.Namespace) -> int:
    from explainkit.plugins import plugin_distribution
    from explainkit.registry import catalog

    registered = catalog()
    rows = [
        {"name": r.name, "plugin": r.plugin, "distribution": " ".join(plugin_distribution(r.plugin)).strip()}
        for r in sorted(registered.explainers.values(), key=lambda r: r.name)
    ]
    clashes = [{"name": name, "plugins": plugins} for name, plugins in sorted(registered.clashes.items())]
    if args.json:
        print(json.dumps(rows + [{**c, "error": "registered by several plugins"} for c in clashes], indent=2))
        return 0
    width = max((len(r["name"]) for r in rows), default=4)
    for row in rows:
        print(f"{row['name']:<{width}}  {row['plugin']}  ({row['distribution']})")
    for clash in clashes:
        print(
            f"{clash['name']:<{width}}  CLASH: registered by {', '.join(clash['plugins'])}; disable one with EXPLAINKIT_DISABLE_PLUGINS"
        )
    return 0


def _cmd_plugins(args: argparse.Namespace) -> int:
    from explainkit.plugins import describe_plugins

    print(json.dumps(describe_plugins(), indent=2))
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    from explainkit.cli.explain import run_explain

    return run_explain(args)


def _cmd_train(args: argparse.Namespace) -> int:
    from explainkit.cli.train import run_train

    return run_train(args)


def _cmd_lr_find(args: argparse.Namespace) -> int:
    from explainkit.cli.train import run_lr_find

    return run_lr_find(args)


def _cmd_serve(args: argparse.Namespace) -> int:
    from explainkit.cli.serve import run_serve

    return run_serve(args)


def _cmd_report(args: argparse.Namespace) -> int:
    from explainkit.jobs.report import write_report

    print(write_report(args.dir, args.out))
    return 0


def _cmd_layers(args: argparse.Namespace) -> int:
    from explainkit.cli.layers import run_layers

    return run_layers(args)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from explainkit.cli.evaluate import run_evaluate

    return run_evaluate(args)


COMMANDS = {
    "evaluate": _cmd_evaluate,
    "train": _cmd_train,
    "lr-find": _cmd_lr_find,
    "explain": _cmd_explain,
    "layers": _cmd_layers,
    "report": _cmd_report,
    "serve": _cmd_serve,
    "methods": _cmd_methods,
    "plugins": _cmd_plugins,
}


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
        return COMMANDS[args.command](args)
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
