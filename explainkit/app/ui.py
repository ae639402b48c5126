"""``explainkit serve``: a local web app (Gradio Blocks) over a :class:`~explainkit.app.workbench.Workbench`.

Pick test images (filter by true/predicted class, correct/wrong, confusion pair; sort by
confidence) or upload files; compare any registered methods and layers on them with one colour
scale, an opacity slider and a colour-map choice; targets: predicted, true, top-k or a named
class; every class's map for one image from one pass; deletion/insertion curves on demand.

Offline and private by default: binds 127.0.0.1, no share link, Gradio's analytics off and its
Google-hosted fonts replaced by the system's, so the page makes no request beyond the server.
"""

from __future__ import annotations

import os
from typing import Any

from explainkit.app.workbench import COLORMAPS, MAX_UPLOAD_BYTES, Item, Workbench
from explainkit.errors import ExplainkitError

GALLERY_SIZE = 60
MAX_SELECTED = 8
ANY = "(any)"
TARGETS = ("predicted", "true", "top-k", "class")


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


def build_app(bench: Workbench):
    """The Gradio Blocks app; launch it with :func:`launch`."""
    gr = _gradio()
    card = bench.card
    classes = list(card.classes)
    pairs = [f"{t} -> {p} ({n})" for t, p, n in bench.confusion_pairs()]

    def caption(item: Item) -> str:
        truth = f"true {classes[item.label]}, " if item.label is not None else ""
        return f"{item.key}: {truth}pred {classes[item.predicted]} ({item.confidence:.2f})"

    def filtered(true_class: str, predicted: str, correctness: str, pair: str, order: str) -> tuple[list, list[str]]:
        if pair and pair != ANY:
            true_class, predicted = pair.split(" (")[0].split(" -> ")
            correctness = "wrong"
        items = bench.select(
            None if true_class in (None, ANY) else true_class,
            None if predicted in (None, ANY) else predicted,
            correctness,
            order,
        )[:GALLERY_SIZE]
        return [(bench.display(item), caption(item)) for item in items], [item.key for item in items]

    def pick(visible: list[str], selected: list[str], event: Any):
        key = visible[event.index]
        if key not in selected:
            selected = (selected + [key])[-MAX_SELECTED:]
        return selected, _selected_text(selected)

    pick.__annotations__["event"] = gr.SelectData  # how Gradio knows to pass the click (gradio is imported lazily)

    def _selected_text(selected: list[str]) -> str:
        return "Selected: " + (", ".join(selected) if selected else "none (click images in the gallery, or upload)")

    def upload(files: list[Any] | None, selected: list[str]):
        messages = []
        for file in files or []:
            path = getattr(file, "name", file)
            try:
                item = bench.add_upload(path)
            except ExplainkitError as error:
                messages.append(f"**Could not use {os.path.basename(str(path))}**: {error}")
                continue
            selected = (selected + [item.key])[-MAX_SELECTED:]
        return selected, _selected_text(selected), "\n\n".join(messages)

    def compare(selected, methods, layer, target, k, class_name, opacity, colormap, progress=gr.Progress()):  # noqa: B008 - Gradio's idiom
        if not selected:
            return [], {}, "Select or upload at least one image first."
        if not methods:
            return [], {}, "Choose at least one method."
        items = [bench.items[key] for key in selected]
        try:
            wanted = [bench.class_index(item, target, int(k), class_name) for item in items]
            maps = {}
            for count, method in enumerate(methods):  # every selected image in one call per method
                progress(count / len(methods), desc=f"{method} on {len(items)} images")
                maps[method] = bench.maps(items, method, layer or None, wanted)  # (N, J, H, W)
        except ExplainkitError as error:  # e.g. a layer that is not a feature map: say so in the page
            return [], {}, f"**{error}**"
        panes = []
        for row, item in enumerate(items):
            panes.append((bench.display(item), caption(item)))
            for method in methods:
                for cls, heat in zip(wanted[row], maps[method][row]):
                    panes.append((bench.blend(item, heat, opacity, colormap), f"{method} @ {layer}: {classes[cls]}"))
        first = items[0]
        top = {classes[int(i)]: float(first.probabilities[i]) for i in first.probabilities.topk(min(5, len(classes))).indices}
        columns = len(panes) // len(items)  # one row per image: the image, then its maps
        return gr.Gallery(value=panes, columns=columns), top, ""

    def per_class(selected, method, layer, opacity, colormap):
        if not selected:
            return [], "Select an image first."
        item = bench.items[selected[-1]]
        every = bench.all_classes(item, method, layer or None)
        order = item.probabilities.argsort(descending=True)[: min(len(classes), 20)]
        return [
            (bench.blend(item, every[int(cls)], opacity, colormap), f"{classes[int(cls)]} ({float(item.probabilities[cls]):.2f})")
            for cls in order
        ], f"{item.key}: every class's map from one pass ({method})"

    def faithfulness(selected, method, layer):
        if not selected:
            return None, "Select an image first."
        from matplotlib.figure import Figure

        item = bench.items[selected[-1]]
        scores = bench.faithfulness(item, method, layer or None)
        figure = Figure(figsize=(8, 3))
        axes = figure.subplots(1, 2)
        for ax, name in zip(axes, ("deletion", "insertion")):
            curve = scores[name]
            ax.plot([i / (len(curve) - 1) for i in range(len(curve))], curve)
            ax.set_title(f"{name}: AUC {scores[name + '_auc']:.3f}")
            ax.set_xlabel("fraction of pixels")
            ax.set_ylim(0, 1)
        axes[0].set_ylabel(f"p({classes[item.predicted]})")
        figure.tight_layout()
        return (
            figure,
            f"{item.key}, {method}: deletion AUC {scores['deletion_auc']:.3f} (lower is better), insertion AUC {scores['insertion_auc']:.3f} (higher is better)",
        )

    methods = bench.methods()
    layers = bench.layer_choices()
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
                    pair_filter = gr.Dropdown([ANY, *pairs], value=ANY, label="confusion pair (true -> predicted)")
                order = gr.Radio(["confidence", "least confident", "index"], value="confidence", label="sort by")
                gallery = gr.Gallery(label="images (click to select)", columns=5, height=360, allow_preview=False, elem_id="pool")
                uploads = gr.File(label="or upload images", file_count="multiple", elem_id="upload")
                status = gr.Markdown(_selected_text([]), elem_id="selected")
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

        filters = [true_filter, predicted_filter, correctness, pair_filter, order]
        for control in filters:
            control.change(filtered, filters, [gallery, visible])
        app.load(filtered, filters, [gallery, visible])
        gallery.select(pick, [visible, selected], [selected, status])
        uploads.upload(upload, [uploads, selected], [selected, status, upload_message])
        clear.click(lambda: ([], _selected_text([])), None, [selected, status])
        compare_inputs = [selected, chosen_methods, layer, target, k, class_name, opacity, colormap]
        run.click(compare, compare_inputs, [grid, top5, message])
        # Opacity and colour map re-blend the cached maps: no recomputation.
        opacity.release(compare, compare_inputs, [grid, top5, message])
        colormap.change(compare, compare_inputs, [grid, top5, message])
        first_method = lambda methods: (methods or ["gradcam"])[0]  # noqa: E731
        per_class_button.click(
            lambda s, m, la, o, c: per_class(s, first_method(m), la, o, c),
            [selected, chosen_methods, layer, opacity, colormap],
            [per_class_grid, per_class_note],
        )
        faith_button.click(
            lambda s, m, la: faithfulness(s, first_method(m), la), [selected, chosen_methods, layer], [faith_plot, faith_note]
        )
    app.queue(default_concurrency_limit=4)  # several tabs at once: explainers are thread-safe
    return app


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
            footer_links=[],
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
