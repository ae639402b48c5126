"""``explainkit serve``: a local web app (Gradio Blocks) over a :class:`~explainkit.app.workbench.Workbench`.

Pick test images (filter by true/predicted class, correct/wrong, confusion pair; sort by
confidence) or upload files; compare any registered methods and layers on them with one colour
scale, an opacity slider and a colour-map choice; targets: predicted, true, top-k or a named
class; every class's map for one image from one pass; deletion/insertion curves on demand.

The same server is an API (``gradio_client``; the page's footer links to its API page): ``/explain``
(image files in; overlays and each image's top classes out), ``/methods``, ``/classes`` and
``/layers``; the page's own events are private. What each does is a plain function of the
workbench in :mod:`explainkit.app.handlers`; this module only lays the page out and wires them::

    from gradio_client import Client, handle_file
    overlays, probabilities = Client("http://127.0.0.1:7860/").predict(
        images=[handle_file("cat.png")], methods=["gradcam"], layer="", target="predicted", opacity=0.5,
        api_name="/explain",
    )

Offline and private by default: binds 127.0.0.1, no share link, Gradio's analytics off and its
Google-hosted fonts replaced by the system's, so the page makes no request beyond the server.
"""

from __future__ import annotations

import functools
import inspect
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Callable

from explainkit.app import handlers
from explainkit.app.handlers import ANY, AUTOMATIC, TARGETS, CompareRequest
from explainkit.app.workbench import COLORMAPS, MAX_UPLOAD_BYTES, TASK_NAMES, Target, ViewOptions, Workbench
from explainkit.errors import ExplainkitError

QUEUE_SIZE = 64
PRIVATE = {"api_visibility": "private"}  # the page's own events: not on the API page, not for API clients


def _gradio():
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported
    try:
        import gradio as gr
    except ImportError:
        raise ExplainkitError("the web app needs Gradio: pip install 'explainkit[ui]'") from None
    _atomic_image_cache()
    return gr


def _atomic_image_cache() -> None:
    """Make Gradio's image cache writes atomic (once per process).

    Gradio (6.31) saves every output image to ``cache/<hash of its bytes>/image.webp`` and rewrites
    that file in place on every request: two users who get the same overlay at once can download it
    while it is being rewritten, and get an empty or truncated image (found by
    ``benchmarks/bench_serve.py``: 7 in 1,000 answers under 4 concurrent users). Writing to a
    temporary file in the same folder and renaming it over the target is atomic: a reader sees the
    old bytes or the new ones, which are equal.
    """
    from pathlib import Path

    from gradio import processing_utils

    if getattr(processing_utils.save_pil_to_cache, "explainkit_atomic", False):
        return

    def save_pil_to_cache(img: Any, cache_dir: str, name: str = "image", format: str = "webp") -> str:
        data = processing_utils.encode_pil_to_bytes(img, format)
        folder = Path(cache_dir) / processing_utils.hash_bytes(data)
        folder.mkdir(exist_ok=True, parents=True)
        target = (folder / f"{name}.{format}").resolve()
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".partial-", delete=False) as partial:
            partial.write(data)
        os.replace(partial.name, target)
        return str(target)

    save_pil_to_cache.explainkit_atomic = True  # type: ignore[attr-defined]
    processing_utils.save_pil_to_cache = save_pil_to_cache


def _theme(gr):
    """Gradio's default theme with system fonts: the default loads Google Fonts from the network."""
    system = ["ui-sans-serif", "system-ui", "sans-serif"]
    return gr.themes.Default(font=system, font_mono=["ui-monospace", "monospace"])


def _endpoint(gr, handler: Callable[..., Any], bench: Workbench) -> Callable[..., Any]:
    """``handler(bench, ...)`` as a public API function: the handler's parameter names (less
    ``bench``) and docstring, and an :class:`ExplainkitError` as the API's error, its one-line message."""

    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return handler(bench, *args, **kwargs)
        except ExplainkitError as error:
            raise gr.Error(str(error), print_exception=False) from None

    signature = inspect.signature(handler)
    call.__signature__ = signature.replace(parameters=list(signature.parameters.values())[1:])  # type: ignore[attr-defined]
    call.__doc__, call.__name__ = handler.__doc__, handler.__name__
    return call


