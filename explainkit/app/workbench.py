"""What ``explainkit serve`` works on, without any web framework: a model, a pool of images
(the test split, scanned once for predictions, plus uploads), and a thread-safe cache of maps keyed
by (image, method, layer, class). The web app (:mod:`explainkit.app.ui`) only lays this out.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import Dataset

from explainkit.data.datasets import limit_evenly, make_loader
from explainkit.errors import ExplainkitError, ImageReadError
from explainkit.evaluation import metrics
from explainkit.explainers.base import ALL, evaluation_mode
from explainkit.figures import overlay
from explainkit.jobs.tasks import TaskOptions, explain_one, infer_task, prepare_task
from explainkit.models.outputs import logits_of
from explainkit.models.store import model_card
from explainkit.registry import get_explainer, list_explainers
from explainkit.runtime.images import read_image

if TYPE_CHECKING:
    from explainkit.explainers.base import Explainer

TASK_NAMES = {"classify": "classifies", "detect": "detects objects", "segment": "segments"}

UPLOAD_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
MAX_UPLOAD_BYTES = 10 * 2**20
COLORMAPS = ("inferno", "viridis", "magma", "cividis", "jet")


@dataclass(frozen=True)
class ViewOptions:
    """How a map is drawn over its image: the colour-mapped heat map's ``opacity`` (0 to 1) and its
    ``colormap`` (one of ``COLORMAPS``); anything else is a clear :class:`ExplainkitError`."""

    opacity: float = 0.5
    colormap: str = COLORMAPS[0]

    def __post_init__(self) -> None:
        if not 0 <= self.opacity <= 1:
            raise ExplainkitError(f"opacity {self.opacity}: give a number from 0 to 1")
        if self.colormap not in COLORMAPS:
            raise ExplainkitError(f"unknown colour map {self.colormap!r}: choose from {', '.join(COLORMAPS)}")


TARGET_KINDS = ("predicted", "true", "top-k", "class", "all")


@dataclass(frozen=True)
class Target:
    """Which classes of an image to explain: its ``"predicted"`` class, its ``"true"`` label (an
    upload has none: its predicted class), its ``k`` most probable (``"top-k"``), the class named
    ``class_name`` (``"class"``) or every class (``"all"``)."""

    kind: str = "predicted"
    k: int = 1
    class_name: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in TARGET_KINDS:
            raise ExplainkitError(f"unknown target kind {self.kind!r}: choose from {', '.join(TARGET_KINDS)}")


@dataclass
class Item:
    """One image in the pool: ``input`` is the model's normalised ``(3, H, W)`` input."""

    key: str
    input: torch.Tensor
    label: int | None  # None for uploads
    predicted: int
    confidence: float
    probabilities: torch.Tensor  # (K,); empty for a detector's or segmenter's uploads


@dataclass
class TaskResult:
    """One image explained by one method for a detector or segmenter: the task's figure as an
    ``(H, W, 3)`` uint8 picture and what its maps explain (``boxes``, or ``region`` and
    ``region_pixels``, as ``summary.json``'s ``"explained"`` rows say)."""

    picture: np.ndarray
    explained: dict[str, Any]


