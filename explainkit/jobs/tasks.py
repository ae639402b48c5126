"""Explaining image files for tasks beyond classification: segmentation, detection, multi-label
and similarity (``explainkit explain --task ...``).

Two steps, so that nothing is written for a model or task that does not fit: :func:`prepare_task`
runs one forward, reads the task off the output (or checks the one asked for) and binds its
target; :func:`explain_task` then explains with every method and writes one figure per method,
``summary.json`` and ``report.html``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from explainkit import figures, task_figures
from explainkit.errors import ExplainkitError
from explainkit.explainers.base import Explainer, Explanation
from explainkit.jobs.explain import ExplainResult, finish_job
from explainkit.models.card import ModelCard
from explainkit.models.modes import evaluation_mode
from explainkit.models.outputs import describe_output
from explainkit.targets import (
    DetectionBoxes,
    MultiLabel,
    SegmentationRegion,
    Similarity,
    Target,
    embed,
    segmentation_logits,
)

TASKS = ("classify", "segment", "detect", "multilabel", "similarity")


@dataclass(frozen=True)
class TaskOptions:
    """What a task needs besides the images.

    task: one of :data:`TASKS`; ``None`` reads it off the model's output (a list of box dicts:
        detect; ``(N, K, H, W)`` scores or ``{"out": ...}``: segment; with a reference: similarity;
        else classify). Multi-label heads look like classifiers: ask for ``"multilabel"``.
    class_name: segment: the class whose region is explained (default: the class, other than the
        first, "background", that covers most pixels); multilabel: explain this label only.
    score_threshold: detect: boxes kept; multilabel: the sigmoid probability a label needs.
    reference: similarity: the preprocessed ``(1, C, H, W)`` image to compare with.
    reference_name: its file name, for titles.
    """

    task: str | None = None
    class_name: str | None = None
    score_threshold: float = 0.5
    reference: torch.Tensor | None = None
    reference_name: str = "reference"


@dataclass
class PreparedTask:
    """A task read off (or checked against) the model's output, its target ready to explain."""

    task: str
    target: Target
    description: str


def infer_task(output: Any, has_reference: bool = False) -> str:
    """The task a model's output suggests (see :class:`TaskOptions`)."""
    if isinstance(output, (list, tuple)) and output and all(isinstance(item, dict) and "boxes" in item for item in output):
        return "detect"
    try:
        segmentation_logits(output)  # (N, K, H, W), {"out": ...} or a Hugging Face output's 4-D .logits
        return "segment"
    except ExplainkitError:
        return "similarity" if has_reference else "classify"


def _class_index(card: ModelCard, name: str, what: str) -> int:
    if name in card.classes:
        return card.classes.index(name)
    if name.isdigit() and int(name) < card.num_classes:
        return int(name)
    shown = ", ".join(card.classes[:12]) + (" ..." if card.num_classes > 12 else "")
    raise ExplainkitError(f"--class {name!r} is not one of the model's {what}: {shown}")


def _region_class(output: Any, card: ModelCard, options: TaskOptions) -> int:
    if options.class_name is not None:
        return _class_index(card, options.class_name, "classes")
    counts = segmentation_logits(output).argmax(dim=1).flatten().bincount(minlength=2)
    if counts.numel() > 1 and int(counts[1:].sum()) > 0:
        return 1 + int(counts[1:].argmax())  # the first class is background in VOC and COCO-stuff
    return 0


def _target(task: str, model: nn.Module, output: Any, card: ModelCard, options: TaskOptions) -> Target:
    if task == "segment":
        return SegmentationRegion(_region_class(output, card, options))
    if task == "detect":
        return DetectionBoxes(score_threshold=options.score_threshold)
    if task == "multilabel":
        labels = None if options.class_name is None else [_class_index(card, options.class_name, "labels")]
        return MultiLabel(threshold=options.score_threshold, labels=labels)
    if options.reference is None:
        raise ExplainkitError("--task similarity compares with a reference: add --reference IMAGE")
    return Similarity(embed(model, options.reference.to(next(model.parameters()).device))[0])


def prepare_task(model: nn.Module, card: ModelCard, images: torch.Tensor, options: TaskOptions) -> PreparedTask | None:
    """One forward over ``images``: the task (read off the output when not given) and its target,
    bound once here so that a task that does not fit the model fails before anything is written.
    ``None`` when the task is classification (explain's per-class figures serve it)."""
    if options.task is not None and options.task not in TASKS:
        raise ExplainkitError(f"unknown task {options.task!r}; choose from {', '.join(TASKS)}")
    with evaluation_mode(model), torch.no_grad():
        output = model(images)
    task = options.task or infer_task(output, options.reference is not None)
    if task == "classify":
        return None
    target = _target(task, model, output, card, options)
    try:
        target.bind(output)  # the checks: the output's form, something to explain
    except ExplainkitError as error:
        raise ExplainkitError(f"--task {task}: {error}") from None
    return PreparedTask(task, target, describe_output(output))


