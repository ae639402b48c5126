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
from typing import Any, Callable

from explainkit.app import handlers
from explainkit.app.handlers import ANY, TARGETS
from explainkit.app.workbench import COLORMAPS, MAX_UPLOAD_BYTES, Workbench
from explainkit.errors import ExplainkitError

PRIVATE = {"api_visibility": "private"}  # the page's own events: not on the API page, not for API clients


def _gradio():
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported
    try:
        import gradio as gr
    except ImportError:
        raise ExplainkitError("the web app needs Gradio: pip install 'explainkit[ui]'") from None
    return gr


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


def build_app(bench: Workbench):
    """The Gradio Blocks app (launch it with :func:`launch`): the page, and the public API
    (``/explain``, ``/methods``, ``/classes``, ``/layers``) of :mod:`explainkit.app.handlers`."""
    gr = _gradio()
    _on_pick.__annotations__["event"] = gr.SelectData  # how Gradio knows to pass the click (gradio is imported lazily)
    card = bench.card
    classes = list(card.classes)
    methods = bench.methods()
    layers = bench.layer_choices()
    bound = functools.partial  # bound(handler, bench): the handler as an event function

    def show_comparison(selected, methods, layer, target, k, class_name, opacity, colormap, progress=gr.Progress()):  # noqa: B008 - Gradio's idiom
        result = handlers.compare(bench, selected, methods, layer, target, k, class_name, opacity, colormap, progress)
        return gr.Gallery(value=result.panes, columns=result.columns), result.top, result.message

    with gr.Blocks(title="explainkit", analytics_enabled=False) as app:
        selected = gr.State([])
        visible = gr.State([])
        gr.Markdown(
            f"## explainkit: {card.architecture}\n{card.num_classes} classes · {card.describe_preprocessing()} · "
            f"{len(bench.items)} images in the pool"
        )
        with gr.Row():
            with gr.Column(scale=2):
                gr.Markdown("### Pick images")
                with gr.Row():
                    true_filter = gr.Dropdown([ANY, *classes], value=ANY, label="true class")
                    predicted_filter = gr.Dropdown([ANY, *classes], value=ANY, label="predicted class")
                with gr.Row():
                    correctness = gr.Radio(["all", "correct", "wrong"], value="all", label="predictions")
                    pair_filter = gr.Dropdown(
                        [ANY, *handlers.pair_labels(bench)], value=ANY, label="confusion pair (true -> predicted)"
                    )
                order = gr.Radio(["confidence", "least confident", "index"], value="confidence", label="sort by")
                gallery = gr.Gallery(label="images (click to select)", columns=5, height=360, allow_preview=False, elem_id="pool")
                uploads = gr.File(label="or upload images", file_count="multiple", elem_id="upload")
                status = gr.Markdown(handlers.selected_text([]), elem_id="selected")
                upload_message = gr.Markdown("", elem_id="upload-message")
                clear = gr.Button("clear selection", size="sm")
            with gr.Column(scale=3):
                gr.Markdown("### Compare")
                chosen_methods = gr.CheckboxGroup(methods, value=["gradcam"], label="methods", elem_id="methods")
                with gr.Row():
                    layer = gr.Dropdown(layers, value=layers[0], label="layer", allow_custom_value=True)
                    target = gr.Radio(list(TARGETS), value="predicted", label="explain the class")
                    k = gr.Slider(1, min(5, len(classes)), value=3, step=1, label="k (top-k)")
                    class_name = gr.Dropdown(classes, value=classes[0], label="class (for 'class')")
                with gr.Row():
                    opacity = gr.Slider(0, 1, value=0.5, step=0.05, label="opacity", elem_id="opacity")
                    colormap = gr.Dropdown(list(COLORMAPS), value=COLORMAPS[0], label="colour map")
                run = gr.Button("explain", variant="primary", elem_id="explain")
                message = gr.Markdown("", elem_id="message")
                grid = gr.Gallery(
                    label="images x methods (one shared [0, 1] colour scale)", columns=4, height="auto", elem_id="grid"
                )
                top5 = gr.Label(num_top_classes=5, label="top-5 probabilities (first selected image)")
                with gr.Tab("every class"):
                    per_class_button = gr.Button("every class for the last selected image")
                    per_class_note = gr.Markdown("")
                    per_class_grid = gr.Gallery(columns=5, height="auto", elem_id="per-class")
                with gr.Tab("faithfulness"):
                    faith_button = gr.Button("deletion / insertion for the last selected image (first method)")
                    faith_note = gr.Markdown("")
                    faith_plot = gr.Plot()
        _api_components(gr, bench, methods)

        filters = [true_filter, predicted_filter, correctness, pair_filter, order]
        for control in filters:
            control.change(bound(handlers.filtered, bench), filters, [gallery, visible], **PRIVATE)
        app.load(bound(handlers.filtered, bench), filters, [gallery, visible], **PRIVATE)
        gallery.select(_on_pick, [visible, selected], [selected, status], **PRIVATE)
        uploads.upload(bound(handlers.upload, bench), [uploads, selected], [selected, status, upload_message], **PRIVATE)
        clear.click(lambda: ([], handlers.selected_text([])), None, [selected, status], **PRIVATE)
        compare_inputs = [selected, chosen_methods, layer, target, k, class_name, opacity, colormap]
        run.click(show_comparison, compare_inputs, [grid, top5, message], **PRIVATE)
        # Opacity and colour map re-blend the cached maps: no recomputation.
        opacity.release(show_comparison, compare_inputs, [grid, top5, message], **PRIVATE)
        colormap.change(show_comparison, compare_inputs, [grid, top5, message], **PRIVATE)
        per_class_button.click(
            bound(handlers.per_class, bench),
            [selected, chosen_methods, layer, opacity, colormap],
            [per_class_grid, per_class_note],
            **PRIVATE,
        )
        faith_button.click(
            bound(handlers.faithfulness, bench), [selected, chosen_methods, layer], [faith_plot, faith_note], **PRIVATE
        )
    app.queue(default_concurrency_limit=4)  # several tabs at once: explainers are thread-safe
    return app


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
        raise ExplainkitError(f"cannot serve on {host}:{port}: {str(error).splitlines()[0]} (try another --port)") from None
    print(f"explainkit serve: {url}", flush=True)
    if block:
        try:
            app.block_thread()
        finally:
            app.close()
    return app, url
