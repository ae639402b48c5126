"""The ``explain`` job: scan test images (or explain given files) and write the figures.

Scanning is streamed batch by batch (memory flat in the dataset size) through a DataLoader
with workers. Predictions stay on the device until the scan ends; only the few images that
are drawn are explained and rendered afterwards, fetched again by index.
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn
from torch.utils.data import Dataset, Subset
from tqdm.auto import tqdm

from explainkit import figures
from explainkit.data.datasets import dataset_size, make_loader
from explainkit.errors import ExplainkitError
from explainkit.explainers.base import (
    ALL,
    TOPK,
    Explainer,
    Explanation,
    class_sets,
    evaluation_mode,
    parse_topk,
)
from explainkit.jobs.maps_store import STORE_NAME, MapsStore
from explainkit.models.card import ModelCard
from explainkit.models.outputs import logits_of
from explainkit.runtime.distributed import DistContext
from explainkit.runtime.io import write_json

SCHEMA_VERSION = 1
MAX_CLASSES_SHOWN = 20  # per_class.png shows every class up to this many, else the top-k
AUTO_TOPK = 5


@dataclass
class ExplainResult:
    """What the job wrote and measured (also written as ``summary.json``)."""

    summary: dict[str, Any]
    outputs: list[Path] = field(default_factory=list)


def parse_figure_targets(text: str) -> str | tuple[str, int]:
    """``--targets``: ``"auto"``, ``"all"`` or ``("topk", k)``; anything else is a clear error."""
    if text in ("auto", ALL):
        return text
    k = parse_topk(text)
    if k is None:
        raise ExplainkitError(f"--targets {text!r}: use auto, all or topk:K (e.g. topk:5)")
    return (TOPK, k)


def figure_targets(text: str, num_classes: int) -> str | tuple[str, int]:
    """The per-class figure's targets: every class for small models, the top-k for large ones."""
    parsed = parse_figure_targets(text)
    if parsed == "auto":
        return ALL if num_classes <= MAX_CLASSES_SHOWN else (TOPK, AUTO_TOPK)
    return parsed


def _per_class_title(name: str, explainer: Explainer, targets: str | tuple[str, int]) -> str:
    shown = "every class" if targets == ALL else f"the top {targets[1]} classes"
    return f"{name} @ {explainer.layer_name or '-'}: CAM for {shown} (probability)"


def _summary(meta: dict[str, Any] | None, explainers: dict[str, Explainer], images: int, **fields: Any) -> dict[str, Any]:
    """The ``summary.json`` fields every explain run shares, then the run's own."""
    primary = next(iter(explainers.values()))
    return {
        "schema_version": SCHEMA_VERSION,
        **(meta or {}),
        "layer": primary.layer_name,
        "methods": list(explainers),
        "images": images,
        **fields,
    }


def _shown_classes(result: Explanation) -> torch.Tensor | None:
    """The ``(N, J)`` classes of a multi-class explanation; ``None`` when it covers every class."""
    if result.targets is None:
        return None
    classes = class_sets(result.targets, result.logits)
    return None if classes is None else classes.cpu()


