"""The ``explain`` job: scan test images (or explain given files) and write the figures.

Scanning is streamed batch by batch (memory flat in the dataset size) through a DataLoader
with workers. Predictions stay on the device until the scan ends; only the few images that
are drawn are explained and rendered afterwards, fetched again by index.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import Dataset, Subset
from tqdm.auto import tqdm

from explainkit import visualize
from explainkit.card import ModelCard
from explainkit.data import make_loader
from explainkit.explainers.base import Explanation
from explainkit.io import atomic_path, write_json

SCHEMA_VERSION = 1


@dataclass
class ExplainResult:
    """What the job wrote and measured (also written as ``summary.json``)."""

    summary: dict[str, Any]
    outputs: list[Path] = field(default_factory=list)


def _explain_batch(explainer: Any, model: nn.Module, images: torch.Tensor, targets: Any) -> Explanation:
    """Explanations from our explainers, or from any plugin callable that only returns maps."""
    if hasattr(explainer, "explain"):
        return explainer.explain(images, targets)
    maps = explainer(images, targets)
    with torch.no_grad():
        logits = model(images)
    return Explanation(maps, logits, None)


def _stack(dataset: Dataset, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    items = [dataset[i] for i in indices]
    if not items:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


def pick_samples(labels: torch.Tensor, count: int) -> list[int]:
    """Indices of the first ``count`` images of distinct classes (then repeats if classes run out)."""
    chosen, seen = [], set()
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


def scan(
    model: nn.Module,
    dataset: Dataset,
    device: torch.device,
    batch_size: int,
    explainers: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Predict every image (and, with ``explainers``, explain its predicted class with each).

    Returns ``predictions``, ``labels``, ``probabilities`` (of the prediction) as CPU tensors,
    ``maps`` per method (CPU float16) when explainers are given, and ``seconds``.
    """
    loader = make_loader(dataset, batch_size, device)
    predictions, labels, confidence = [], [], []
    maps: dict[str, list[torch.Tensor]] = {name: [] for name in explainers or {}}
    start = time.perf_counter()
    model.eval()
    for images, batch_labels in tqdm(loader, desc="explain" if explainers else "scan", unit="batch", delay=2, leave=False):
        images = images.to(device, non_blocking=True)
        if device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        if explainers:
            logits = None
            for name, explainer in explainers.items():
                result = _explain_batch(explainer, model, images, None)
                maps[name].append(result.maps.to(torch.float16).cpu())
                logits = result.logits if logits is None else logits
        else:
            with torch.inference_mode():
                logits = model(images)
        probabilities = logits.float().softmax(dim=1)
        top, predicted = probabilities.max(dim=1)
        predictions.append(predicted)
        confidence.append(top)
        labels.append(batch_labels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {
        "predictions": torch.cat(predictions).cpu(),
        "probabilities": torch.cat(confidence).cpu(),
        "labels": torch.cat(labels),
        "maps": {name: torch.cat(chunks) for name, chunks in maps.items()},
        "seconds": seconds,
    }


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, **arrays)


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
    meta: dict[str, Any] | None = None,
) -> ExplainResult:
    """Scan ``dataset`` (``limit`` evenly spaced images, default all) and write ``per_class.png``,
    ``misclassified.png``, ``methods.png`` (several methods), ``summary.json`` and, with
    ``save_maps``, ``maps.npz``. The first method drives the per-class and misclassified grids."""
    if limit is not None and limit < len(dataset):
        # Evenly spaced, so a limited scan of a class-sorted ImageFolder still spans every class.
        dataset = Subset(dataset, torch.linspace(0, len(dataset) - 1, limit).long().tolist())
    primary_name, primary = next(iter(explainers.items()))
    started = time.perf_counter()
    scanned = scan(model, dataset, device, batch_size, explainers if save_maps else None)
    predictions, labels = scanned["predictions"], scanned["labels"]
    wrong = (predictions != labels).nonzero().flatten()
    outputs: list[Path] = []
    classes = card.classes

    draw_start = time.perf_counter()
    sample_indices = pick_samples(labels, samples)
    sample_images, sample_labels = _stack(dataset, sample_indices)
    if len(sample_indices):
        batch = sample_images.to(device)
        per_class = _explain_batch(primary, model, batch, "all")
        figure = visualize.per_class_grid(
            card.denormalize(sample_images),
            per_class.maps.cpu(),
            per_class.probabilities.cpu(),
            classes,
            labels=[f"true: {classes[y]}" for y in sample_labels.tolist()],
            title=f"{primary_name} @ {getattr(primary, 'layer_name', '-')}: CAM for every class (probability)",
        )
        outputs.append(visualize.save_figure(figure, out / "per_class.png"))
        if len(explainers) > 1:
            outputs.append(_methods_figure(explainers, model, batch, card, out, sample_labels))

    wrong_indices = wrong[:misclassified].tolist()
    wrong_images, wrong_labels = _stack(dataset, wrong_indices)
    wrong_predicted = predictions[wrong_indices] if wrong_indices else torch.empty(0, dtype=torch.long)
    if wrong_indices:
        batch = wrong_images.to(device)
        predicted_maps = _explain_batch(primary, model, batch, wrong_predicted.to(device)).maps.cpu()
        true_maps = _explain_batch(primary, model, batch, wrong_labels.to(device)).maps.cpu()
    else:
        predicted_maps = true_maps = torch.empty(0)
    figure = visualize.misclassified_grid(
        card.denormalize(wrong_images) if wrong_indices else wrong_images,
        predicted_maps,
        true_maps,
        wrong_predicted.tolist(),
        wrong_labels.tolist(),
        scanned["probabilities"][wrong_indices].tolist() if wrong_indices else [],
        classes,
        total_wrong=len(wrong),
        scanned=len(labels),
        title=f"{primary_name} @ {getattr(primary, 'layer_name', '-')}",
    )
    outputs.append(visualize.save_figure(figure, out / "misclassified.png"))

    if save_maps:
        arrays = {f"maps_{name}": m.numpy() for name, m in scanned["maps"].items()}
        _save_npz(
            out / "maps.npz",
            predictions=predictions.numpy(),
            labels=labels.numpy(),
            probabilities=scanned["probabilities"].numpy(),
            **arrays,
        )
        outputs.append(out / "maps.npz")

    images = len(labels)
    summary = {
        "schema_version": SCHEMA_VERSION,
        **(meta or {}),
        "layer": getattr(primary, "layer_name", None),
        "methods": list(explainers),
        "images": images,
        "accuracy": round(float((predictions == labels).double().mean()), 6) if images else None,
        "misclassified": int(len(wrong)),
        "timings": {
            "scan_seconds": round(scanned["seconds"], 3),
            "scan_images_per_second": round(images / scanned["seconds"], 1) if scanned["seconds"] > 0 else None,
            "figures_seconds": round(time.perf_counter() - draw_start, 3),
            "total_seconds": round(time.perf_counter() - started, 3),
        },
    }
    summary["outputs"] = [p.name for p in outputs] + ["summary.json"]
    write_json(out / "summary.json", summary)
    return ExplainResult(summary, outputs + [out / "summary.json"])