def _documented(handler: Callable[..., Any]) -> dict[str, str]:
    """``{name: text}`` from the "Args:" and "Returns:" lines of ``handler``'s docstring (one line each)."""
    described = {}
    for line in (inspect.getdoc(handler) or "").splitlines():
        name, colon, text = line.strip().partition(": ")
        if colon and name.isidentifier():
            described[name] = f"{name}: {text}"
    return described


def _on_pick(visible: list[str], selected: list[str], event: Any) -> tuple[list[str], str]:
    return handlers.pick(visible, selected, event.index)  # ``event`` is annotated gr.SelectData in build_app


@dataclass
class PickPanel:
    """The page's left column: the gallery ``filters`` (:func:`~explainkit.app.handlers.filtered`'s
    inputs, in its order), the pool's ``gallery``, ``uploads`` and their ``upload_message``, the
    selection's ``status`` and its ``clear`` button."""

    filters: list[Any]
    gallery: Any
    uploads: Any
    upload_message: Any
    status: Any
    clear: Any


@dataclass
class ComparePanel:
    """The page's right column: the controls of a comparison (methods, layer, target, k, class name,
    opacity, colour map; a detector's score threshold, a segmenter's region class), its ``run``
    button, and what it fills (``message``, ``grid``, ``top``)."""

    methods: Any
    layer: Any
    target: Any
    k: Any
    class_name: Any
    opacity: Any
    colormap: Any
    run: Any
    message: Any
    grid: Any
    top: Any
    score_threshold: Any
    region: Any

    def controls(self) -> set[Any]:
        """The controls as an event's inputs: a set, so the event function gets one ``{component: value}``."""
        return {
            self.methods,
            self.layer,
            self.target,
            self.k,
            self.class_name,
            self.opacity,
            self.colormap,
            self.score_threshold,
            self.region,
        }

    def request(self, values: dict[Any, Any], selected: Any) -> CompareRequest:
        """The comparison the controls (and the ``selected`` state) ask for, from an event's ``values``."""
        target = Target(values[self.target], int(values[self.k]), values[self.class_name])
        threshold, region = float(values[self.score_threshold]), values[self.region]
        return CompareRequest(values[selected], values[self.methods], values[self.layer], target, threshold, region)

    def view(self, values: dict[Any, Any]) -> ViewOptions:
        return ViewOptions(values[self.opacity], values[self.colormap])


@dataclass
class ResultTab:
    """A tab with one more result for the last selected image: its ``button``, a ``note`` and the ``result``."""

    button: Any
    note: Any
    result: Any


def build_app(bench: Workbench):
    """The Gradio Blocks app (launch it with :func:`launch`): the page, and the public API
    (``/explain``, ``/methods``, ``/classes``, ``/layers``) of :mod:`explainkit.app.handlers`."""
    gr = _gradio()
    _on_pick.__annotations__["event"] = gr.SelectData  # how Gradio knows to pass the click (gradio is imported lazily)
    with gr.Blocks(title="explainkit", analytics_enabled=False) as app:
        selected = gr.State([])
        visible = gr.State([])
        _header(gr, bench)
        with gr.Row():
            with gr.Column(scale=2):
                pick = _pick_panel(gr, bench)
            with gr.Column(scale=3):
                compare = _compare_panel(gr, bench)
                every_class, faithfulness = _every_class_tab(gr), _faithfulness_tab(gr)
        _api_components(gr, bench, bench.methods())
        _wire_pick(app, bench, pick, selected, visible)
        _wire_compare(gr, bench, compare, selected)
        _wire_tabs(bench, compare, selected, every_class, faithfulness)
    # Several tabs at once (explainers are thread-safe); past QUEUE_SIZE waiting requests a client
    # is told the queue is full instead of the server running out of memory.
    app.queue(default_concurrency_limit=4, max_size=QUEUE_SIZE)
    return app


# --- the page's layout: each function lays out one part and returns its components ------------------
def _header(gr, bench: Workbench) -> None:
    card = bench.card
    task = "" if bench.classifies else f"{TASK_NAMES[bench.task]} · "
    gr.Markdown(
        f"## explainkit: {card.architecture}\n{task}{card.num_classes} classes · {card.describe_preprocessing()} · "
        f"{len(bench.items)} images in the pool"
    )