def explain_task(
    card: ModelCard,
    explainers: dict[str, Explainer],
    images: torch.Tensor,
    names: Sequence[str],
    prepared: PreparedTask,
    out: Path,
    options: TaskOptions,
    meta: dict[str, Any],
) -> ExplainResult:
    """Explain ``images`` (preprocessed, on the model's device) for ``prepared``'s target with every
    method: ``<task>.png`` for the first method, ``<task>_<method>.png`` for the others,
    ``summary.json`` (what was explained per image) and ``report.html``."""
    started = time.perf_counter()
    pictures = card.denormalize(images.cpu()).clamp(0, 1)
    outputs, shown, first = [], [], None
    for index, (name, explainer) in enumerate(explainers.items()):
        result = explainer.explain(images, prepared.target)
        first = first or result
        figure = _figure(prepared, pictures, result, card, options, f"{name} at {explainer.layer_name}")
        path = figures.save_figure(figure, out / (f"{prepared.task}.png" if index == 0 else f"{prepared.task}_{name}.png"))
        outputs.append(path)
        shown.append({"file": path.name, "title": f"{prepared.task}: {name}", "caption": _caption(prepared.task)})
    assert first is not None
    summary: dict[str, Any] = {
        **meta,
        "task": prepared.task,
        "target": repr(prepared.target),
        "model_output": prepared.description,
        "methods": list(explainers),
        "layer": {name: e.layer_name for name, e in explainers.items()},
        "images": len(names),
        "explained": _explained(prepared, first, names, card),
        "figures": shown,
        "timings": {"total_seconds": round(time.perf_counter() - started, 3)},
    }
    return finish_job(out, summary, outputs)


def _caption(task: str) -> str:
    return {
        "segment": "The region explained (outlined) and its map",
        "detect": "Each detected box with its label and score, and one map per box",
        "multilabel": "One map per label above the threshold",
        "similarity": "What makes each image like the reference (cosine similarity of embeddings)",
    }[task]


def _figure(
    prepared: PreparedTask, pictures: torch.Tensor, result: Explanation, card: ModelCard, options: TaskOptions, title: str
):
    task = prepared.task
    maps, details = result.maps.cpu(), {k: v.cpu() for k, v in (result.target.details if result.target else {}).items()}
    if task == "segment":
        masks = details["mask"].float()[:, None]
        masks = F.interpolate(masks, size=pictures.shape[-2:], mode="nearest")[:, 0].bool()
        return task_figures.segmentation_grid(pictures, masks, maps, _region_name(prepared.target, card), title)
    if task == "detect":
        valid = details["labels"] >= 0
        detections = task_figures.Detections(details["boxes"], details["labels"], details["scores"], valid)
        return task_figures.detection_grid(pictures, detections, maps, card.classes, title)
    if task == "multilabel":
        assert result.logits is not None and result.targets is not None
        labels = result.targets.cpu()
        probabilities = result.logits.float().sigmoid().cpu().gather(1, labels)
        valid = result.valid.cpu() if result.valid is not None else torch.ones_like(labels, dtype=torch.bool)
        return task_figures.multilabel_grid(pictures, labels, probabilities, valid, maps, card.classes, title)
    assert options.reference is not None and result.scores is not None
    reference = card.denormalize(options.reference.cpu()).clamp(0, 1)[0]
    return task_figures.similarity_grid(reference, pictures, result.scores.cpu(), maps, title)


def _region_name(target: Target, card: ModelCard) -> str:
    category = getattr(target, "category", None)
    return card.classes[category] if isinstance(category, int) and category < len(card.classes) else str(category)


def _explained(prepared: PreparedTask, result: Explanation, names: Sequence[str], card: ModelCard) -> list[dict[str, Any]]:
    """Per image, what its maps explain (boxes and scores, labels, the region, the similarity)."""
    task = prepared.task
    rows: list[dict[str, Any]] = []
    details = {k: v.cpu() for k, v in (result.target.details if result.target else {}).items()}
    for i, name in enumerate(names):
        row: dict[str, Any] = {"image": str(name)}
        if task == "detect":
            row["boxes"] = [
                {"label": card.classes[int(label)], "score": round(float(score), 4), "box": [round(float(v), 1) for v in box]}
                for box, label, score in zip(details["boxes"][i], details["labels"][i], details["scores"][i])
                if label >= 0
            ]
        elif task == "segment":
            row["region"] = _region_name(prepared.target, card)
            row["region_pixels"] = int(details["mask"][i].sum())
        elif task == "multilabel" and result.targets is not None and result.logits is not None:
            valid = result.valid[i].cpu() if result.valid is not None else None
            labels = result.targets[i].cpu()
            probabilities = result.logits[i].float().sigmoid().cpu()
            row["labels"] = [
                {"label": card.classes[int(k)], "probability": round(float(probabilities[k]), 4)}
                for j, k in enumerate(labels)
                if valid is None or bool(valid[j])
            ]
        elif task == "similarity" and result.scores is not None:
            row["cosine_similarity"] = round(float(result.scores[i]), 4)
        rows.append(row)
    return rows


def explain_one(
    explainer: Explainer,
    card: ModelCard,
    image: torch.Tensor,
    prepared: PreparedTask,
    options: TaskOptions,
    name: str,
    title: str,
) -> tuple[Any, dict[str, Any]]:
    """One preprocessed ``(1, C, H, W)`` image (on the model's device) explained for ``prepared``'s
    target with one method: the task's figure (as :func:`explain_task` draws it) and the row of
    ``summary.json``'s ``"explained"`` that says what its maps explain (the web app shows both)."""
    result = explainer.explain(image, prepared.target)
    pictures = card.denormalize(image.cpu()).clamp(0, 1)
    return _figure(prepared, pictures, result, card, options, title), _explained(prepared, result, [name], card)[0]
