"""What an explanation explains: target objects that turn a model's raw output into scores.

A target maps the model's output for a batch (whatever the forward returns: logits, a
segmentation ``{"out": ...}`` dict, a detector's list of dicts, an embedding) to scores, ``(N,)``
for one score per image or ``(N, J)`` for ``J`` per image, in **one call**: gradient methods then
differentiate all of them in one batched backward, and perturbation methods score every masked
forward at once. (pytorch-grad-cam calls a target once per image, in Python.)

A target is used in two steps. :meth:`Target.bind` sees the unperturbed forward once and returns
a :class:`BoundTarget` that has fixed whatever depends on it (the predicted class, the region a
segmenter assigns to a class, the boxes a detector found); the bound target is then called on
that output and on perturbed forwards. ``index`` tells it which image each row of a perturbed
output comes from (``None``: the rows are the batch in order).

A plain callable ``fn(output) -> (N,) or (N, J) scores`` is a target too (:func:`as_target`); it
may take ``index`` as a keyword when its score depends on which image a row belongs to.
"""

from __future__ import annotations

import inspect
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, Union

import torch
import torch.nn.functional as F

from explainkit.errors import ExplainkitError
from explainkit.models.outputs import describe_output, logits_of
from explainkit.models.roi_align import sparse_roi_align_backward

ALL = "all"
TOPK = "topk"

ClassSpec = Union[None, int, str, Sequence[int], torch.Tensor, tuple[str, int]]


# --- class indices -----------------------------------------------------------------------------


def parse_topk(targets: object) -> int | None:
    """``k`` for a top-k request (``("topk", k)`` or ``"topk:k"``), else ``None``."""
    if isinstance(targets, tuple) and len(targets) == 2 and targets[0] == TOPK:
        k = targets[1]
    elif isinstance(targets, str) and targets.startswith(TOPK + ":"):
        k = targets.split(":", 1)[1]
    else:
        return None
    try:
        value = int(k)
    except (TypeError, ValueError):
        raise ExplainkitError(f"top-k targets need an integer k, e.g. ('topk', 5) or 'topk:5'; got {targets!r}") from None
    if value < 1:
        raise ExplainkitError(f"top-k targets need k >= 1, got {value}")
    return value


def resolve_targets(targets: ClassSpec, logits: torch.Tensor) -> torch.Tensor | str:
    """Turn class targets into class indices on the logits' device.

    Returns ``"all"``, an ``(N,)`` long tensor (one class per image) or an ``(N, J)`` one (several
    classes per image): for top-k (``("topk", k)`` / ``"topk:k"``) each image's ``k`` most
    probable classes, most probable first, or the rows of an ``(N, J)`` tensor/nested list given.
    ``None`` means each image's predicted class. Targets must have one row per image (a short list
    is an error, never a silently truncated batch).
    """
    targets = _class_spec(targets)
    n, num_classes = logits.shape
    if isinstance(targets, torch.Tensor) and targets.is_inference():
        targets = targets.clone()  # made under inference_mode: unusable where autograd records
    if targets is None:
        return logits.argmax(dim=1)
    k = parse_topk(targets)
    if k is not None:
        return logits.topk(min(k, num_classes), dim=1).indices
    if isinstance(targets, str):
        if targets != ALL:
            raise ExplainkitError(
                f"targets must be None, an int, a sequence of ints, 'all', 'topk:K' or a target object, not {targets!r}"
            )
        return ALL
    if isinstance(targets, bool):
        raise ExplainkitError("targets must be class indices, not a bool")
    if isinstance(targets, int) or (isinstance(targets, torch.Tensor) and targets.ndim == 0):
        index = int(targets)
        if not 0 <= index < num_classes:
            raise ExplainkitError(f"target class {index} is out of range for a model with {num_classes} classes")
        return torch.full((n,), index, dtype=torch.long, device=logits.device)
    tensor = torch.as_tensor(targets, device=logits.device)
    if tensor.ndim not in (1, 2) or tensor.shape[0] != n or tensor.dtype.is_floating_point or tensor.numel() == 0:
        raise ExplainkitError(
            f"targets must hold one integer class per image ({n},) or a row of classes per image ({n}, J); "
            f"got shape {tuple(tensor.shape)}"
        )
    tensor = tensor.long()
    # One host sync to validate user input: a bad index would otherwise surface as a cryptic
    # device-side assert.
    low, high = torch.aminmax(tensor)
    if int(low) < 0 or int(high) >= num_classes:
        raise ExplainkitError(f"target classes must lie in [0, {num_classes - 1}], got {int(low)}..{int(high)}")
    return tensor


