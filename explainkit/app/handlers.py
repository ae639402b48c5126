"""What the web app does, as plain functions of a :class:`~explainkit.app.workbench.Workbench` and
plain values: each returns numpy images, lists, dicts or strings, so it is testable without Gradio
or a browser. :mod:`explainkit.app.ui` only lays the page out and wires these to it.

Two kinds:

* the page's own actions (:func:`filtered`, :func:`pick`, :func:`upload`, :func:`compare`,
  :func:`per_class`, :func:`faithfulness`) report a problem as a message to show in the page;
* the public API (:func:`explain`, :func:`methods`, :func:`classes`, :func:`layers`) raises
  :class:`~explainkit.errors.ExplainkitError`, which the app turns into the API's error. Their
  docstrings are the API page's text, and their parameter names the API's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from explainkit.app.workbench import COLORMAPS, TASK_NAMES, Item, Target, TaskResult, ViewOptions, Workbench
from explainkit.errors import ExplainkitError
from explainkit.jobs.tasks import TaskOptions
from explainkit.registry import require_explainer

if TYPE_CHECKING:
    from matplotlib.figure import Figure

GALLERY_SIZE = 60
MAX_SELECTED = 8
ANY = "(any)"
AUTOMATIC = "(automatic)"  # a segmenter's region: the class other than background that covers most pixels
TARGETS = ("predicted", "true", "top-k", "class")  # the page's choices (the API's are parse_target's)
TOP = 5  # classes in a probabilities summary
MAX_API_IMAGES = 32
MAX_API_OVERLAYS = 256

Pane = tuple[np.ndarray, str]  # a picture and its caption


# --- the page ------------------------------------------------------------------------------------
def caption(bench: Workbench, item: Item) -> str:
    if not bench.classifies:
        return item.key
    classes = bench.card.classes
    truth = f"true {classes[item.label]}, " if item.label is not None else ""
    return f"{item.key}: {truth}pred {classes[item.predicted]} ({item.confidence:.2f})"


def selected_text(selected: Sequence[str]) -> str:
    return "Selected: " + (", ".join(selected) if selected else "none (click images in the gallery, or upload)")


def filtered(
    bench: Workbench, true_class: str | None, predicted: str | None, correctness: str, pair: str | None, order: str
) -> tuple[list[Pane], list[str]]:
    """The pool's gallery for the filters (``ANY`` or None: no filter; a confusion ``pair``, as
    :func:`pair_labels` writes it, overrides the class filters), and the keys it shows, in order."""
    if pair and pair != ANY:
        true_class, predicted = pair.split(" (")[0].split(" -> ")
        correctness = "wrong"
    items = bench.select(
        None if true_class in (None, ANY) else true_class,
        None if predicted in (None, ANY) else predicted,
        correctness,
        order,
    )[:GALLERY_SIZE]
    return [(bench.display(item), caption(bench, item)) for item in items], [item.key for item in items]


def pair_labels(bench: Workbench) -> list[str]:
    """The confusion-pair filter's choices, ``"true -> predicted (count)"``."""
    return [f"{t} -> {p} ({n})" for t, p, n in bench.confusion_pairs()]


def pick(visible: Sequence[str], selected: Sequence[str], index: int) -> tuple[list[str], str]:
    """Add the ``index``-th shown image to the selection (the last ``MAX_SELECTED`` are kept)."""
    chosen = list(selected)
    key = visible[index]
    if key not in chosen:
        chosen = (chosen + [key])[-MAX_SELECTED:]
    return chosen, selected_text(chosen)


def upload(bench: Workbench, files: Sequence[Any] | None, selected: Sequence[str]) -> tuple[list[str], str, str]:
    """Read uploaded files into the pool and select them: ``(selection, its text, message)``; a
    file that is not a usable image is named in the message, the others still go in."""
    chosen = list(selected)
    messages = []
    for file in files or []:
        path = _path_of(file)
        try:
            item = bench.add_upload(path)
        except ExplainkitError as error:
            messages.append(f"**Could not use {os.path.basename(path)}**: {error}")
            continue
        chosen = (chosen + [item.key])[-MAX_SELECTED:]
    return chosen, selected_text(chosen), "\n\n".join(messages)


@dataclass(frozen=True)
class CompareRequest:
    """What the compare grid shows: the ``selected`` pool keys (rows), the ``methods`` (columns),
    the ``layer`` to explain at (``""`` or None: each method's default) and the ``target`` classes;
    for a detector the boxes scoring at least ``score_threshold``, for a segmenter the ``region``
    of that class (``AUTOMATIC`` or None: the class other than background covering most pixels)."""

    selected: Sequence[str]
    methods: Sequence[str]
    layer: str | None = None
    target: Target = Target()
    score_threshold: float = 0.5
    region: str | None = None