def _pick_panel(gr, bench: Workbench) -> PickPanel:
    classes = list(bench.card.classes)
    gr.Markdown("### Pick images")
    with gr.Row():
        true_filter = gr.Dropdown([ANY, *classes], value=ANY, label="true class")
        predicted_filter = gr.Dropdown([ANY, *classes], value=ANY, label="predicted class")
    with gr.Row():
        correctness = gr.Radio(["all", "correct", "wrong"], value="all", label="predictions")
        pair_filter = gr.Dropdown([ANY, *handlers.pair_labels(bench)], value=ANY, label="confusion pair (true -> predicted)")
    order = gr.Radio(["confidence", "least confident", "index"], value="confidence", label="sort by")
    return PickPanel(
        filters=[true_filter, predicted_filter, correctness, pair_filter, order],
        gallery=gr.Gallery(label="images (click to select)", columns=5, height=360, allow_preview=False, elem_id="pool"),
        uploads=gr.File(label="or upload images", file_count="multiple", elem_id="upload"),
        status=gr.Markdown(handlers.selected_text([]), elem_id="selected"),
        upload_message=gr.Markdown("", elem_id="upload-message"),
        clear=gr.Button("clear selection", size="sm"),
    )


def _compare_panel(gr, bench: Workbench) -> ComparePanel:
    classes, layers = list(bench.card.classes), bench.layer_choices()
    gr.Markdown("### Compare")
    methods = gr.CheckboxGroup(bench.methods(), value=["gradcam"], label="methods", elem_id="methods")
    classifies = bench.classifies  # a detector or segmenter: its own control instead of the class targets
    with gr.Row():
        layer = gr.Dropdown(layers, value=layers[0], label="layer", allow_custom_value=True)
        target = gr.Radio(list(TARGETS), value="predicted", label="explain the class", visible=classifies)
        k = gr.Slider(1, min(5, len(classes)), value=3, step=1, label="k (top-k)", visible=classifies)
        class_name = gr.Dropdown(classes, value=classes[0], label="class (for 'class')", visible=classifies)
        threshold = gr.Slider(
            0.05, 0.95, value=0.5, step=0.05, label="score threshold (boxes explained)", visible=bench.task == "detect"
        )
        region = gr.Dropdown([AUTOMATIC, *classes], value=AUTOMATIC, label="region's class", visible=bench.task == "segment")
    with gr.Row():
        opacity = gr.Slider(0, 1, value=0.5, step=0.05, label="opacity", elem_id="opacity")
        colormap = gr.Dropdown(list(COLORMAPS), value=COLORMAPS[0], label="colour map")
    return ComparePanel(
        methods,
        layer,
        target,
        k,
        class_name,
        opacity,
        colormap,
        run=gr.Button("explain", variant="primary", elem_id="explain"),
        message=gr.Markdown("", elem_id="message"),
        grid=gr.Gallery(label="images x methods (one shared [0, 1] colour scale)", columns=4, height="auto", elem_id="grid"),
        top=gr.Label(num_top_classes=5, label="top-5 probabilities (first selected image)", visible=classifies),
        score_threshold=threshold,
        region=region,
    )


def _every_class_tab(gr) -> ResultTab:
    with gr.Tab("every class"):
        return ResultTab(
            gr.Button("every class for the last selected image"),
            gr.Markdown(""),
            gr.Gallery(columns=5, height="auto", elem_id="per-class"),
        )


def _faithfulness_tab(gr) -> ResultTab:
    with gr.Tab("faithfulness"):
        return ResultTab(gr.Button("deletion / insertion for the last selected image (first method)"), gr.Markdown(""), gr.Plot())


# --- the page's events: each calls one handler of the workbench -----------------------------------
def _wire_pick(app, bench: Workbench, pick: PickPanel, selected: Any, visible: Any) -> None:
    show = functools.partial(handlers.filtered, bench)
    for control in pick.filters:
        control.change(show, pick.filters, [pick.gallery, visible], **PRIVATE)
    app.load(show, pick.filters, [pick.gallery, visible], **PRIVATE)
    pick.gallery.select(_on_pick, [visible, selected], [selected, pick.status], **PRIVATE)
    pick.uploads.upload(
        functools.partial(handlers.upload, bench),
        [pick.uploads, selected],
        [selected, pick.status, pick.upload_message],
        **PRIVATE,
    )
    pick.clear.click(lambda: ([], handlers.selected_text([])), None, [selected, pick.status], **PRIVATE)