def _class_spec(targets: object) -> ClassSpec:
    """The class forms inside a :class:`ClassScores`; other targets are an error here."""
    if isinstance(targets, ClassScores):
        return targets.classes
    if isinstance(targets, Target) or (callable(targets) and not isinstance(targets, torch.Tensor)):
        raise ExplainkitError(f"this method explains class scores only; it cannot take the target {targets!r}")
    return targets  # type: ignore[return-value]


def class_sets(resolved: torch.Tensor | str, logits: torch.Tensor) -> torch.Tensor | None:
    """``(N, J)``: the classes each image is explained for when there are several (``"all"``:
    every class, top-k: its ``k``); ``None`` for one target per image."""
    if isinstance(resolved, str):
        return torch.arange(logits.shape[1], device=logits.device).expand(logits.shape[0], -1)
    return resolved if resolved.ndim == 2 else None


# --- the contract ------------------------------------------------------------------------------


@dataclass
class BoundTarget:
    """A target fixed by one unperturbed forward; call it on that output or on perturbed ones.

    Attributes (what figures and reports show; all optional):
        logits: the ``(N, K)`` logits of the unperturbed forward, for classifiers.
        classes: class indices explained, ``(N,)``, ``(N, J)`` or ``"all"`` (class targets).
        valid: ``(N, J)`` bool, ``False`` for padding columns (an image with fewer boxes or labels
            than another); their maps are zero.
        details: task-specific tensors (``boxes``, ``labels``, ``mask``, ``reference``...).
    """

    score: Callable[[Any, torch.Tensor | None], torch.Tensor]
    logits: torch.Tensor | None = None
    #: whether gradient methods should try one vmap-batched backward over the columns (``False``
    #: where an op on the path has no batching rule: a loop over columns, without the failed try)
    batched: bool = True
    classes: torch.Tensor | str | None = None
    valid: torch.Tensor | None = None
    details: dict[str, torch.Tensor] = field(default_factory=dict)

    def __call__(self, output: Any, index: torch.Tensor | None = None) -> torch.Tensor:
        """Scores ``(M,)`` or ``(M, J)`` for the ``M`` rows of ``output`` (from images ``index``)."""
        return self.score(output, index)


class Target:
    """Base of the built-in targets: :meth:`bind` to one unperturbed forward, then score."""

    #: the CLI's ``--task`` this target answers.
    task = "classify"

    def bind(self, output: Any) -> BoundTarget:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward_context(self) -> AbstractContextManager[None]:
        """Entered around the forward that gradient methods differentiate (default: nothing)."""
        return nullcontext()