class Workbench:
    """The model, its image pool and the maps cache; every method is safe to call from several threads."""

    def __init__(self, model: nn.Module, device: torch.device, cache_size: int = 4096, max_uploads: int = 256) -> None:
        self.model = model
        self.card = model_card(model)
        self.device = device
        self.items: dict[str, Item] = {}
        self._explainers: dict[tuple[str, str | None], Explainer] = {}
        self._maps: OrderedDict[tuple[str, str, str | None, int], torch.Tensor] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._uploads = 0
        self._max_uploads = max_uploads  # the pool keeps the most recent uploads: a long-lived server stays bounded
        self._tasks: OrderedDict[tuple, TaskResult] = OrderedDict()
        self.task = self._read_task()

    def _read_task(self) -> str:
        """``"classify"``, ``"detect"`` or ``"segment"``, read off one dry forward of a blank input."""
        blank = torch.zeros(1, *self.card.input_size, device=self.device)
        with evaluation_mode(self.model), torch.no_grad():
            task = infer_task(self.model(blank))
        return task if task in TASK_NAMES else "classify"

    @property
    def classifies(self) -> bool:
        return self.task == "classify"

    # --- the pool ------------------------------------------------------------------------------
    def add_dataset(self, dataset: Dataset, limit: int | None = None, batch_size: int = 128) -> int:
        """Predict ``limit`` evenly spaced images of ``dataset`` (all by default) into the pool."""
        if not self.classifies:
            raise ExplainkitError(
                f"the gallery shows a classifier's predictions; this model {TASK_NAMES[self.task]}: upload images"
            )
        dataset = limit_evenly(dataset, limit)
        offset = 0
        with evaluation_mode(self.model), torch.no_grad():
            for images, labels in make_loader(dataset, batch_size, self.device):
                probabilities = logits_of(self.model(images.to(self.device))).float().softmax(1).cpu()
                confidence, predicted = probabilities.max(1)
                for row in range(len(images)):
                    key = f"test/{offset + row}"
                    self.items[key] = Item(
                        key, images[row], int(labels[row]), int(predicted[row]), float(confidence[row]), probabilities[row]
                    )
                offset += len(images)
        return offset

    def add_upload(self, path: str | Path) -> Item:
        """Read an uploaded file into the pool; a clear :class:`ImageReadError` if it is not an image.
        Messages name the file, never the folder it was uploaded to (they are shown to the client)."""
        path = Path(path)
        if path.suffix.lower() not in UPLOAD_SUFFIXES:
            raise ImageReadError(f"{path.name}: not an image type explainkit reads ({', '.join(UPLOAD_SUFFIXES)})")
        if path.stat().st_size > MAX_UPLOAD_BYTES:
            raise ImageReadError(f"{path.name}: larger than {MAX_UPLOAD_BYTES // 2**20} MiB")
        try:
            array = read_image(path, self.card.image_size, self.card.resize, self.card.interpolation, single_frame=True)
        except ImageReadError as error:
            message = str(error)
            for folder in {str(path.parent), str(path.resolve().parent)} - {".", "/"}:
                message = message.replace(folder + "/", "")
            raise ImageReadError(message) from None
        pixels = torch.tensor(array)  # a copy: torch warns about read-only arrays
        image = self.card.normalize(pixels.permute(2, 0, 1)[None].float().div(255))[0]
        probabilities = torch.zeros(0)
        if self.classifies:
            with evaluation_mode(self.model), torch.no_grad():
                probabilities = logits_of(self.model(image[None].to(self.device))).float().softmax(1)[0].cpu()
        with self._lock:  # a unique key even for concurrent uploads: the maps cache is keyed by it
            key = f"upload/{self._uploads}/{path.name}"
            self._uploads += 1
            predicted, confidence = (int(probabilities.argmax()), float(probabilities.max())) if self.classifies else (0, 0.0)
            item = Item(key, image, None, predicted, confidence, probabilities)
            self.items[key] = item
            uploads = [k for k in self.items if k.startswith("upload/")]  # insertion order: oldest first
            for old in uploads[: max(0, len(uploads) - self._max_uploads)]:
                del self.items[old]
        return item

    def select(
        self,
        true_class: str | None = None,
        predicted_class: str | None = None,
        correctness: str = "all",
        order: str = "confidence",
    ) -> list[Item]:
        """Pool items filtered by true/predicted class name and ``correctness`` ("all", "correct",
        "wrong"), sorted by ``order`` ("confidence" high first, "least confident", or "index")."""
        classes = self.card.classes
        chosen = []
        for item in list(self.items.values()):
            if true_class and (item.label is None or classes[item.label] != true_class):
                continue
            if predicted_class and classes[item.predicted] != predicted_class:
                continue
            if correctness != "all" and (item.label is None or (item.label == item.predicted) != (correctness == "correct")):
                continue
            chosen.append(item)
        if order == "confidence":
            chosen.sort(key=lambda item: -item.confidence)
        elif order == "least confident":
            chosen.sort(key=lambda item: item.confidence)
        return chosen

    def confusion_pairs(self, top: int = 20) -> list[tuple[str, str, int]]:
        """The most frequent ``(true, predicted, count)`` mistakes in the pool."""
        counts: dict[tuple[int, int], int] = {}
        for item in self.items.values():
            if item.label is not None and item.label != item.predicted:
                counts[(item.label, item.predicted)] = counts.get((item.label, item.predicted), 0) + 1
        ranked = sorted(counts.items(), key=lambda pair: -pair[1])[:top]
        return [(self.card.classes[t], self.card.classes[p], n) for (t, p), n in ranked]

    # --- maps ----------------------------------------------------------------------------------
    def explainer(self, method: str, layer: str | None) -> Explainer:
        with self._lock:
            key = (method, layer)
            if key not in self._explainers:
                self._explainers[key] = get_explainer(method, self.model, layer=layer)
            return self._explainers[key]

    def class_index(self, item: Item, target: Target) -> list[int]:
        """The classes of ``item`` that ``target`` names, in the order their maps are shown."""
        if target.kind == "true" and item.label is not None:
            return [item.label]
        if target.kind == "all":
            return list(range(self.card.num_classes))
        if target.kind == "top-k":
            return item.probabilities.topk(min(target.k, len(item.probabilities))).indices.tolist()
        if target.kind == "class":
            if target.class_name not in self.card.classes:
                raise ExplainkitError(f"unknown class {target.class_name!r}")
            return [self.card.classes.index(target.class_name)]
        return [item.predicted]

    def maps(self, items: Sequence[Item], method: str, layer: str | None, classes: Sequence[Sequence[int]]) -> torch.Tensor:
        """``(len(items), J, H, W)`` maps on the CPU for ``classes[i]``, the ``J`` classes of item
        ``i``; computed once per (image, method, layer, class) and cached. The images with any map
        missing are explained in one call (every registered explainer takes the ``(N, J)`` classes at
        once: one forward and one batched backward), not one call per class or per image."""
        keys = [[(item.key, method, layer, int(cls)) for cls in row] for item, row in zip(items, classes)]
        cached = [[self._cached(key) for key in row] for row in keys]
        missing = [row for row, values in enumerate(cached) if any(value is None for value in values)]
        if missing:
            batch = torch.stack([items[row].input for row in missing]).to(self.device)
            wanted = torch.tensor([list(classes[row]) for row in missing], device=self.device)  # (M, J)
            computed = self.explainer(method, layer)(batch, targets=wanted).float().cpu()  # (M, J, H, W)
            for row, values in zip(missing, computed):
                for column, value in enumerate(values):
                    self._store(keys[row][column], value)
                    cached[row][column] = value
        return torch.stack([torch.stack(values) for values in cached])  # type: ignore[arg-type]

    def all_classes(self, item: Item, method: str, layer: str | None) -> torch.Tensor:
        """``(K, H, W)``: every class's map for one image from one ``targets="all"`` call."""
        keys = [(item.key, method, layer, cls) for cls in range(self.card.num_classes)]
        cached = [self._cached(key) for key in keys]
        if all(value is not None for value in cached):
            return torch.stack(cached)  # type: ignore[arg-type]
        every = self.explainer(method, layer)(item.input[None].to(self.device), targets=ALL)[0].float().cpu()
        for key, value in zip(keys, every):
            self._store(key, value)
        return every

    def explain_task(self, item: Item, method: str, layer: str | None, options: TaskOptions) -> TaskResult:
        """``item`` explained for this detector's or segmenter's task: the boxes above
        ``options.score_threshold`` or the region of ``options.class_name`` (``None``: the class
        other than background that covers most pixels). Cached per (image, method, layer, options);
        a detector that finds nothing is an :class:`ExplainkitError` saying so."""
        key = (item.key, method, layer, options.class_name, options.score_threshold)
        with self._lock:
            if key in self._tasks:
                self._tasks.move_to_end(key)
                return self._tasks[key]
        image = item.input[None].to(self.device)
        options = TaskOptions(self.task, options.class_name, options.score_threshold)
        name = item.key.rsplit("/", 1)[-1]
        try:
            prepared = prepare_task(self.model, self.card, image, options)
        except ExplainkitError as error:  # the CLI's wording names its flag: say it about the image instead
            raise ExplainkitError(f"{name}: {str(error).removeprefix(f'--task {self.task}: ')}") from None
        assert prepared is not None  # the task is never "classify" here
        explainer = self.explainer(method, layer)
        figure, explained = explain_one(
            explainer, self.card, image, prepared, options, name, f"{method} at {explainer.layer_name}"
        )
        result = TaskResult(_rendered(figure), explained)
        with self._lock:
            self._tasks[key] = result
            while len(self._tasks) > 256:
                self._tasks.popitem(last=False)
        return result

    def _cached(self, key: tuple) -> torch.Tensor | None:
        with self._lock:
            value = self._maps.get(key)
            if value is not None:
                self._maps.move_to_end(key)
            return value

    def _store(self, key: tuple, value: torch.Tensor) -> None:
        with self._lock:
            self._maps[key] = value
            while len(self._maps) > self._cache_size:
                self._maps.popitem(last=False)

    # --- pictures and scores -------------------------------------------------------------------
    def display(self, item: Item) -> np.ndarray:
        """``(H, W, 3)`` float image in [0, 1]: exactly the (resized, cropped) input the model saw."""
        picture: np.ndarray = self.card.denormalize(item.input[None])[0].permute(1, 2, 0).numpy()
        return picture

    def blend(self, item: Item, heat: torch.Tensor, view: ViewOptions) -> np.ndarray:
        """The image with ``heat`` (``(H, W)`` in [0, 1]) colour-mapped over it as ``view`` says, as uint8."""
        blended = overlay(self.card.denormalize(item.input[None])[0], heat, view.opacity, view.colormap)
        picture: np.ndarray = (np.clip(blended, 0, 1) * 255).astype(np.uint8)
        return picture

    def faithfulness(self, item: Item, method: str, layer: str | None, steps: int = 32) -> dict[str, Any]:
        """Deletion and insertion curves and AUCs for one image's predicted class."""
        heat = self.maps([item], method, layer, [[item.predicted]])[:, 0]
        target = torch.tensor([item.predicted])
        scores = metrics.deletion_insertion(
            self.model, item.input[None].to(self.device), heat.to(self.device), target.to(self.device), steps
        )
        return {
            "deletion": scores["deletion_curve"][0].cpu().tolist(),
            "insertion": scores["insertion_curve"][0].cpu().tolist(),
            "deletion_auc": float(scores["deletion_auc"][0]),
            "insertion_auc": float(scores["insertion_auc"][0]),
        }

    def layer_choices(self) -> list[str]:
        from explainkit.models.layers import candidate_layers, default_layer

        default = default_layer(self.model)
        names = [name for name in candidate_layers(self.model) if name.count(".") == 0]
        return [default] + [name for name in names if name != default]

    @staticmethod
    def methods() -> list[str]:
        return list_explainers()


def _rendered(figure: Any) -> np.ndarray:
    """A matplotlib figure as an ``(H, W, 3)`` uint8 picture (its own Agg canvas: no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    picture: np.ndarray = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    return picture