def _methods_figure(explainers: dict[str, Any], model: nn.Module, batch: torch.Tensor, card: ModelCard, out: Path, labels: torch.Tensor | None) -> Path:
    results = {name: _explain_batch(explainer, model, batch, None) for name, explainer in explainers.items()}
    first = next(iter(results.values()))
    predicted = first.probabilities.argmax(dim=1).cpu().tolist()
    row_labels = []
    for row, pred in enumerate(predicted):
        text = f"pred {card.classes[pred]}"
        if labels is not None:
            text += f"\ntrue {card.classes[int(labels[row])]}"
        row_labels.append(text)
    figure = visualize.methods_grid(
        card.denormalize(batch.cpu()),
        {name: result.maps.cpu() for name, result in results.items()},
        row_labels,
        title="CAM for the predicted class, by method",
    )
    return visualize.save_figure(figure, out / "methods.png")


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
) -> ExplainResult:
    """Explain given images (already preprocessed): ``per_class.png``, ``methods.png``, ``summary.json``."""
    primary_name, primary = next(iter(explainers.items()))
    started = time.perf_counter()
    batch = images.to(device)
    per_class = _explain_batch(primary, model, batch, "all")
    probabilities = per_class.probabilities.cpu()
    confidence, predicted = probabilities.max(dim=1)
    outputs = [
        visualize.save_figure(
            visualize.per_class_grid(
                card.denormalize(images),
                per_class.maps.cpu(),
                probabilities,
                card.classes,
                labels=[Path(n).name for n in names],
                title=f"{primary_name} @ {getattr(primary, 'layer_name', '-')}: CAM for every class (probability)",
            ),
            out / "per_class.png",
        )
    ]
    if len(explainers) > 1:
        outputs.append(_methods_figure(explainers, model, batch, card, out, None))
    if save_maps:
        arrays = {f"maps_{name}": _explain_batch(e, model, batch, None).maps.cpu().numpy() for name, e in explainers.items()}
        _save_npz(out / "maps.npz", probabilities=probabilities.numpy(), **arrays)
        outputs.append(out / "maps.npz")
    summary = {
        "schema_version": SCHEMA_VERSION,
        **(meta or {}),
        "layer": getattr(primary, "layer_name", None),
        "methods": list(explainers),
        "images": len(names),
        "predictions": [
            {"image": str(name), "predicted": card.classes[p], "probability": round(float(c), 4)}
            for name, p, c in zip(names, predicted.tolist(), confidence.tolist())
        ],
        "timings": {"total_seconds": round(time.perf_counter() - started, 3)},
    }
    summary["outputs"] = [p.name for p in outputs] + ["summary.json"]
    write_json(out / "summary.json", summary)
    return ExplainResult(summary, outputs + [out / "summary.json"])