@dataclass
class Comparison:
    """The compare grid: ``panes`` row by row (the image, then its maps), ``columns`` per row, the
    first image's ``top`` probabilities, and a ``message`` when there is nothing to show."""

    panes: list[Pane] = field(default_factory=list)
    columns: int = 4
    top: dict[str, float] = field(default_factory=dict)
    message: str = ""


def compare(
    bench: Workbench, request: CompareRequest, view: ViewOptions, progress: Callable[..., Any] | None = None
) -> Comparison:
    """Every selected image under every method, for the request's target classes, blended as ``view``
    says with one colour scale. ``progress(fraction, desc=...)`` is told before each method."""
    if not request.selected:
        return Comparison(message="Select or upload at least one image first.")
    if not request.methods:
        return Comparison(message="Choose at least one method.")
    if not bench.classifies:
        return _compare_task(bench, request, progress)
    classes = bench.card.classes
    items = [bench.items[key] for key in request.selected]
    try:
        wanted = [bench.class_index(item, request.target) for item in items]
        maps = {}
        for count, method in enumerate(request.methods):  # every selected image in one call per method
            if progress is not None:
                progress(count / len(request.methods), desc=f"{method} on {len(items)} images")
            maps[method] = bench.maps(items, method, request.layer or None, wanted)  # (N, J, H, W)
    except ExplainkitError as error:  # e.g. a layer that is not a feature map: say so in the page
        return Comparison(message=f"**{error}**")
    panes = []
    for row, item in enumerate(items):
        panes.append((bench.display(item), caption(bench, item)))
        for method in request.methods:
            for cls, heat in zip(wanted[row], maps[method][row]):
                panes.append((bench.blend(item, heat, view), f"{method} @ {request.layer}: {classes[cls]}"))
    return Comparison(panes, len(panes) // len(items), top_classes(bench, items[0]))  # one row per image


def task_options(bench: Workbench, score_threshold: float = 0.5, region: str | None = None) -> TaskOptions:
    """What a detector (boxes scoring at least ``score_threshold``) or segmenter (the ``region`` of a
    class, ``AUTOMATIC``/None/"" for the largest one other than background) explains."""
    if not 0 < score_threshold < 1:
        raise ExplainkitError(f"score_threshold {score_threshold}: give a probability between 0 and 1")
    automatic = region in (None, "", AUTOMATIC, "predicted")
    if not automatic and region not in bench.card.classes:
        raise ExplainkitError(f"unknown class {region!r}: choose from {', '.join(bench.card.classes)}")
    return TaskOptions(bench.task, None if automatic else region, score_threshold)


def describe_task(result: TaskResult) -> str:
    """One line of what a detector's or segmenter's maps explain: the boxes, or the region."""
    explained = result.explained
    if "boxes" in explained:
        boxes = ", ".join(f"{box['label']} {box['score']:.2f}" for box in explained["boxes"])
        return f"{explained['image']}: {len(explained['boxes'])} boxes ({boxes})"
    return f"{explained['image']}: region {explained['region']} ({explained['region_pixels']} pixels)"


def _compare_task(bench: Workbench, request: CompareRequest, progress: Callable[..., Any] | None) -> Comparison:
    """A detector's or segmenter's comparison: per selected image, the task's figure for each method
    (boxes with label and score and one map per box; or the region outlined beside its map) and a
    line per image of what was explained; an image where nothing is found gets its message."""
    try:
        options = task_options(bench, request.score_threshold, request.region)
    except ExplainkitError as error:
        return Comparison(message=f"**{error}**")
    panes, lines = [], []
    for count, key in enumerate(request.selected):
        if progress is not None:
            progress(count / len(request.selected), desc=f"{key}: {', '.join(request.methods)}")
        for method in request.methods:
            try:
                result = bench.explain_task(bench.items[key], method, request.layer or None, options)
            except ExplainkitError as error:  # e.g. a detector that finds nothing: one line, the others still shown
                lines.append(f"**{error}**")
                continue
            panes.append((result.picture, f"{key}: {method} @ {request.layer or 'default layer'}"))
            lines.append(describe_task(result))
    unique = list(dict.fromkeys(lines))
    return Comparison(panes, max(1, len(request.methods)), {}, "\n\n".join(unique))


def _classifiers_only(bench: Workbench, what: str) -> str:
    return f"{what} is for classifiers; this model {TASK_NAMES[bench.task]}: use explain"


def per_class(
    bench: Workbench, selected: Sequence[str], methods: Sequence[str] | None, layer: str | None, view: ViewOptions
) -> tuple[list[Pane], str]:
    """The last selected image's map for each of its 20 most probable classes (first method), from one pass."""
    if not bench.classifies:
        return [], _classifiers_only(bench, "Every class")
    if not selected:
        return [], "Select an image first."
    method = first_method(methods)
    classes = bench.card.classes
    item = bench.items[selected[-1]]
    try:
        every = bench.all_classes(item, method, layer or None)
    except ExplainkitError as error:
        return [], f"**{error}**"
    order = item.probabilities.argsort(descending=True)[: min(len(classes), 20)]
    panes = [
        (bench.blend(item, every[int(cls)], view), f"{classes[int(cls)]} ({float(item.probabilities[cls]):.2f})") for cls in order
    ]
    return panes, f"{item.key}: every class's map from one pass ({method})"


def faithfulness(
    bench: Workbench, selected: Sequence[str], methods: Sequence[str] | None, layer: str | None
) -> tuple[Figure | None, str]:
    """Deletion and insertion curves of the last selected image (first method), as a figure and a note."""
    if not bench.classifies:
        return None, _classifiers_only(bench, "Faithfulness")
    if not selected:
        return None, "Select an image first."
    from matplotlib.figure import Figure

    method = first_method(methods)
    item = bench.items[selected[-1]]
    try:
        scores = bench.faithfulness(item, method, layer or None)
    except ExplainkitError as error:
        return None, f"**{error}**"
    figure = Figure(figsize=(8, 3))
    axes = figure.subplots(1, 2)
    for ax, name in zip(axes, ("deletion", "insertion")):
        curve = scores[name]
        ax.plot([i / (len(curve) - 1) for i in range(len(curve))], curve)
        ax.set_title(f"{name}: AUC {scores[name + '_auc']:.3f}")
        ax.set_xlabel("fraction of pixels")
        ax.set_ylim(0, 1)
    axes[0].set_ylabel(f"p({bench.card.classes[item.predicted]})")
    figure.tight_layout()
    note = (
        f"{item.key}, {method}: deletion AUC {scores['deletion_auc']:.3f} (lower is better), "
        f"insertion AUC {scores['insertion_auc']:.3f} (higher is better)"
    )
    return figure, note


def first_method(methods: Sequence[str] | None) -> str:
    return (list(methods or []) or ["gradcam"])[0]


def top_classes(bench: Workbench, item: Item, count: int = TOP) -> dict[str, float]:
    """``{class: probability}`` for ``item``'s ``count`` most probable classes, most probable first."""
    classes = bench.card.classes
    top = item.probabilities.topk(min(count, len(classes)))
    return {classes[int(i)]: float(p) for p, i in zip(top.values, top.indices)}


# --- the API -------------------------------------------------------------------------------------
def explain(
    bench: Workbench,
    images: Sequence[Any] | None,
    methods: Sequence[str] | str | None = ("gradcam",),
    layer: str | None = "",
    target: str = "predicted",
    opacity: float = 0.5,
    colormap: str = COLORMAPS[0],
    score_threshold: float = 0.5,
) -> tuple[list[Pane], list[dict[str, Any]]]:
    """Explain one or more image files with one or more CAM methods. Returns the overlays (one per
    image, method and explained class, captioned "file: method @ layer: class", in that order) and,
    per image in the order given, its top-5 class probabilities. For a detector or a segmenter, one
    figure per image and method instead (the boxes with label and score and one map per box, or the
    region outlined beside its map) and, per image, what was explained.

    Args:
        images: one or more image files (png, jpg, bmp, gif, webp or tif; at most 10 MiB each), resized and normalised as the model was trained; at most 32 per call.
        methods: registered method names (see /methods), e.g. ["gradcam", "layercam"].
        layer: the layer to explain at (see /layers); "" for the model's default layer.
        target: the class each map explains: "predicted", "all" (every class), "topk:K" (the K most probable, e.g. "topk:3") or a class name (see /classes); a segmenter: the region's class ("predicted": the largest other than background); a detector: "predicted" (every box above score_threshold).
        opacity: how opaque the colour-mapped heat map is over the image, from 0 to 1.
        colormap: the heat map's colour map: inferno, viridis, magma, cividis or jet.
        score_threshold: a detector's boxes scoring at least this are explained, between 0 and 1 (other models ignore it).

    Returns:
        overlays: the images with each map blended over them (at most 256 per call); a detector's or segmenter's figures.
        probabilities: per image, {"image": file name, "key": its name in the app's pool, "predicted": class, "confidence": probability, "top": {class: probability} for the 5 most probable classes}; a detector: {"image", "key", "task": "detect", "boxes": [{"label", "score", "box"}]}; a segmenter: {"image", "key", "task": "segment", "region": class, "region_pixels": count}.
    """
    paths = [_path_of(image) for image in images or []]
    if not paths:
        raise ExplainkitError("no image given: send one or more image files")
    if len(paths) > MAX_API_IMAGES:
        raise ExplainkitError(f"{len(paths)} images: at most {MAX_API_IMAGES} per call")
    chosen = [methods] if isinstance(methods, str) else list(methods or [])
    if not chosen:
        raise ExplainkitError(f"no method given: choose from {', '.join(bench.methods())}")
    for method in chosen:
        require_explainer(method)  # an unknown name: the message lists the registered ones
    view = ViewOptions(opacity, colormap)  # checks both
    if not bench.classifies:
        return _explain_task(bench, paths, chosen, layer, target, score_threshold)
    asked = parse_target(bench, target)
    per_image = {"all": bench.card.num_classes, "top-k": asked.k}.get(asked.kind, 1)
    if len(paths) * len(chosen) * per_image > MAX_API_OVERLAYS:
        raise ExplainkitError(
            f"{len(paths)} images x {len(chosen)} methods x {per_image} classes is more than "
            f"{MAX_API_OVERLAYS} overlays: ask for fewer images, methods or classes"
        )
    items = [bench.add_upload(path) for path in paths]  # the page's upload path: same checks, same pool
    names = [Path(path).name for path in paths]
    wanted = [bench.class_index(item, asked) for item in items]
    maps = {method: bench.maps(items, method, layer or None, wanted) for method in chosen}  # one call per method
    classes = bench.card.classes
    where = layer or "default layer"
    overlays = [
        (bench.blend(item, heat, view), f"{name}: {method} @ {where}: {classes[cls]}")
        for row, (item, name) in enumerate(zip(items, names))
        for method in chosen
        for cls, heat in zip(wanted[row], maps[method][row])
    ]
    probabilities = [
        {
            "image": name,
            "key": item.key,
            "predicted": classes[item.predicted],
            "confidence": item.confidence,
            "top": top_classes(bench, item),
        }
        for item, name in zip(items, names)
    ]
    return overlays, probabilities


def _explain_task(
    bench: Workbench, paths: Sequence[str], chosen: Sequence[str], layer: str | None, target: str, score_threshold: float
) -> tuple[list[Pane], list[dict[str, Any]]]:
    """:func:`explain` for a detector or segmenter: one figure per image and method, and per image what was explained."""
    region = (target or "predicted").strip()
    if bench.task == "detect" and region != "predicted":
        raise ExplainkitError(f"target {region!r}: a detector explains every box above score_threshold; leave target predicted")
    options = task_options(bench, score_threshold, region)
    if len(paths) * len(chosen) > MAX_API_OVERLAYS:
        raise ExplainkitError(f"{len(paths)} images x {len(chosen)} methods is more than {MAX_API_OVERLAYS} figures")
    items = [bench.add_upload(path) for path in paths]
    where = layer or "default layer"
    overlays, answers = [], []
    for item, path in zip(items, paths):
        name = Path(path).name
        for method in chosen:
            result = bench.explain_task(item, method, layer or None, options)
            overlays.append((result.picture, f"{name}: {method} @ {where}: {bench.task}"))
        answers.append({**result.explained, "image": name, "key": item.key, "task": bench.task})
    return overlays, answers


def parse_target(bench: Workbench, target: str) -> Target:
    """The API's ``target`` text (see :func:`explain`) as a :class:`~explainkit.app.workbench.Target`."""
    text = (target or "predicted").strip()
    classes = bench.card.classes
    if text in ("predicted", "all"):
        return Target(text)
    if text.lower().startswith("topk:"):
        count = text.split(":", 1)[1].strip()
        if not count.isdigit() or not 1 <= int(count) <= len(classes):
            raise ExplainkitError(f"target {text!r}: K in topk:K must be a whole number from 1 to {len(classes)}")
        return Target("top-k", k=int(count))
    if text in classes:
        return Target("class", class_name=text)
    shown = ", ".join(classes[:20]) + (", ..." if len(classes) > 20 else "")
    raise ExplainkitError(f"unknown target {text!r}: use predicted, all, topk:K or a class name ({shown})")


def methods(bench: Workbench) -> list[str]:
    """The registered method names, for /explain's methods."""
    return bench.methods()


def classes(bench: Workbench) -> list[str]:
    """The model's class names, in its output order: what /explain's target can name."""
    return list(bench.card.classes)


def layers(bench: Workbench) -> list[str]:
    """Layers /explain can explain at, the model's default first (any other feature-map layer's dotted name works too)."""
    return bench.layer_choices()


def _path_of(file: Any) -> str:
    """A file path from what Gradio hands over: a path, or a temporary-file object with ``.name``."""
    if isinstance(file, (str, os.PathLike)):
        return os.fspath(file)
    return str(file.name)
