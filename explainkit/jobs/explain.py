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
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from explainkit import figures
from explainkit.data.datasets import dataset_size, limit_evenly, make_loader
from explainkit.errors import ExplainkitError
from explainkit.explainers.base import (
    ALL,
    TOPK,
    Explainer,
    Explanation,
    evaluation_mode,
    parse_topk,
)
from explainkit.jobs.maps_store import STORE_NAME, MapsStore
from explainkit.models.card import ModelCard
from explainkit.models.outputs import logits_of
from explainkit.runtime.device import device_layout
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


@dataclass(frozen=True)
class ExplainOptions:
    """How an explain job runs, besides its model, explainers, data and output folder.

    samples: images in ``per_class.png``. misclassified: rows in ``misclassified.png``.
    limit: images scanned, evenly spaced (``None``: all). batch_size: images per forward (and per
    chunk of the maps store). save_maps: also write every map to ``maps.zarr``. resume: continue an
    interrupted ``save_maps`` run. targets: the per-class figure's classes (``"auto"``, ``"all"``,
    ``"topk:K"``). meta: fields copied into ``summary.json`` (model, device, provenance, card).
    """

    samples: int = 3
    misclassified: int = 10
    limit: int | None = None
    batch_size: int = 128
    save_maps: bool = False
    resume: bool = False
    targets: str = "auto"
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class ScanResult:
    """One pass over a dataset: per image the ``predictions``, ``labels`` and the ``probabilities``
    of the prediction (CPU tensors); ``maps`` per method (CPU float16, kept only without a store);
    the ``seconds`` it took."""

    predictions: torch.Tensor
    labels: torch.Tensor
    probabilities: torch.Tensor
    maps: dict[str, torch.Tensor]
    seconds: float

    @property
    def accuracy(self) -> float | None:
        return round(float((self.predictions == self.labels).double().mean()), 6) if len(self.labels) else None


def parse_figure_targets(text: str) -> str | tuple[str, int]:
    """``targets``: ``"auto"``, ``"all"`` or ``("topk", k)``; anything else is a clear error."""
    if text in ("auto", ALL):
        return text
    k = parse_topk(text)
    if k is None:
        raise ExplainkitError(f"targets={text!r}: use auto, all or topk:K (e.g. topk:5)")
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


def _summary(meta: dict[str, Any], explainers: dict[str, Explainer], images: int, **fields: Any) -> dict[str, Any]:
    """The ``summary.json`` fields every explain run shares, then the run's own."""
    primary = next(iter(explainers.values()))
    return {
        "schema_version": SCHEMA_VERSION,
        **meta,
        "layer": primary.layer_name,
        "methods": list(explainers),
        "images": images,
        **fields,
    }


