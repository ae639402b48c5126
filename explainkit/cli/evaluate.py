"""``explainkit evaluate``: faithfulness metrics on test images, or the synthetic ground-truth task."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from explainkit.cli.flags import (
    FUSE_RULES,
    add_data_flag,
    add_device_flags,
    add_method_flags,
    add_model_flags,
    announce,
    check_layer_flags,
    check_spec_flags,
    load_model_from_flags,
    positive_int,
)
from explainkit.data.datasets import data_dir_from_env, dataset_size, evenly_spaced, load_split
from explainkit.errors import ExplainkitError
from explainkit.evaluation import run as evaluation_run
from explainkit.explainers.fusion import parse_layers
from explainkit.figures import save_figure
from explainkit.models.store import model_card, require_model_path
from explainkit.registry import parse_methods, require_explainer
from explainkit.runtime.device import select_device
from explainkit.runtime.io import ensure_writable_dir, write_json

FAITHFULNESS_COLUMNS = ["deletion_auc", "insertion_auc", "average_drop", "increase_in_confidence", "road_morf", "road_lerf"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate", help="faithfulness metrics per method, with 95%% CIs; --synthetic for ground truth"
    )
    add_method_flags(parser, default="gradcam,gradcam++,captum-gradcam")
    parser.add_argument("--limit", type=positive_int, default=200, help="test images, evenly spaced (default 200)")
    parser.add_argument("--steps", type=positive_int, default=32, help="deletion/insertion steps (default 32)")
    add_model_flags(parser)
    add_data_flag(parser, "ImageFolder tree with test/ (default $EXPLAINKIT_DATA_DIR, else CIFAR-10 download)")
    add_device_flags(parser)
    parser.add_argument("--out", default="outputs/evaluate", help="output directory (default outputs/evaluate)")
    parser.add_argument("--json", help="metrics file (default OUT/metrics.json)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for baselines, tie orders and bootstrap (default 0)")
    parser.add_argument("--skip", default="", help=f"comma-separated parts to skip: {', '.join(evaluation_run.SKIPPABLE)}")
    parser.add_argument("--synthetic", action="store_true", help="the ground-truth localisation benchmark instead")
    parser.set_defaults(run=run)


def _factories(methods: list[str], layer: str | None, fuse: str | None = None):
    """``model -> explainer`` per method, every name checked against the registry first; with
    ``fuse`` (``--fuse``) the fusion explainer over each method, keyed ``refinecam:gradcam``."""
    registered = {name: require_explainer(name) for name in methods}
    if fuse:
        rule = require_explainer(FUSE_RULES[fuse])
        return {f"{rule.name}:{name}": (lambda model, n=name: rule.factory(model, layer=layer, method=n)) for name in registered}
    return {name: (lambda model, r=r: r.factory(model, layer=layer)) for name, r in registered.items()}


def run(args: argparse.Namespace) -> int:
    methods = parse_methods(args.methods)
    options = evaluation_run.FaithfulnessOptions(  # checks --skip before anything loads
        steps=args.steps,
        batch_size=args.batch_size,
        seed=args.seed,
        skip=frozenset(s.strip() for s in args.skip.split(",") if s.strip()),
    )
    check_spec_flags(args)
    check_layer_flags(args)
    if args.synthetic and args.model:
        raise ExplainkitError("--synthetic trains its own small CNN; drop --model")
    device = select_device(args.device)
    if args.json:
        ensure_writable_dir(Path(args.json).parent or Path("."), "json")
    started = time.perf_counter()
    if args.synthetic:
        from explainkit.evaluation import synthetic

        factories = _factories(methods, args.layer or synthetic.LAST_CONV, args.fuse)
        for factory in factories.values():  # validate layer/method before the training
            factory(synthetic.small_cnn())
        out = ensure_writable_dir(args.out)
        backgrounds = None
        if data_dir_from_env(args.data_dir) is not None:
            from explainkit.models.card import ModelCard

            card = ModelCard()
            split = load_split("test", card, args.data_dir)
            picks = evenly_spaced(dataset_size(split), 2000)
            backgrounds = card.denormalize(torch.stack([split[i][0] for i in picks]))
        results, _, _ = evaluation_run.evaluate_synthetic(factories, seed=args.seed, backgrounds=backgrounds)
        columns = ["pointing_game", "energy_in_box"]
    else:
        source = args.model or str(require_model_path(args.checkpoint, args.models_dir))
        model = load_model_from_flags(args, device)
        factories = _factories(methods, args.layer, args.fuse)
        layer_name = next(iter(factories.values()))(model).layer_name  # also validates --layer
        dataset = load_split("test", model_card(model), args.data_dir)
        out = ensure_writable_dir(args.out)
        if args.model:  # a library model: say what preprocessing and layer were read off it
            announce(model, args.layer)
        picks = evenly_spaced(dataset_size(dataset), args.limit)
        images = torch.stack([dataset[i][0] for i in picks]).to(device)
        baseline_layer = parse_layers(args.layer)[-1] if args.layer else None  # baselines: the deepest fused layer
        results, curves = evaluation_run.evaluate_faithfulness(
            model, model_card(model), factories, images, baseline_layer, options
        )
        results["meta"] = {
            "model": source,
            "layer": layer_name,
            "images": len(images),
            "steps": args.steps,
            "device": str(device),
            "seconds": round(time.perf_counter() - started, 1),
            "seed": args.seed,
            "skipped": sorted(options.skip),
        }
        if curves:
            save_figure(evaluation_run.curves_figure(curves), out / "deletion_insertion.png")
        if "sanity" not in options.skip:
            save_figure(evaluation_run.sanity_figure(results), out / "sanity.png")
        columns = [c for c in FAITHFULNESS_COLUMNS if any(c in v for k, v in results.items() if k != "meta")]
    results = {"schema_version": evaluation_run.SCHEMA_VERSION, **results}
    json_path = Path(args.json) if args.json else out / "metrics.json"
    write_json(json_path, results)
    print(evaluation_run.format_table({k: v for k, v in results.items() if k != "schema_version"}, columns))
    print(json_path, file=sys.stderr)
    return 0