def _rows(tensor: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    return tensor if index is None else tensor[index]


class ClassScores(Target):
    """The logits of classes: what an int, a list of ints, ``"all"`` or ``"topk:K"`` means.

    Args:
        classes: ``None`` (each image's predicted class), an int, ``N`` ints, an ``(N, J)``
            tensor, ``"all"`` or ``("topk", k)`` / ``"topk:k"``.
    """

    def __init__(self, classes: ClassSpec = None) -> None:
        self.classes = classes

    def bind(self, output: Any) -> BoundTarget:
        logits = logits_of(output).detach()
        return bound_classes(resolve_targets(self.classes, logits), logits)

    def __repr__(self) -> str:
        return f"ClassScores({self.classes!r})"


def bound_classes(resolved: torch.Tensor | str, logits: torch.Tensor, valid: torch.Tensor | None = None) -> BoundTarget:
    def score(output: Any, index: torch.Tensor | None) -> torch.Tensor:
        scores = logits_of(output)
        if isinstance(resolved, str):
            return scores  # every class
        chosen = _rows(resolved, index)
        if chosen.ndim == 1:
            return scores.gather(1, chosen[:, None])[:, 0]
        return scores.gather(1, chosen)

    return BoundTarget(score, logits=logits, classes=resolved, valid=valid)


class ClassDifference(Target):
    r"""A class against the classes most like it: the target of Finer-CAM (Zhang et al., CVPR 2025,
    https://arxiv.org/abs/2501.11309), pytorch-grad-cam's ``FinerWeightedTarget``.

    With ``y`` the logits, ``t`` the explained class, ``S`` its ``comparisons`` nearest classes
    (smallest ``|y_k - y_t|`` in the unperturbed forward) and ``p = softmax(y)``:

    .. math:: s = \frac{\sum_{k \in S} p_k \, (y_t - \alpha\, y_k)}{\sum_{k \in S} p_k + 10^{-9}}

    The weights ``p`` are part of the score (differentiated, as pytorch-grad-cam does).

    Args:
        classes: the explained class per image (``None``: the predicted one; an int or ``N`` ints).
        comparisons: how many similar classes to subtract (fewer when the model has fewer).
        alpha: how strongly they are subtracted (``0``: the plain class logit).
    """

    def __init__(self, classes: ClassSpec = None, comparisons: int = 3, alpha: float = 1.0) -> None:
        if comparisons < 1:
            raise ExplainkitError(f"comparisons must be at least 1, got {comparisons}")
        self.classes, self.comparisons, self.alpha = classes, comparisons, alpha

    def bind(self, output: Any) -> BoundTarget:
        logits = logits_of(output).detach()
        main = resolve_targets(self.classes, logits)
        if isinstance(main, str) or main.ndim != 1:
            raise ExplainkitError("ClassDifference explains one class per image: give None, an int or N ints")
        distance = (logits - logits.gather(1, main[:, None])).abs()
        distance.scatter_(1, main[:, None], -1.0)  # the class itself sorts first, as in pytorch-grad-cam
        count = min(self.comparisons, logits.shape[1] - 1)
        if count < 1:
            raise ExplainkitError("ClassDifference needs a model with at least 2 classes")
        similar = distance.argsort(dim=1)[:, 1 : count + 1]  # (N, S)
        alpha = self.alpha

        def score(output: Any, index: torch.Tensor | None) -> torch.Tensor:
            scores = logits_of(output)
            t, others = _rows(main, index), _rows(similar, index)
            weights = scores.softmax(dim=1).gather(1, others)
            gaps = scores.gather(1, t[:, None]) - alpha * scores.gather(1, others)
            return (weights * gaps).sum(dim=1) / (weights.sum(dim=1) + 1e-9)

        return BoundTarget(score, logits=logits, classes=main, details={"comparisons": similar})

    def __repr__(self) -> str:
        return f"ClassDifference({self.classes!r}, comparisons={self.comparisons}, alpha={self.alpha})"


class MultiLabel(Target):
    """Labels of a multi-label (sigmoid) head: each image's labels whose probability is above
    ``threshold``, most probable first, or the ``labels`` given. The score is each label's logit.

    Images with fewer labels than the most-labelled one get padding columns, marked invalid
    (their maps are zero). A batch where no image has a label above the threshold is an error.
    """

    task = "multilabel"

    def __init__(self, threshold: float = 0.5, labels: Sequence[int] | None = None) -> None:
        if not 0.0 < threshold < 1.0:
            raise ExplainkitError(f"the multi-label threshold is a probability in (0, 1), got {threshold}")
        self.threshold, self.labels = threshold, labels

    def bind(self, output: Any) -> BoundTarget:
        logits = logits_of(output).detach()
        n = logits.shape[0]
        if self.labels is not None:
            chosen = resolve_targets(torch.tensor([list(self.labels)] * n, device=logits.device), logits)
            return bound_classes(chosen, logits)
        probabilities = logits.float().sigmoid()
        above = probabilities > self.threshold
        columns = int(above.sum(dim=1).max())
        if columns == 0:
            top = float(probabilities.max())
            raise ExplainkitError(
                f"no label has a sigmoid probability above {self.threshold} in these images (highest {top:.3f}); "
                "lower the threshold or name the labels"
            )
        ranked = torch.where(above, probabilities, -1.0).topk(columns, dim=1)
        return bound_classes(ranked.indices, logits, valid=ranked.values > self.threshold)

    def __repr__(self) -> str:
        return f"MultiLabel(threshold={self.threshold}, labels={self.labels!r})"


# --- dense and structured outputs --------------------------------------------------------------


def segmentation_logits(output: Any) -> torch.Tensor:
    """The ``(N, K, h, w)`` class scores in a segmentation model's output: the tensor itself,
    ``output["out"]`` (torchvision) or ``output.logits`` (Hugging Face)."""
    found: Any = output
    if isinstance(output, dict):
        found = output.get("out", output.get("logits"))
    elif not isinstance(output, torch.Tensor) and hasattr(output, "logits"):
        found = output.logits
    if not isinstance(found, torch.Tensor) or found.ndim != 4:
        raise ExplainkitError(
            f"a segmentation target needs (N, classes, H, W) scores, but the model returns {describe_output(output)}"
        )
    return found


class SegmentationRegion(Target):
    r"""The evidence for one class over a region: ``s = \sum_{ij} m_{ij} \, y_{k,ij}`` with ``y_k``
    the class's per-pixel logits (pytorch-grad-cam's ``SemanticSegmentationTarget``).

    Args:
        category: the class index.
        mask: the region, ``(H, W)`` or ``(N, H, W)`` at the output's resolution (bool or
            weights); default: the pixels the model assigns to ``category`` in the unperturbed
            forward (per image). An image whose region is empty gets a zero map.
    """

    task = "segment"

    def __init__(self, category: int, mask: torch.Tensor | None = None) -> None:
        self.category, self.mask = int(category), mask

    def bind(self, output: Any) -> BoundTarget:
        scores = segmentation_logits(output).detach()
        n, classes, height, width = scores.shape
        if not 0 <= self.category < classes:
            raise ExplainkitError(f"segmentation class {self.category} is out of range for a model with {classes} classes")
        if self.mask is None:
            mask = (scores.argmax(dim=1) == self.category).to(scores.dtype)
        else:
            mask = torch.as_tensor(self.mask, device=scores.device).to(scores.dtype).expand(n, -1, -1)
            if tuple(mask.shape[-2:]) != (height, width):
                raise ExplainkitError(
                    f"the region mask is {tuple(mask.shape[-2:])}, the model's output {(height, width)}; they must agree"
                )
        category = self.category

        def score(output: Any, index: torch.Tensor | None) -> torch.Tensor:
            return (segmentation_logits(output)[:, category] * _rows(mask, index)).sum(dim=(1, 2))

        return BoundTarget(score, valid=(mask.flatten(1) > 0).any(dim=1, keepdim=True), details={"mask": mask > 0})

    def __repr__(self) -> str:
        return f"SegmentationRegion({self.category})"


def detections_of(output: Any) -> list[dict[str, torch.Tensor]]:
    """A detector's per-image ``{"boxes", "labels", "scores"}`` dicts (torchvision's eval output)."""
    if (
        isinstance(output, (list, tuple))
        and output
        and all(isinstance(item, dict) and {"boxes", "labels", "scores"} <= set(item) for item in output)
    ):
        return list(output)
    raise ExplainkitError(
        "a detection target needs a list of {'boxes', 'labels', 'scores'} dicts per image (a torchvision detector "
        f"in eval mode), but the model returns {describe_output(output)}"
    )


class DetectionBoxes(Target):
    r"""Each detected box's score, matched to the boxes of the unperturbed forward
    (pytorch-grad-cam's ``FasterRCNNBoxScoreTarget``, one column per box instead of their sum).

    Binding keeps each image's detections scoring at least ``score_threshold`` (optionally only
    ``labels``): ``J`` columns, padded where an image has fewer. On any forward, reference box
    ``b`` of label ``l`` scores

    .. math:: s_b = \max_{d:\ \mathrm{label}_d = l,\ \mathrm{IoU}(b, d) > \tau} \big(\mathrm{IoU}(b, d) + \mathrm{score}_d\big)

    taking the detection of highest IoU (``0`` when none passes ``iou_threshold`` ``τ``), so the
    map explains both the class score and the box's localisation. The scores are differentiable;
    the detector's non-maximum suppression is not differentiated (it only selects detections).

    A batch where no image has a detection above the threshold is an error that says so.
    """

    task = "detect"

    def __init__(
        self, score_threshold: float = 0.5, iou_threshold: float = 0.5, labels: Sequence[int] | None = None, max_boxes: int = 20
    ) -> None:
        if max_boxes < 1:
            raise ExplainkitError(f"max_boxes must be at least 1, got {max_boxes}")
        self.score_threshold, self.iou_threshold, self.labels, self.max_boxes = score_threshold, iou_threshold, labels, max_boxes

    def _kept(self, detection: dict[str, torch.Tensor]) -> torch.Tensor:
        keep = detection["scores"] >= self.score_threshold
        if self.labels is not None:
            keep &= torch.isin(detection["labels"], torch.as_tensor(list(self.labels), device=keep.device))
        return keep.nonzero().flatten()[: self.max_boxes]

    def bind(self, output: Any) -> BoundTarget:
        detections = detections_of(output)
        kept = [self._kept(d) for d in detections]
        columns = max(len(k) for k in kept)
        if columns == 0:
            best = max((float(d["scores"].max()) for d in detections if len(d["scores"])), default=None)
            found = "no detections at all" if best is None else f"the best scores {best:.3f}"
            raise ExplainkitError(f"the detector found nothing scoring >= {self.score_threshold} in these images ({found})")
        device = detections[0]["boxes"].device
        boxes = torch.zeros(len(detections), columns, 4, device=device)
        labels = torch.full((len(detections), columns), -1, dtype=torch.long, device=device)
        scores = torch.zeros(len(detections), columns, device=device)
        for row, (detection, keep) in enumerate(zip(detections, kept)):  # a list per image: the detector's own form
            boxes[row, : len(keep)] = detection["boxes"][keep].detach()
            labels[row, : len(keep)] = detection["labels"][keep]
            scores[row, : len(keep)] = detection["scores"][keep].detach()
        threshold = self.iou_threshold

        def score(output: Any, index: torch.Tensor | None) -> torch.Tensor:
            rows = range(len(boxes)) if index is None else index.tolist()
            return torch.stack([_box_scores(d, boxes[r], labels[r], threshold) for d, r in zip(detections_of(output), rows)])

        details = {"boxes": boxes, "labels": labels, "scores": scores}
        # RoIAlign has no vmap batching rule: gradient methods loop over the boxes directly
        return BoundTarget(score, classes=labels, valid=labels >= 0, details=details, batched=False)

    def forward_context(self) -> AbstractContextManager[None]:
        """A box's score depends on one proposal of hundreds: RoIAlign's backward skips the rest
        (:mod:`explainkit.models.roi_align`: the same gradients, a fraction of the work)."""
        return sparse_roi_align_backward()

    def __repr__(self) -> str:
        return f"DetectionBoxes(score_threshold={self.score_threshold}, iou_threshold={self.iou_threshold})"


def _box_scores(detection: dict[str, torch.Tensor], boxes: torch.Tensor, labels: torch.Tensor, threshold: float) -> torch.Tensor:
    """``(J,)``: IoU + score of the best-overlapping same-label detection for each reference box."""
    from torchvision.ops import box_iou  # torchvision is a dependency; imported where boxes are

    found = detection["boxes"]
    if len(found) == 0:
        return boxes.new_zeros(len(boxes))  # nothing detected: every box scores 0 (a zero gradient)
    ious = box_iou(boxes.to(found.dtype), found)  # (J, D)
    best = ious.argmax(dim=1)  # the highest-IoU detection, as pytorch-grad-cam takes it
    iou = ious.gather(1, best[:, None])[:, 0]
    matched = (iou > threshold) & (detection["labels"][best] == labels)
    return torch.where(matched, iou + detection["scores"][best], torch.zeros_like(iou))


def embeddings_of(output: Any) -> torch.Tensor:
    """The ``(N, D)`` embedding in a model's output: the tensor, the first of a tuple,
    ``image_embeds`` or ``pooler_output`` (Hugging Face)."""
    found: Any = output
    if isinstance(output, (tuple, list)) and output:
        found = output[0]
    elif not isinstance(output, torch.Tensor):
        found = getattr(output, "image_embeds", None)
        if found is None:
            found = getattr(output, "pooler_output", None)
    if not isinstance(found, torch.Tensor) or found.ndim != 2:
        raise ExplainkitError(f"a similarity target needs (N, D) embeddings, but the model returns {describe_output(output)}")
    return found


class Similarity(Target):
    r"""Cosine similarity to a reference embedding: ``s = \cos(f(x), r)`` (pytorch-grad-cam's
    ``SimilarityToConceptTarget``), for models that return ``(N, D)`` embeddings.

    Args:
        reference: a ``(D,)`` concept vector or ``(N, D)``, one per image; to compare with an
            image, embed it first (:func:`embed`).
    """

    task = "similarity"

    def __init__(self, reference: torch.Tensor) -> None:
        reference = torch.as_tensor(reference).detach()
        if reference.ndim not in (1, 2):
            raise ExplainkitError(f"a similarity reference is (D,) or (N, D), got shape {tuple(reference.shape)}")
        self.reference = reference

    def bind(self, output: Any) -> BoundTarget:
        features = embeddings_of(output)
        reference = self.reference.to(features.device, features.dtype)
        if reference.shape[-1] != features.shape[1]:
            raise ExplainkitError(
                f"the reference has {reference.shape[-1]} dimensions, the model's embeddings {features.shape[1]}"
            )
        reference = reference.expand(features.shape[0], -1)

        def score(output: Any, index: torch.Tensor | None) -> torch.Tensor:
            return F.cosine_similarity(embeddings_of(output), _rows(reference, index), dim=1)

        return BoundTarget(score, details={"reference": reference})

    def __repr__(self) -> str:
        return f"Similarity(reference of {self.reference.shape[-1]} dimensions)"


def embed(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The model's ``(N, D)`` embeddings of ``images``, without autograd (a :class:`Similarity` reference)."""
    with torch.no_grad():
        return embeddings_of(model(images)).detach()


class CallableTarget(Target):
    """A user's function ``fn(output) -> (N,) or (N, J) scores`` (``fn(output, index=...)`` when it
    takes ``index``: the images the rows of a perturbed output come from)."""

    def __init__(self, fn: Callable[..., torch.Tensor]) -> None:
        self.fn = fn
        try:
            self.takes_index = "index" in inspect.signature(fn).parameters
        except (TypeError, ValueError):  # a builtin without a signature
            self.takes_index = False

    def bind(self, output: Any) -> BoundTarget:
        def score(output: Any, index: torch.Tensor | None) -> torch.Tensor:
            scores = self.fn(output, index=index) if self.takes_index else self.fn(output)
            if not isinstance(scores, torch.Tensor) or scores.ndim not in (1, 2):
                got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
                raise ExplainkitError(f"target {self.fn!r} must return (N,) or (N, J) scores, got {got}")
            return scores

        return BoundTarget(score)

    def __repr__(self) -> str:
        return f"CallableTarget({getattr(self.fn, '__name__', self.fn)!r})"


Targets = Union[ClassSpec, Target, Callable[..., torch.Tensor]]


def as_target(targets: Targets) -> Target:
    """A :class:`Target` for what users pass as ``targets=``: class forms become :class:`ClassScores`,
    a callable a :class:`CallableTarget`."""
    if isinstance(targets, Target):
        return targets
    if callable(targets) and not isinstance(targets, torch.Tensor):
        return CallableTarget(targets)
    return ClassScores(targets)


def is_class_target(targets: Targets) -> bool:
    """Whether ``targets`` names classes of a classifier (ints, ``"all"``, top-k, :class:`ClassScores`)."""
    return isinstance(targets, ClassScores) or not (isinstance(targets, Target) or callable(targets))


__all__ = [
    "ALL",
    "BoundTarget",
    "CallableTarget",
    "ClassDifference",
    "ClassDifferences",
    "ClassScores",
    "DetectionBoxes",
    "MultiLabel",
    "ResidualSoftmax",
    "SegmentationRegion",
    "Similarity",
    "Target",
    "Targets",
    "as_target",
    "class_sets",
    "detections_of",
    "embed",
    "embeddings_of",
    "resolve_targets",
    "segmentation_logits",
]


# --- class targets of Finer-CAM and ShapleyCAM (appended) ----------------------------------------


def _class_columns(resolved: torch.Tensor | str, logits: torch.Tensor) -> torch.Tensor:
    """``(N, J)`` classes per image: every class for ``"all"``, one column for ``(N,)``."""
    if isinstance(resolved, str):
        return torch.arange(logits.shape[1], device=logits.device).expand(logits.shape[0], -1)
    return resolved[:, None] if resolved.ndim == 1 else resolved


class ClassDifferences(Target):
    r""":class:`ClassDifference` for every class form: each explained class against its own
    look-alikes, one score column per class (Finer-CAM's target for ``"all"``, top-k and class sets).

    For image ``n`` and explained class ``t`` (column ``j``), ``S`` the ``comparisons`` classes
    with the smallest ``|y_k - y_t|`` in the unperturbed forward (``t`` excluded) and
    ``p = softmax(y)``:

    .. math:: s_{nj} = \frac{\sum_{k \in S} p_k \, (y_t - \alpha\, y_k)}{\sum_{k \in S} p_k + 10^{-9}}

    exactly pytorch-grad-cam's ``FinerWeightedTarget`` per column (the weights ``p`` are
    differentiated). One class per image scores ``(N,)`` (the values of :class:`ClassDifference`);
    ``"all"``, top-k and ``(N, J)`` class sets score ``(N, J)`` in one call, so gradient methods
    differentiate every column in one batched backward.

    Args:
        classes: any class form (``None``: the predicted class; an int, ``N`` ints, ``"all"``,
            ``("topk", k)`` / ``"topk:k"``, an ``(N, J)`` tensor).
        comparisons: how many similar classes to subtract (fewer when the model has fewer).
        alpha: how strongly they are subtracted (``0``: the plain class logit).
    """

    def __init__(self, classes: ClassSpec = None, comparisons: int = 3, alpha: float = 1.0) -> None:
        if isinstance(comparisons, bool) or not isinstance(comparisons, int) or comparisons < 1:
            raise ExplainkitError(f"comparisons must be an integer of at least 1, got {comparisons!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha != alpha or abs(alpha) == float("inf"):
            raise ExplainkitError(f"alpha must be a finite number, got {alpha!r}")
        self.classes, self.comparisons, self.alpha = classes, comparisons, float(alpha)

    def bind(self, output: Any) -> BoundTarget:
        logits = logits_of(output).detach()
        count = min(self.comparisons, logits.shape[1] - 1)
        if count < 1:
            raise ExplainkitError("ClassDifferences needs a model with at least 2 classes")
        resolved = resolve_targets(self.classes, logits)
        main = _class_columns(resolved, logits)  # (N, J)
        distance = (logits[:, None, :] - logits.gather(1, main)[:, :, None]).abs()  # (N, J, K)
        distance.scatter_(2, main[:, :, None], -1.0)  # the class itself comes first, as in pytorch-grad-cam
        similar = distance.topk(count + 1, dim=2, largest=False).indices[:, :, 1:]  # (N, J, S)
        single = not isinstance(resolved, str) and resolved.ndim == 1
        alpha = self.alpha

        def score(output: Any, index: torch.Tensor | None) -> torch.Tensor:
            scores = logits_of(output)
            t, others = _rows(main, index), _rows(similar, index)
            rows = scores[:, None, :].expand(-1, t.shape[1], -1)  # (M, J, K)
            weights = scores.softmax(dim=1)[:, None, :].expand_as(rows).gather(2, others)  # (M, J, S)
            gaps = scores.gather(1, t)[:, :, None] - alpha * rows.gather(2, others)
            columns = (weights * gaps).sum(dim=2) / (weights.sum(dim=2) + 1e-9)  # (M, J)
            return columns[:, 0] if single else columns

        comparisons = similar[:, 0] if single else similar
        return BoundTarget(score, logits=logits, classes=resolved, details={"comparisons": comparisons})

    def __repr__(self) -> str:
        return f"ClassDifferences({self.classes!r}, comparisons={self.comparisons}, alpha={self.alpha})"


class ResidualSoftmax(Target):
    r"""ReST, the residual softmax target of ShapleyCAM (Cai, 2025, https://arxiv.org/abs/2501.06261),
    pytorch-grad-cam's ``ClassifierOutputReST``: the class logit minus the cross-entropy loss of
    that class, i.e. the pre-softmax and the log-softmax score together:

    .. math:: s_t = y_t - \mathrm{CE}(y, t) = y_t + \log p_t = 2\, y_t - \log \sum_k e^{y_k}

    Unlike a logit, it is curved in the logits (its Hessian is ``-(\mathrm{diag}(p) - p p^T)``),
    so it has second-order terms even where the network below is piecewise linear.

    Args:
        classes: any class form (``None``: the predicted class; an int, ``N`` ints, ``"all"``,
            ``("topk", k)`` / ``"topk:k"``, an ``(N, J)`` tensor); ``(N,)`` or ``(N, J)`` scores.
    """

    def __init__(self, classes: ClassSpec = None) -> None:
        self.classes = classes

    def bind(self, output: Any) -> BoundTarget:
        logits = logits_of(output).detach()
        resolved = resolve_targets(self.classes, logits)

        def score(output: Any, index: torch.Tensor | None) -> torch.Tensor:
            scores = logits_of(output)
            rest = scores + scores.log_softmax(dim=1)  # every class's ReST
            if isinstance(resolved, str):
                return rest
            chosen = _rows(resolved, index)
            if chosen.ndim == 1:
                return rest.gather(1, chosen[:, None])[:, 0]
            return rest.gather(1, chosen)

        return BoundTarget(score, logits=logits, classes=resolved)

    def __repr__(self) -> str:
        return f"ResidualSoftmax({self.classes!r})"
