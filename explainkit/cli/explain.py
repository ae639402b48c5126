"""``explainkit explain``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from explainkit.cli.flags import (
    add_data_flag,
    add_device_flags,
    add_method_flags,
    add_model_flags,
    announce,
    build_explainer,
    check_layer_flags,
    check_spec_flags,
    load_spec_model,
    non_negative_int,
    positive_int,
)
from explainkit.data.datasets import load_split
from explainkit.errors import ExplainkitError
from explainkit.jobs.explain import ExplainOptions, ExplainResult, explain_dataset, explain_images, parse_figure_targets
from explainkit.jobs.provenance import provenance
from explainkit.jobs.tasks import TASKS, TaskOptions, explain_task, prepare_task
from explainkit.models.card import ModelCard
from explainkit.models.store import load_model, model_card, newest_model, require_model_path, resnet18_cifar
from explainkit.registry import accepts_option, parse_methods, require_explainer
from explainkit.runtime.device import device_layout, select_device
from explainkit.runtime.distributed import DistContext, init_distributed
from explainkit.runtime.images import read_image
from explainkit.runtime.io import ensure_writable_dir
from explainkit.training.first_model import train_first_model


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("explain", help="per-class and misclassified CAM grids")
    add_method_flags(parser, default="gradcam")
    parser.add_argument("--image", nargs="+", metavar="PATH", help="explain these image files instead of the test split")
    parser.add_argument(
        "--targets",
        default="auto",
        metavar="auto|all|topk:K",
        help="classes in per_class.png: every class, or each image's K most probable (default auto: all up to 20 classes, else topk:5)",
    )
    parser.add_argument("--out", default="outputs", help="output directory (default: outputs/)")
    parser.add_argument("--samples", type=non_negative_int, default=3, help="images in per_class.png (default 3)")
    parser.add_argument("--misclassified", type=non_negative_int, default=10, help="rows in misclassified.png (default 10)")
    parser.add_argument("--limit", type=positive_int, help="test images scanned, evenly spaced over the split (default: all)")
    parser.add_argument("--bf16", action="store_true", help="run the model under bf16 autocast (the gradient CAMs; for CUDA)")
    parser.add_argument(
        "--save-maps",
        action="store_true",
        help="also write every map, prediction and probability to OUT/maps.zarr (read with explainkit.load_maps)",
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue an interrupted --save-maps run from the chunks it finished"
    )
    _add_task_flags(parser)
    add_model_flags(parser)
    add_data_flag(parser)
    add_device_flags(parser)
    parser.add_argument("--no-train", action="store_true", help="with no model anywhere, fail instead of training a quick one")
    parser.set_defaults(run=run)


def _add_task_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("tasks beyond classification (with --image)")
    group.add_argument(
        "--task",
        choices=TASKS,
        help="what to explain: classify, segment (a class's region), detect (each box), multilabel (each label "
        "above --score-threshold), similarity (to --reference); default: read off the model's output",
    )
    group.add_argument(
        "--class",
        dest="class_name",
        metavar="NAME",
        help="segment: the class whose region is explained (default: the non-background class covering most pixels); "
        "multilabel: explain this label only",
    )
    group.add_argument(
        "--score-threshold",
        type=float,
        default=0.5,
        metavar="P",
        help="detect: boxes scoring at least P; multilabel: labels whose sigmoid exceeds P (default 0.5)",
    )
    group.add_argument("--reference", metavar="IMAGE", help="similarity: the image each --image is compared with")


def run(args: argparse.Namespace) -> int:
    # Everything that can be wrong is checked before anything is written.
    methods = _check_flags(args)
    device = select_device(args.device)
    ctx = init_distributed(device.type)  # under torchrun: one rank per process, NCCL on CUDA, else gloo
    if ctx.enabled:
        _check_distributed(args, ctx)
        if device.type == "cuda":
            device = torch.device("cuda", ctx.local_rank)
    checkpoint = _checkpoint(args, methods, device)
    model = load_spec_model(args, device) if checkpoint is None else load_model(checkpoint, map_location=device)
    card = model_card(model)
    model = device_layout(model, device)
    gradient_options = {"autocast": torch.bfloat16} if args.bf16 else {}  # model in bf16, CAM maths in float32
    explainers = dict(build_explainer(name, model, args, **gradient_options) for name in methods)
    options = ExplainOptions(
        samples=args.samples,
        misclassified=args.misclassified,
        limit=args.limit,
        batch_size=args.batch_size,
        save_maps=args.save_maps,
        resume=args.resume,
        targets=args.targets,
        meta={
            "model": args.model or str(checkpoint),
            "architecture": card.architecture,
            "device": str(device),
            "provenance": provenance(checkpoint if checkpoint is not None else args.weights),
            "card": card.to_dict(),
        },
    )
    # The inputs are read before the output folder is made: a bad file or folder leaves nothing behind.
    if args.image:
        images = _read_images(args.image, card).to(device)
        task_options = _task_options(args, card)
        prepared = prepare_task(model, card, images, task_options)
        if prepared is None and args.task is None and (args.class_name or args.reference):
            raise ExplainkitError("--class and --reference are for tasks beyond classification; this model classifies")
        out = ensure_writable_dir(args.out)
        announce(model, args.layer)
        if prepared is not None:
            result = explain_task(card, explainers, images, args.image, prepared, out, task_options, options.meta)
        else:
            result = explain_images(card, explainers, images, args.image, out, device, options)
    else:
        dataset = load_split("test", card, args.data_dir)
        out = ensure_writable_dir(args.out)
        if ctx.is_main:
            announce(model, args.layer)
        result = explain_dataset(model, card, explainers, dataset, out, device, options, ctx)
        ctx.close()
        if not ctx.is_main:
            return 0
    _report(result)
    return 0


def _check_flags(args: argparse.Namespace) -> list[str]:
    """The methods, after every flag that can be checked without a model has been."""
    check_spec_flags(args)
    methods = parse_methods(args.methods)
    check_layer_flags(args)
    for name in methods:
        if args.bf16 and not accepts_option(require_explainer(name), "autocast"):
            raise ExplainkitError(f"--bf16 runs the gradient CAMs under autocast; {name!r} does not take it")
    parse_figure_targets(args.targets)
    _check_task_flags(args)
    if args.resume and not args.save_maps:
        raise ExplainkitError("--resume continues a --save-maps run; add --save-maps")
    return methods


def _check_task_flags(args: argparse.Namespace) -> None:
    task = args.task
    if task not in (None, "classify") and not args.image:
        raise ExplainkitError(f"--task {task} explains image files: add --image PATH [PATH ...]")
    if task not in (None, "classify") and args.save_maps:
        raise ExplainkitError(f"--save-maps stores classification maps; it does not go with --task {task}")
    if args.reference and task not in (None, "similarity"):
        raise ExplainkitError(f"--reference is for --task similarity, not --task {task}")
    if task == "similarity" and not args.reference:
        raise ExplainkitError("--task similarity compares with a reference: add --reference IMAGE")
    if args.class_name and task not in (None, "segment", "multilabel"):
        raise ExplainkitError(f"--class names a segmentation class or a label; it does not go with --task {task}")
    if not 0.0 < args.score_threshold < 1.0:
        raise ExplainkitError(f"--score-threshold is a probability in (0, 1), got {args.score_threshold}")
    if (args.class_name or args.reference) and not args.image:
        raise ExplainkitError("--class and --reference go with --image files")


def _task_options(args: argparse.Namespace, card: ModelCard) -> TaskOptions:
    reference = _read_images([args.reference], card) if args.reference else None
    return TaskOptions(
        task=args.task,
        class_name=args.class_name,
        score_threshold=args.score_threshold,
        reference=reference,
        reference_name=Path(args.reference).name if args.reference else "reference",
    )


def _check_distributed(args: argparse.Namespace, ctx: DistContext) -> None:
    if not (args.model or args.checkpoint or newest_model(args.models_dir)):
        raise ExplainkitError("under torchrun, explain needs a model: pass --checkpoint PATH or train one first")
    if args.image:
        raise ExplainkitError("--image runs in one process; drop torchrun")


def _checkpoint(args: argparse.Namespace, methods: list[str], device: torch.device) -> Path | None:
    """The checkpoint to explain (``None`` for ``--model``); on a fresh machine with none anywhere,
    check what can be checked, then train a quick one to explain."""
    if args.model:
        return None
    if args.checkpoint or args.no_train or newest_model(args.models_dir) is not None:
        return require_model_path(args.checkpoint, args.models_dir)
    for name in methods:
        build_explainer(name, resnet18_cifar(10), args)
    for path in args.image or []:
        read_image(path, (32, 32))
    ensure_writable_dir(args.out)
    return train_first_model(device, args.models_dir, args.data_dir)


def _read_images(paths: list[str], card: ModelCard) -> torch.Tensor:
    """The ``--image`` files with the model's preprocessing, normalised."""
    images = torch.stack([torch.from_numpy(read_image(p, card.image_size, card.resize, card.interpolation)) for p in paths])
    return card.normalize(images.permute(0, 3, 1, 2).float().div(255))


def _report(result: ExplainResult) -> None:
    summary = result.summary
    if summary.get("accuracy") is not None:
        print(
            f"{summary['images']} test images: accuracy {100 * summary['accuracy']:.2f}%, "
            f"{summary['misclassified']} misclassified",
            file=sys.stderr,
        )
    for path in result.outputs:
        print(path)
