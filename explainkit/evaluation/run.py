"""``evaluate``: every metric for every method and baseline, with bootstrap confidence intervals."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from explainkit.errors import ExplainkitError
from explainkit.evaluation import metrics, synthetic
from explainkit.evaluation.baselines import BASELINE_PREFIX, BASELINES, make_baseline
from explainkit.evaluation.sanity import cascading_randomization
from explainkit.models.card import ModelCard
from explainkit.models.outputs import logits_of

SCHEMA_VERSION = 1
LOWER_IS_BETTER = {"deletion_auc", "average_drop", "road_morf"}
SKIPPABLE = ("deletion", "confidence", "road", "sanity")


@dataclass(frozen=True)
class FaithfulnessOptions:
    """How :func:`evaluate_faithfulness` measures: deletion/insertion in ``steps``, ``batch_size``
    images per forward, ``seed`` for the baselines, tie orders and the bootstrap, the parts to
    ``skip`` (of ``SKIPPABLE``; an unknown one is a clear error) and the ``baselines`` (of
    :data:`~explainkit.evaluation.baselines.BASELINES`) scored next to the methods."""

    steps: int = 32
    batch_size: int = 128
    seed: int = 0
    skip: frozenset[str] = frozenset()
    baselines: tuple[str, ...] = BASELINES

    def __post_init__(self) -> None:
        unknown = ",".join(sorted(set(self.skip) - set(SKIPPABLE)))
        if unknown:
            raise ExplainkitError(f"skip={unknown}: not a part to skip; choose from {', '.join(SKIPPABLE)}")
        unknown = ",".join(sorted(set(self.baselines) - set(BASELINES)))
        if unknown:
            raise ExplainkitError(f"baselines={unknown}: not a baseline; choose from {', '.join(BASELINES)}")


def collect_maps(name: str, explainer: Callable, images: torch.Tensor, targets: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Maps for the given targets in batches; a method returning the wrong shape is a clear error naming it."""
    chunks = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        try:
            maps = explainer(batch, targets[start : start + batch_size])
        except ExplainkitError:
            raise
        except Exception as exc:
            raise ExplainkitError(f"method {name!r} failed: {type(exc).__name__}: {exc}") from None
        expected = (len(batch), *batch.shape[-2:])
        if not isinstance(maps, torch.Tensor) or tuple(maps.shape) != expected:
            got = tuple(maps.shape) if isinstance(maps, torch.Tensor) else type(maps).__name__
            raise ExplainkitError(f"method {name!r} returned maps of shape {got}; expected {expected} (N, H, W)")
        chunks.append(maps.detach().float().to(images.device))
    return torch.cat(chunks)


def _summarise(per_image: dict[str, torch.Tensor], seed: int) -> dict[str, Any]:
    out: dict[str, Any] = {key: float(values.double().mean()) for key, values in per_image.items()}
    out["ci95"] = {key: list(metrics.bootstrap_ci(values, seed=seed)) for key, values in per_image.items()}
    return out


def _baseline(name: str, model: nn.Module, layer: str | None, seed: int) -> Callable:
    return make_baseline(name, model, layer, seed=seed)


def _maps_function(name: str, factory: Callable[[nn.Module], Callable], model: nn.Module, batch_size: int) -> Callable:
    """For the sanity check: ``(images, targets) -> maps`` of ``factory``'s explainer on ``model``."""
    return lambda images, targets: collect_maps(name, factory(model), images, targets, batch_size)


