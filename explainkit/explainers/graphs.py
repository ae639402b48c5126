"""CAMs at the forward's speed on CUDA: the fixed-shape hot path captured once, then replayed.

On CUDA a Grad-CAM call at batch 1,024 is launch-bound: a few hundred small kernels (the forward
above the layer again under autograd, the batched backward, the weights, the einsum, ReLU, the
two upsampling matmuls, the min-max scaling), each launched from Python. :class:`CapturedCAM`
records the whole call once per input shape and target form in a CUDA graph
(:class:`torch.cuda.CUDAGraph`: a static input buffer, a warm-up on a side stream, the capture)
and replays it: one launch for every kernel, no Python in between. The maps are those of the
same kernels run eagerly.

On the CPU (and MPS) it is a pass-through: the explainer's own call, maps identical.

Example:
    >>> from explainkit.explainers.gradient import GradCAM
    >>> from explainkit.explainers.graphs import CapturedCAM
    >>> cam = CapturedCAM(GradCAM(model, "layer4"))          # doctest: +SKIP
    >>> maps = cam(images.cuda(), targets="all")              # doctest: +SKIP
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Hashable

import torch

from explainkit.errors import ExplainkitError
from explainkit.explainers.base import (
    Explainer,
    Explanation,
    as_model_dtype,
    check_images,
)
from explainkit.targets import ALL, ClassScores, Targets, bound_classes, parse_topk

#: ``auto``: a CUDA graph on CUDA, the plain call elsewhere; ``cuda-graph``: the same, by name;
#: ``compile``: ``torch.compile(mode="reduce-overhead")`` of the call on CUDA (its CUDA graphs,
#: with graph breaks at the hooks and the backward); ``static``: the capture's bookkeeping (static
#: buffers, one entry per shape and target form) with the call run again instead of a graph
#: replay, on any device (tests); ``eager``: always the plain call.
MODES = ("auto", "cuda-graph", "compile", "static", "eager")


@dataclass
class _Entry:
    """One captured call: the static input, the recorded outputs and how to run them again."""

    images: torch.Tensor
    outputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor | str, torch.Tensor]  # maps, logits, classes, scores
    replay: Callable[[], Any]


def _target_key(targets: Targets) -> Hashable | None:
    """A hashable form of a target a graph can hold (no host sync while resolving it), else ``None``.

    Capturable: ``None`` (each image's predicted class), an int (one class for every image),
    ``"all"`` and top-k: their classes are computed on the device from the logits. Per-image class
    lists are validated with a host sync and other target objects have data-dependent shapes: they
    run the plain call.
    """
    if isinstance(targets, ClassScores):
        targets = targets.classes
    if targets is None:
        return ("predicted",)
    if isinstance(targets, bool):
        return None
    if isinstance(targets, int):
        return ("class", targets)
    if isinstance(targets, str) and targets == ALL:
        return (ALL,)
    if isinstance(targets, (str, tuple)):
        try:
            k = parse_topk(targets)
        except ExplainkitError:
            return None
        return None if k is None else ("topk", k)
    return None


class CapturedCAM:
    """An explainer whose calls replay a captured CUDA graph, per input shape and target form.

    Args:
        explainer: any :class:`~explainkit.explainers.base.Explainer` whose ``compute`` makes no
            host sync (the gradient CAMs: Grad-CAM, Grad-CAM++, XGrad-CAM, HiResCAM, LayerCAM...).
            A call that cannot be captured (a sync, an op refused during capture) runs the plain
            explainer from then on for that shape and target; :attr:`fallbacks` says why.
        mode: one of ``auto``, ``cuda-graph``, ``compile``, ``static``, ``eager`` (see ``MODES``).
        max_graphs: captured entries kept (least recently used dropped first); each holds its own
            memory pool, about one eager call's peak.

    Calls take the explainer's arguments (``images``, ``targets``, ``normalize``) and return the
    same maps; :meth:`explain` the same :class:`~explainkit.explainers.base.Explanation`, except
    that a replay's ``target`` is the plain class target of the classes explained (its ``scores``
    are the explainer's own: Finer-CAM's class differences, ShapleyCAM's ReST scores).
    Returned tensors are copies (the next replay overwrites the graph's own outputs). The graph
    reads the model's parameters and buffers where they lie: in-place updates (an optimizer step,
    ``load_state_dict``) are seen; parameters moved or replaced (``model.to(...)``) drop every
    entry, detected on the next call. The model's modes do not change a replay: BatchNorm and
    dropout behave as in eval mode, as in every explainer call.
    """

    def __init__(self, explainer: Explainer, mode: str = "auto", *, max_graphs: int = 8) -> None:
        if mode not in MODES:
            raise ExplainkitError(f"mode={mode!r}: must be one of {', '.join(MODES)}")
        if not isinstance(explainer, Explainer):
            raise ExplainkitError(f"explainer must be an Explainer, got {type(explainer).__name__}")
        if max_graphs < 1:
            raise ExplainkitError(f"max_graphs={max_graphs}: must be at least 1")
        self.explainer = explainer
        self.mode = mode
        self.max_graphs = max_graphs
        #: why a shape/target form runs the plain call: ``{key: "RuntimeError: ..."}``
        self.fallbacks: dict[Hashable, str] = {}
        #: how the last call ran: ``"eager"``, ``"captured"`` (a new entry) or ``"replayed"``
        self.last_path = "eager"
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()
        self._signature: tuple[int, ...] = ()
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self.explainer.name

    @property
    def model(self) -> torch.nn.Module:
        return self.explainer.model

    def __call__(self, images: torch.Tensor, targets: Targets = None, normalize: bool = True) -> torch.Tensor:
        return self.explain(images, targets, normalize=normalize).maps

    def __repr__(self) -> str:
        return f"CapturedCAM({self.explainer!r}, mode={self.mode!r}, entries={len(self._entries)})"

    def clear(self) -> None:
        """Drop every captured entry (and its memory pool)."""
        with self._lock:
            self._entries.clear()

    def _method(self, device: torch.device) -> str:
        """How calls on ``device`` run: ``eager``, ``cuda-graph``, ``compile`` or ``static``."""
        if self.mode == "static":
            return "static"
        if self.mode == "eager" or device.type != "cuda":
            return "eager"
        return "compile" if self.mode == "compile" else "cuda-graph"

    def explain(self, images: torch.Tensor, targets: Targets = None, normalize: bool = True) -> Explanation:
        """Like the explainer's ``explain``: maps, logits, classes, scores and the bound target."""
        method = self._method(images.device) if isinstance(images, torch.Tensor) else "eager"
        target_key = _target_key(targets) if method != "eager" else None
        if target_key is None:
            self.last_path = "eager"
            return self.explainer.explain(images, targets, normalize=normalize)
        check_images(images)  # the explainer's own checks, once per call, before any replay
        images = as_model_dtype(images, self.model)
        key = (method, tuple(images.shape), images.stride(), images.dtype, str(images.device), target_key, bool(normalize))
        with self._lock:
            self._check_signature()
            if key in self.fallbacks:
                self.last_path = "eager"
                return self.explainer.explain(images, targets, normalize=normalize)
            entry = self._entries.get(key)
            if entry is None:
                try:
                    entry = self._capture(method, images, targets, normalize)
                except ExplainkitError:
                    raise  # the user's mistake (a class out of range): the same error as the plain call
                except Exception as exc:  # a sync or an op refused during capture: the plain call from now on
                    self.fallbacks[key] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                    self.last_path = "eager"
                    return self.explainer.explain(images, targets, normalize=normalize)
                self._entries[key] = entry
                while len(self._entries) > self.max_graphs:
                    self._entries.popitem(last=False)
                self.last_path = "captured"
            else:
                self._entries.move_to_end(key)
                self.last_path = "replayed"
            entry.images.copy_(images)
            entry.replay()
            maps, logits, classes, scores = entry.outputs
            maps, logits, scores = maps.clone(), logits.clone(), scores.clone()
            classes = classes.clone() if isinstance(classes, torch.Tensor) else classes
        bound = bound_classes(classes, logits)
        return Explanation(maps, logits, classes if isinstance(classes, torch.Tensor) else None, scores, bound)

    # --- capture -------------------------------------------------------------------------------

    def _check_signature(self) -> None:
        """Drop every entry when the model's parameters or buffers no longer lie where they did."""
        model = self.model
        signature = tuple(t.data_ptr() for t in (*model.parameters(), *model.buffers()))
        if signature != self._signature:
            self._entries.clear()
            self._signature = signature

    def _run(self, images: torch.Tensor, targets: Targets, normalize: bool) -> tuple:
        """The explainer's call after its checks (:meth:`Explainer.explain_checked`), as tensors."""
        explanation = self.explainer.explain_checked(images, targets, normalize)
        bound = explanation.target
        assert bound is not None and explanation.scores is not None
        classes = bound.classes if bound.classes is not None else ALL
        return explanation.maps, bound.logits, classes, explanation.scores

    def _capture(self, method: str, images: torch.Tensor, targets: Targets, normalize: bool) -> _Entry:
        static = torch.empty_strided(images.shape, images.stride(), dtype=images.dtype, device=images.device)
        static.copy_(images)
        if method == "static":
            holder: dict[str, tuple] = {"outputs": self._run(static, targets, normalize)}

            def rerun() -> None:  # the same bookkeeping as a graph: outputs written in place
                for old, new in zip(holder["outputs"], self._run(static, targets, normalize)):
                    if isinstance(old, torch.Tensor):
                        old.copy_(new)

            return _Entry(static, holder["outputs"], rerun)
        if method == "compile":
            compiled = torch.compile(lambda: self._run(static, targets, normalize), mode="reduce-overhead")
            box = {"outputs": compiled()}

            def run_compiled() -> None:
                torch.compiler.cudagraph_mark_step_begin()
                for old, new in zip(box["outputs"], compiled()):
                    if isinstance(old, torch.Tensor):
                        old.copy_(new)

            box["outputs"] = tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in box["outputs"])
            return _Entry(static, box["outputs"], run_compiled)
        return self._capture_cuda_graph(static, targets, normalize)

    def _capture_cuda_graph(self, static: torch.Tensor, targets: Targets, normalize: bool) -> _Entry:
        """Warm up on a side stream (cuDNN picks its algorithms, caches fill), then capture."""
        side = torch.cuda.Stream(device=static.device)
        side.wait_stream(torch.cuda.current_stream(static.device))
        with torch.cuda.stream(side):
            for _ in range(3):
                self._run(static, targets, normalize)
        torch.cuda.current_stream(static.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = self._run(static, targets, normalize)
        return _Entry(static, outputs, graph.replay)


def capture(explainer: Explainer, mode: str = "auto", **options: Any) -> CapturedCAM:
    """``CapturedCAM(explainer, mode, **options)``: the explainer's calls captured on CUDA."""
    return CapturedCAM(explainer, mode, **options)


__all__ = ["MODES", "CapturedCAM", "capture"]