def _shown_classes(result: Explanation) -> torch.Tensor | None:
    """The ``(N, J)`` classes of a multi-class explanation; ``None`` when it covers every class."""
    if result.targets is None or result.targets.ndim != 2:
        return None
    return result.targets.cpu()


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
) -> ScanResult:
    """Predict every image (and, with ``explainers``, explain its predicted class with each).

    Without ``store`` everything is kept in memory. With a :class:`MapsStore` each batch is one
    store chunk: this rank (``ctx``) computes its chunks that are not done yet and writes them as
    it goes, so memory stays flat and a killed run resumes where it stopped; the returned
    ``predictions``/``labels``/``probabilities`` then cover every rank's rows.

    Returns a :class:`ScanResult` (maps kept in memory only without a store).
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
            images = device_layout(images.to(device, non_blocking=True), device)
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
        return ScanResult(**store.results(), maps={}, seconds=seconds)
    return ScanResult(
        predictions=torch.cat(predictions).cpu() if predictions else torch.empty(0, dtype=torch.long),
        labels=torch.cat(labels) if labels else torch.empty(0, dtype=torch.long),
        probabilities=torch.cat(confidence).cpu() if confidence else torch.empty(0),
        maps={name: torch.cat(chunks) for name, chunks in maps.items()},
        seconds=seconds,
    )


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
            damaged = store.damaged()
            if damaged:
                store.recompute(damaged)
                shown = ", ".join(map(str, damaged[:10])) + (" ..." if len(damaged) > 10 else "")
                print(
                    f"explainkit: {len(damaged)} finished chunks of {path} are damaged on disk ({shown}); recomputing them",
                    file=sys.stderr,
                )
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
    explainers: dict[str, Explainer],
    dataset: Dataset,
    out: Path,
    device: torch.device,
    options: ExplainOptions | None = None,
    ctx: DistContext | None = None,
) -> ExplainResult:
    """Scan ``dataset`` and write ``per_class.png``, ``misclassified.png``, ``methods.png`` (several
    methods), ``confusion_matrix.png`` (up to 20 classes), ``summary.json``, ``report.html`` and, with
    ``options.save_maps``, every map into ``maps.zarr`` (:mod:`explainkit.jobs.maps_store`). The
    first method drives the per-class and misclassified grids.

    Steps: limit the data -> open the store -> scan -> figures -> summary and report. Under
    ``torchrun`` (``ctx`` with several ranks) the scan is sharded across ranks through the store;
    rank 0 draws the figures and writes the summary, the other ranks return an empty result.
    """
    ctx = ctx or DistContext()
    options = options or ExplainOptions()
    started = time.perf_counter()
    dataset = limit_evenly(dataset, options.limit)
    store = _store_for_scan(out, card, explainers, dataset, options, ctx)
    scanned = scan(model, dataset, device, options.batch_size, explainers if options.save_maps else None, store, ctx)
    if not ctx.is_main:
        return ExplainResult({}, [])
    if store is not None and not options.save_maps:
        shutil.rmtree(store.path)  # only carried the ranks' predictions
    draw_start = time.perf_counter()
    outputs = _sample_figures(explainers, card, dataset, scanned, out, device, options)
    if card.num_classes <= MAX_CLASSES_SHOWN and len(scanned.labels):
        outputs.append(_confusion_figure(scanned, card, out))
    outputs.append(_misclassified_figure(explainers, card, dataset, scanned, out, device, options.misclassified))
    if options.save_maps:
        outputs.append(out / STORE_NAME)
    images = len(scanned.labels)
    summary = _summary(
        options.meta,
        explainers,
        images,
        accuracy=scanned.accuracy,
        misclassified=int((scanned.predictions != scanned.labels).sum()),
        world_size=ctx.world_size,
        timings={
            "scan_seconds": round(scanned.seconds, 3),
            "scan_images_per_second": round(images / scanned.seconds, 1) if scanned.seconds > 0 else None,
            "figures_seconds": round(time.perf_counter() - draw_start, 3),
            "total_seconds": round(time.perf_counter() - started, 3),
        },
    )
    return finish_job(out, summary, outputs)


def _store_for_scan(
    out: Path, card: ModelCard, explainers: dict[str, Explainer], dataset: Dataset, options: ExplainOptions, ctx: DistContext
) -> MapsStore | None:
    """The maps store the scan writes: with ``save_maps``, and always under several ranks (they
    merge their predictions through it)."""
    if not (options.save_maps or ctx.enabled):
        return None
    stored_methods = list(explainers) if options.save_maps else []
    rows = dataset_size(dataset)
    fingerprint = {
        "methods": stored_methods,
        "rows": rows,
        "chunk": options.batch_size,
        "layer": _primary(explainers)[1].layer_name,
        "model": options.meta.get("model"),
    }
    return open_store(out, rows, options.batch_size, stored_methods, card.image_size, fingerprint, options.resume, ctx)


def _primary(explainers: dict[str, Explainer]) -> tuple[str, Explainer]:
    """The first method: it draws the per-class and misclassified grids."""
    return next(iter(explainers.items()))


def _sample_figures(
    explainers: dict[str, Explainer],
    card: ModelCard,
    dataset: Dataset,
    scanned: ScanResult,
    out: Path,
    device: torch.device,
    options: ExplainOptions,
) -> list[Path]:
    """``per_class.png`` for a few images of distinct classes, and ``methods.png`` for several methods."""
    indices = pick_samples(scanned.labels, options.samples)
    if not indices:
        return []
    images, labels = _stack(dataset, indices)
    batch = images.to(device)
    row_labels = [f"true: {card.classes[y]}" for y in labels.tolist()]
    outputs = [_per_class_figure(explainers, card, images, batch, row_labels, options.targets, out)[0]]
    if len(explainers) > 1:
        outputs.append(_methods_figure(_explain_all_methods(explainers, batch), batch, card, out, labels))
    return outputs


def _per_class_figure(
    explainers: dict[str, Explainer],
    card: ModelCard,
    images: torch.Tensor,
    batch: torch.Tensor,
    row_labels: list[str],
    targets: str,
    out: Path,
) -> tuple[Path, Explanation]:
    """``per_class.png``: the first method's maps of ``batch`` for the figure's classes (every class,
    or each image's top k), and the explanation they came from."""
    name, primary = _primary(explainers)
    shown = figure_targets(targets, card.num_classes)
    per_class = primary.explain(batch, shown)
    figure = figures.per_class_grid(
        card.denormalize(images),
        per_class.maps.cpu(),
        per_class.probabilities.cpu(),
        card.classes,
        labels=row_labels,
        title=_per_class_title(name, primary, shown),
        class_indices=_shown_classes(per_class),
    )
    return figures.save_figure(figure, out / "per_class.png"), per_class


def _confusion_figure(scanned: ScanResult, card: ModelCard, out: Path) -> Path:
    confusion = torch.zeros(card.num_classes, card.num_classes, dtype=torch.long)
    confusion.index_put_((scanned.labels, scanned.predictions), torch.ones_like(scanned.labels), accumulate=True)
    return figures.save_figure(figures.confusion_figure(confusion, card.classes), out / "confusion_matrix.png")


def _misclassified_figure(
    explainers: dict[str, Explainer],
    card: ModelCard,
    dataset: Dataset,
    scanned: ScanResult,
    out: Path,
    device: torch.device,
    rows: int,
) -> Path:
    """``misclassified.png``: ``rows`` mistakes spread over the true classes, each with the map of
    the predicted class and of the true one."""
    name, primary = _primary(explainers)
    indices = pick_misclassified(scanned.predictions, scanned.labels, scanned.probabilities, rows)
    images, truth = _stack(dataset, indices)
    predicted = scanned.predictions[indices] if indices else torch.empty(0, dtype=torch.long)
    if indices:
        batch = images.to(device)
        predicted_maps = primary.explain(batch, predicted.to(device)).maps.cpu()
        true_maps = primary.explain(batch, truth.to(device)).maps.cpu()
    else:
        predicted_maps = true_maps = torch.empty(0)
    wrong = figures.Misclassified(
        card.denormalize(images) if indices else images,
        predicted_maps,
        true_maps,
        predicted.tolist(),
        truth.tolist(),
        scanned.probabilities[indices].tolist() if indices else [],
    )
    figure = figures.misclassified_grid(
        wrong,
        card.classes,
        total_wrong=int((scanned.predictions != scanned.labels).sum()),
        scanned=len(scanned.labels),
        title=f"{name} @ {primary.layer_name or '-'}",
    )
    return figures.save_figure(figure, out / "misclassified.png")


def finish_job(out: Path, summary: dict[str, Any], outputs: list[Path]) -> ExplainResult:
    """Write ``summary.json`` and, from the folder, ``report.html``."""
    from explainkit.jobs.report import REPORT_NAME, write_report

    summary["outputs"] = [p.name for p in outputs] + ["summary.json", REPORT_NAME]
    write_json(out / "summary.json", summary)
    report = write_report(out)
    return ExplainResult(summary, outputs + [out / "summary.json", report])


def _explain_all_methods(explainers: dict[str, Explainer], batch: torch.Tensor) -> dict[str, Explanation]:
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
    card: ModelCard,
    explainers: dict[str, Explainer],
    images: torch.Tensor,
    names: Sequence[str],
    out: Path,
    device: torch.device,
    options: ExplainOptions | None = None,
) -> ExplainResult:
    """Explain given images (already preprocessed): ``per_class.png``, ``methods.png`` (several
    methods), ``summary.json``, ``report.html`` and, with ``options.save_maps``, ``maps.zarr``."""
    options = options or ExplainOptions()
    save_maps, meta, targets = options.save_maps, options.meta, options.targets
    started = time.perf_counter()
    batch = images.to(device)
    figure, per_class = _per_class_figure(explainers, card, images, batch, [Path(n).name for n in names], targets, out)
    confidence, predicted = per_class.probabilities.cpu().max(dim=1)
    outputs = [figure]
    if len(explainers) > 1 or save_maps:
        results = _explain_all_methods(explainers, batch)  # once: the figure and the store share them
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
    return finish_job(out, summary, outputs)