def evaluate_faithfulness(
    model: nn.Module,
    card: ModelCard,
    factories: dict[str, Callable[[nn.Module], Callable]],
    images: torch.Tensor,
    layer: str | None,
    options: FaithfulnessOptions = FaithfulnessOptions(),
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Scores for each method in ``factories`` (``model -> explainer``) and each baseline, measured
    as ``options`` say; the baselines explain at ``layer``.

    Returns the JSON-ready results and the mean deletion/insertion curves per method.
    """
    steps, batch_size, seed, skip = options.steps, options.batch_size, options.seed, options.skip
    model.eval()
    with torch.no_grad():  # not inference_mode: targets feed explainers that record autograd graphs
        targets = torch.cat([logits_of(model(images[s : s + batch_size])).argmax(1) for s in range(0, len(images), batch_size)])
    candidates: dict[str, Callable[[nn.Module], Callable]] = dict(factories)
    for name in options.baselines:  # a namespace of their own: a plugin method may be called "random" too
        candidates[BASELINE_PREFIX + name] = functools.partial(_baseline, name, layer=layer, seed=seed)
    results: dict[str, Any] = {}
    curves: dict[str, torch.Tensor] = {}
    for name, factory in tqdm(candidates.items(), desc="evaluate", unit="method", delay=2):
        maps = collect_maps(name, factory(model), images, targets, batch_size)
        per_image: dict[str, torch.Tensor] = {}
        if "deletion" not in skip:
            scores = metrics.deletion_insertion(model, images, maps, targets, steps, seed, batch_size)
            per_image["deletion_auc"], per_image["insertion_auc"] = scores["deletion_auc"], scores["insertion_auc"]
            curves[name] = torch.stack([scores["deletion_curve"].mean(0), scores["insertion_curve"].mean(0)]).cpu()
        if "confidence" not in skip:
            per_image["average_drop"], per_image["increase_in_confidence"] = metrics.average_drop_increase(
                model, images, maps, targets, card, batch_size
            )
        if "road" not in skip:
            per_image["road_morf"], per_image["road_lerf"] = metrics.road(model, images, maps, targets)
        results[name] = _summarise({k: v.cpu() for k, v in per_image.items()}, seed)
        if not name.startswith(BASELINE_PREFIX) and "sanity" not in skip:
            results[name]["sanity"] = cascading_randomization(
                model,
                functools.partial(_maps_function, name, factory, batch_size=batch_size),
                images,
                targets,
                seed,
            )
    return results, curves


def curves_figure(curves: dict[str, torch.Tensor]) -> Figure:
    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, 2)
    for name, pair in curves.items():
        x = torch.linspace(0, 1, pair.shape[1])
        style = "--" if name.startswith(BASELINE_PREFIX) else "-"
        for ax, curve in zip(axes, pair):
            ax.plot(x, curve, style, label=name)
    for ax, title in zip(axes, ("Deletion (lower AUC is better)", "Insertion (higher AUC is better)")):
        ax.set_title(title)
        ax.set_xlabel("fraction of pixels removed" if "Deletion" in title else "fraction of pixels restored")
        ax.set_ylabel("probability of the explained class")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    return fig


def sanity_figure(results: dict[str, Any]) -> Figure:
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for name, scores in results.items():
        if isinstance(scores, dict) and "sanity" in scores:
            steps = scores["sanity"]
            ax.plot([s["randomized"] for s in steps], [s["spearman"] for s in steps], marker="o", label=name)
    ax.set_ylim(-0.2, 1.05)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("randomised from the top, cumulatively, down to")
    ax.set_ylabel("mean Spearman correlation with trained maps")
    ax.set_title("Cascading randomisation (Adebayo et al. 2018): a faithful map changes")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def format_table(results: dict[str, Any], columns: list[str]) -> str:
    rows = [name for name in results if name != "meta"]
    header = f"{'method':<16}" + "".join(f"{c:>24}" for c in columns)
    lines = [header, "-" * len(header)]
    for name in rows:
        cells = []
        for column in columns:
            value = results[name].get(column)
            ci = results[name].get("ci95", {}).get(column)
            cells.append(f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if value is not None and ci else "-")
        lines.append(f"{name:<16}" + "".join(f"{c:>24}" for c in cells))
    return "\n".join(lines)


def evaluate_synthetic(
    factories: dict[str, Callable[[nn.Module], Callable]],
    train_count: int = 6000,
    test_count: int = 500,
    epochs: int = 6,
    seed: int = 0,
    backgrounds: torch.Tensor | None = None,
    batch_size: int = 128,
) -> tuple[dict[str, Any], synthetic.SyntheticSet, dict[str, torch.Tensor]]:
    """Train the small CNN on generated data and score every method's localisation of the class object."""
    started = time.perf_counter()
    train_set = synthetic.generate(train_count, seed, backgrounds)
    test_set = synthetic.generate(test_count, seed + 1, backgrounds)
    model = synthetic.train_small_cnn(train_set, epochs=epochs, seed=seed)
    with torch.inference_mode():
        accuracy = float((model(test_set.images).argmax(1) == test_set.labels).float().mean())
    candidates = dict(factories)
    for name in ("random", "center"):
        candidates[BASELINE_PREFIX + name] = functools.partial(_baseline, name, layer=synthetic.LAST_CONV, seed=seed)
    results: dict[str, Any] = {}
    all_maps: dict[str, torch.Tensor] = {}
    for name, factory in candidates.items():
        maps = collect_maps(name, factory(model), test_set.images, test_set.labels, batch_size)
        all_maps[name] = maps
        results[name] = _summarise(
            {
                "pointing_game": synthetic.pointing_game(maps, test_set.boxes),
                "energy_in_box": synthetic.energy_in_box(maps, test_set.boxes),
            },
            seed,
        )
    results["meta"] = {
        "task": "synthetic localisation",
        "classes": synthetic.NUM_CLASSES,
        "train_images": train_count,
        "test_images": test_count,
        "model": "small CNN, 3 downsamplings",
        "layer": synthetic.LAST_CONV,
        "test_accuracy": round(accuracy, 4),
        "box_area_share": synthetic.PATCH**2 / synthetic.SIZE**2,
        "seconds": round(time.perf_counter() - started, 1),
        "background": "CIFAR-10 images" if backgrounds is not None else "smooth noise",
    }
    return results, test_set, all_maps