def _stack(dataset: Dataset, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    items = [dataset[i] for i in indices]
    if not items:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


def pick_samples(labels: torch.Tensor, count: int) -> list[int]:
    """Indices of the first ``count`` images of distinct classes (then repeats if classes run out)."""
    chosen: list[int] = []
    seen: set[int] = set()
    for index, label in enumerate(labels.tolist()):
        if len(chosen) == count:
            break
        if label not in seen:
            seen.add(label)
            chosen.append(index)
    for index in range(len(labels)):
        if len(chosen) >= count:
            break
        if index not in chosen:
            chosen.append(index)
    return chosen


def pick_misclassified(predictions: torch.Tensor, labels: torch.Tensor, confidence: torch.Tensor, count: int) -> list[int]:
    """Up to ``count`` wrong predictions spread over the true classes: one per class in turn
    (classes ordered by their most confident mistake), each class's most confident first.

    Why: a scan of a class-sorted ImageFolder puts every airplane first, so "the first N wrong"
    would show N airplanes.
    """
    wrong = (predictions != labels).nonzero().flatten()
    if count == 0 or len(wrong) == 0:
        return []
    order = wrong[confidence[wrong].argsort(descending=True, stable=True)]  # most confident first
    queues: dict[int, list[int]] = {}
    for index in order.tolist():
        queues.setdefault(int(labels[index]), []).append(index)
    chosen: list[int] = []
    while len(chosen) < count and any(queues.values()):
        for queue in queues.values():  # insertion order: by each class's most confident mistake
            if queue and len(chosen) < count:
                chosen.append(queue.pop(0))
    return chosen


def _forward(
    model: nn.Module, explainers: dict[str, Any] | None, images: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits and, with explainers, each method's maps for the predicted class of one batch."""
    maps: dict[str, torch.Tensor] = {}
    if not explainers:
        with torch.inference_mode():
            return logits_of(model(images)), maps
    logits = None
    for name, explainer in explainers.items():
        result = explainer.explain(images, None)
        maps[name] = result.maps
        logits = result.logits if logits is None else logits
    assert logits is not None
    return logits, maps


def scan(
    model: nn.Module,
    dataset: Dataset,
    device: torch.device,
    batch_size: int,
    explainers: dict[str, Any] | None = None,
    store: MapsStore | None = None,
    ctx: DistContext | None = None,
) -> dict[str, Any]:
    """Predict every image (and, with ``explainers``, explain its predicted class with each).

    Without ``store`` everything is kept in memory. With a :class:`MapsStore` each batch is one
    store chunk: this rank (``ctx``) computes its chunks that are not done yet and writes them as
    it goes, so memory stays flat and a killed run resumes where it stopped; the returned
    ``predictions``/``labels``/``probabilities`` then cover every rank's rows.

    Returns ``predictions``, ``labels``, ``probabilities`` (of the prediction) as CPU tensors,
    ``maps`` per method (CPU float16; in memory only, without a store) and ``seconds``.
    """
    ctx = ctx or DistContext()
    pending = store.pending(ctx.rank, ctx.world_size) if store is not None else []
    if store is not None:
        loader = make_loader(dataset, batch_size, device, batch_sampler=[store.chunk_indices(c) for c in pending])
    else:
        loader = make_loader(dataset, batch_size, device)
    predictions, labels, confidence = [], [], []
    maps: dict[str, list[torch.Tensor]] = {name: [] for name in explainers or {}}
    start = time.perf_counter()
    with evaluation_mode(model):
        progress = tqdm(
            loader, desc="explain" if explainers else "scan", unit="batch", delay=2, leave=False, disable=not ctx.is_main
        )
        for batch_number, (images, batch_labels) in enumerate(progress):
            images = images.to(device, non_blocking=True)
            if device.type == "cuda":
                images = images.contiguous(memory_format=torch.channels_last)
            logits, batch_maps = _forward(model, explainers, images)
            probabilities = logits.float().softmax(dim=1)
            top, predicted = probabilities.max(dim=1)
            if store is not None:
                store.write_chunk(pending[batch_number], predicted, batch_labels, top, batch_maps)
                continue
            for name, value in batch_maps.items():
                maps[name].append(value.to(torch.float16).cpu())
            predictions.append(predicted)
            confidence.append(top)
            labels.append(batch_labels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    ctx.barrier()  # every rank's chunks are written before anyone reads them
    seconds = time.perf_counter() - start
    if store is not None:
        return {**store.results(), "maps": {}, "seconds": seconds}
    return {
        "predictions": torch.cat(predictions).cpu() if predictions else torch.empty(0, dtype=torch.long),
        "probabilities": torch.cat(confidence).cpu() if confidence else torch.empty(0),
        "labels": torch.cat(labels) if labels else torch.empty(0, dtype=torch.long),
        "maps": {name: torch.cat(chunks) for name, chunks in maps.items()},
        "seconds": seconds,
    }


def open_store(
    out: Path,
    rows: int,
    chunk: int,
    methods: list[str],
    map_size: tuple[int, int],
    fingerprint: dict,
    resume: bool,
    ctx: DistContext,
) -> MapsStore:
    """Rank 0 creates the store (or reopens it for ``resume``); the other ranks open it after."""
    path = out / STORE_NAME
    if ctx.is_main:
        if resume and path.exists():
            store = MapsStore.open(path, fingerprint)
            left = len(store.pending())
            print(
                f"explainkit: resuming {path}: {store.num_chunks - left} of {store.num_chunks} chunks already done",
                file=sys.stderr,
            )
        else:
            store = MapsStore.create(path, rows, chunk, methods, map_size, fingerprint)
    ctx.barrier()
    if not ctx.is_main:
        store = MapsStore.open(path, fingerprint)
    return store


def explain_dataset(
    model: nn.Module,
    card: ModelCard,
    explainers: dict[str, Any],
    dataset: Dataset,
    out: Path,
    device: torch.device,
    *,
    samples: int = 3,
    misclassified: int = 10,
    limit: int | None = None,
    batch_size: int = 128,
    save_maps: bool = False,
    resume: bool = False,
    meta: dict[str, Any] | None = None,
    ctx: DistContext | None = None,
    targets: str = "auto",
) -> ExplainResult:
    """Scan ``dataset`` (``limit`` evenly spaced images, default all) and write ``per_class.png``,
    ``misclassified.png``, ``methods.png`` (several methods), ``confusion_matrix.png`` (up to 20
    classes), ``summary.json``, ``report.html`` and, with
    ``save_maps``, every map into ``maps.zarr`` (:mod:`explainkit.jobs.maps_store`). The first method
    drives the per-class and misclassified grids.

    Under ``torchrun`` (``ctx`` with several ranks) the scan is sharded across ranks through the
    store; rank 0 draws the figures and writes the summary, the other ranks return an empty result.
    ``resume`` continues an interrupted ``--save-maps`` run from the chunks it finished.
    """
    ctx = ctx or DistContext()
    if limit is not None and limit < dataset_size(dataset):
        # Evenly spaced, so a limited scan of a class-sorted ImageFolder still spans every class.
        dataset = Subset(dataset, torch.linspace(0, dataset_size(dataset) - 1, limit).long().tolist())
    primary_name, primary = next(iter(explainers.items()))
    layer_name = primary.layer_name
    started = time.perf_counter()
    store = None
    if save_maps or ctx.enabled:  # several ranks always merge through the store
        stored_methods = list(explainers) if save_maps else []
        fingerprint = {
            "methods": stored_methods,
            "rows": dataset_size(dataset),
            "chunk": batch_size,
            "layer": layer_name,
            "model": (meta or {}).get("model"),
        }
        store = open_store(out, dataset_size(dataset), batch_size, stored_methods, card.image_size, fingerprint, resume, ctx)
    scanned = scan(model, dataset, device, batch_size, explainers if save_maps else None, store, ctx)
    if not ctx.is_main:
        return ExplainResult({}, [])
    if store is not None and not save_maps:
        shutil.rmtree(store.path)  # only carried the ranks' predictions
    predictions, labels = scanned["predictions"], scanned["labels"]
    wrong = (predictions != labels).nonzero().flatten()
    outputs: list[Path] = []
    classes = card.classes

    draw_start = time.perf_counter()
    sample_indices = pick_samples(labels, samples)
    sample_images, sample_labels = _stack(dataset, sample_indices)
    if len(sample_indices):
        batch = sample_images.to(device)
        shown = figure_targets(targets, card.num_classes)
        per_class = primary.explain(batch, shown)
        figure = figures.per_class_grid(
            card.denormalize(sample_images),
            per_class.maps.cpu(),
            per_class.probabilities.cpu(),
            classes,
            labels=[f"true: {classes[y]}" for y in sample_labels.tolist()],
            title=_per_class_title(primary_name, primary, shown),
            class_indices=_shown_classes(per_class),
        )
        outputs.append(figures.save_figure(figure, out / "per_class.png"))
        if len(explainers) > 1:
            outputs.append(_methods_figure(_explain_all_methods(explainers, model, batch), batch, card, out, sample_labels))

    if card.num_classes <= MAX_CLASSES_SHOWN and len(labels):
        confusion = torch.zeros(card.num_classes, card.num_classes, dtype=torch.long)
        confusion.index_put_((labels, predictions), torch.ones_like(labels), accumulate=True)
        figure = figures.confusion_figure(confusion, classes)
        outputs.append(figures.save_figure(figure, out / "confusion_matrix.png"))

    wrong_indices = pick_misclassified(predictions, labels, scanned["probabilities"], misclassified)
    wrong_images, wrong_labels = _stack(dataset, wrong_indices)
    wrong_predicted = predictions[wrong_indices] if wrong_indices else torch.empty(0, dtype=torch.long)
    if wrong_indices:
        batch = wrong_images.to(device)
        predicted_maps = primary.explain(batch, wrong_predicted.to(device)).maps.cpu()
        true_maps = primary.explain(batch, wrong_labels.to(device)).maps.cpu()
    else:
        predicted_maps = true_maps = torch.empty(0)
    figure = figures.misclassified_grid(
        card.denormalize(wrong_images) if wrong_indices else wrong_images,
        predicted_maps,
        true_maps,
        wrong_predicted.tolist(),
        wrong_labels.tolist(),
        scanned["probabilities"][wrong_indices].tolist() if wrong_indices else [],
        classes,
        total_wrong=len(wrong),
        scanned=len(labels),
        title=f"{primary_name} @ {layer_name or '-'}",
    )
    outputs.append(figures.save_figure(figure, out / "misclassified.png"))

    if save_maps:
        outputs.append(out / STORE_NAME)

    images = len(labels)
    summary = _summary(
        meta,
        explainers,
        images,
        accuracy=round(float((predictions == labels).double().mean()), 6) if images else None,
        misclassified=int(len(wrong)),
        world_size=ctx.world_size,
        timings={
            "scan_seconds": round(scanned["seconds"], 3),
            "scan_images_per_second": round(images / scanned["seconds"], 1) if scanned["seconds"] > 0 else None,
            "figures_seconds": round(time.perf_counter() - draw_start, 3),
            "total_seconds": round(time.perf_counter() - started, 3),
        },
    )
    return _finish(out, summary, outputs)


def _finish(out: Path, summary: dict[str, Any], outputs: list[Path]) -> ExplainResult:
    """Write ``summary.json`` and, from the folder, ``report.html``."""
    from explainkit.jobs.report import REPORT_NAME, write_report

    summary["outputs"] = [p.name for p in outputs] + ["summary.json", REPORT_NAME]
    write_json(out / "summary.json", summary)
    report = write_report(out)
    return ExplainResult(summary, outputs + [out / "summary.json", report])


def _explain_all_methods(explainers: dict[str, Any], model: nn.Module, batch: torch.Tensor) -> dict[str, Explanation]:
    return {name: explainer.explain(batch, None) for name, explainer in explainers.items()}


def _methods_figure(
    results: dict[str, Explanation], batch: torch.Tensor, card: ModelCard, out: Path, labels: torch.Tensor | None
) -> Path:
    first = next(iter(results.values()))
    predicted = first.probabilities.argmax(dim=1).cpu().tolist()
    row_labels = []
    for row, pred in enumerate(predicted):
        text = f"pred {card.classes[pred]}"
        if labels is not None:
            text += f"\ntrue {card.classes[int(labels[row])]}"
        row_labels.append(text)
    figure = figures.methods_grid(
        card.denormalize(batch.cpu()),
        {name: result.maps.cpu() for name, result in results.items()},
        row_labels,
        title="CAM for the predicted class, by method",
    )
    return figures.save_figure(figure, out / "methods.png")


def explain_images(
    model: nn.Module,
    card: ModelCard,
    explainers: dict[str, Any],
    images: torch.Tensor,
    names: Sequence[str],
    out: Path,
    device: torch.device,
    *,
    save_maps: bool = False,
    meta: dict[str, Any] | None = None,
    targets: str = "auto",
) -> ExplainResult:
    """Explain given images (already preprocessed): ``per_class.png``, ``methods.png``, ``summary.json``."""
    primary_name, primary = next(iter(explainers.items()))
    started = time.perf_counter()
    batch = images.to(device)
    shown = figure_targets(targets, card.num_classes)
    per_class = primary.explain(batch, shown)
    probabilities = per_class.probabilities.cpu()
    confidence, predicted = probabilities.max(dim=1)
    outputs = [
        figures.save_figure(
            figures.per_class_grid(
                card.denormalize(images),
                per_class.maps.cpu(),
                probabilities,
                card.classes,
                labels=[Path(n).name for n in names],
                title=_per_class_title(primary_name, primary, shown),
                class_indices=_shown_classes(per_class),
            ),
            out / "per_class.png",
        )
    ]
    if len(explainers) > 1 or save_maps:
        results = _explain_all_methods(explainers, model, batch)  # once: the figure and the store share them
        if len(explainers) > 1:
            outputs.append(_methods_figure(results, batch, card, out, None))
        if save_maps:
            fingerprint = {"methods": list(explainers), "rows": len(names), "images": [str(n) for n in names]}
            store = MapsStore.create(out / STORE_NAME, len(names), len(names), list(explainers), card.image_size, fingerprint)
            labels = torch.full((len(names),), -1, dtype=torch.long)  # files have no labels
            store.write_chunk(0, predicted, labels, confidence, {name: r.maps for name, r in results.items()})
            outputs.append(out / STORE_NAME)
    summary = _summary(
        meta,
        explainers,
        len(names),
        predictions=[
            {"image": str(name), "predicted": card.classes[p], "probability": round(float(c), 4)}
            for name, p, c in zip(names, predicted.tolist(), confidence.tolist())
        ],
        timings={"total_seconds": round(time.perf_counter() - started, 3)},
    )
    return _finish(out, summary, outputs)