def _wire_compare(gr, bench: Workbench, panel: ComparePanel, selected: Any) -> None:
    progress_bar = gr.Progress()  # Gradio hands this default to the event function, tracking its event

    def show(values: dict[Any, Any], progress: Any = progress_bar) -> tuple[Any, dict[str, float], str]:
        result = handlers.compare(bench, panel.request(values, selected), panel.view(values), progress)
        return gr.Gallery(value=result.panes, columns=result.columns), result.top, result.message

    inputs, outputs = panel.controls() | {selected}, [panel.grid, panel.top, panel.message]
    panel.run.click(show, inputs, outputs, **PRIVATE)
    # Opacity and colour map re-blend the cached maps: no recomputation.
    panel.opacity.release(show, inputs, outputs, **PRIVATE)
    panel.colormap.change(show, inputs, outputs, **PRIVATE)


def _wire_tabs(bench: Workbench, panel: ComparePanel, selected: Any, every_class: ResultTab, faithfulness: ResultTab) -> None:
    def every(values: dict[Any, Any]) -> tuple[list[handlers.Pane], str]:
        return handlers.per_class(bench, values[selected], values[panel.methods], values[panel.layer], panel.view(values))

    every_class.button.click(
        every,
        {selected, panel.methods, panel.layer, panel.opacity, panel.colormap},
        [every_class.result, every_class.note],
        **PRIVATE,
    )
    faithfulness.button.click(
        functools.partial(handlers.faithfulness, bench),
        [selected, panel.methods, panel.layer],
        [faithfulness.result, faithfulness.note],
        **PRIVATE,
    )


def _api_components(gr, bench: Workbench, methods: list[str]) -> None:
    """The public API: hidden components give each endpoint its typed, documented parameters (the
    labels are the handlers' docstring lines); a hidden button no one clicks carries the events."""
    doc = _documented(handlers.explain)
    with gr.Column(visible=False):
        trigger = gr.Button("API", visible=False)
        inputs = [
            gr.File(file_count="multiple", label=doc["images"]),
            gr.Dropdown(methods, value=["gradcam"], multiselect=True, allow_custom_value=True, label=doc["methods"]),
            gr.Textbox("", label=doc["layer"]),
            gr.Textbox("predicted", label=doc["target"]),
            gr.Number(0.5, label=doc["opacity"]),
            gr.Dropdown(list(COLORMAPS), value=COLORMAPS[0], allow_custom_value=True, label=doc["colormap"]),
            gr.Number(0.5, label=doc["score_threshold"]),
        ]
        overlays = gr.Gallery(label=doc["overlays"], format="png")  # lossless, for scripts that measure them
        probabilities = gr.JSON(label=doc["probabilities"])
        trigger.click(_endpoint(gr, handlers.explain, bench), inputs, [overlays, probabilities], api_name="explain")
        for handler in (handlers.methods, handlers.classes, handlers.layers):
            names = gr.JSON(label=inspect.getdoc(handler))
            trigger.click(_endpoint(gr, handler, bench), None, names, api_name=handler.__name__)


def launch(bench: Workbench, host: str = "127.0.0.1", port: int = 7860, block: bool = True):
    """Start the app and print its URL; ``block=False`` returns ``(app, url)`` (tests)."""
    gr = _gradio()
    app = build_app(bench)
    try:
        _, url, _ = app.launch(
            server_name=host,
            server_port=port,
            share=False,
            theme=_theme(gr),
            max_file_size=MAX_UPLOAD_BYTES,
            prevent_thread_lock=True,
            quiet=True,
            ssr_mode=False,
            footer_links=["api"],  # the API page: nothing else (no links off this machine)
        )
    except OSError as error:  # the port is taken, or the host is not this machine's
        reason = str(error).splitlines()[0]
        raise ExplainkitError(f"cannot serve on host={host} port={port}: {reason} (try another port)") from None
    print(f"explainkit serve: {url}", flush=True)
    if block:
        try:
            app.block_thread()
        finally:
            app.close()
    return app, url
