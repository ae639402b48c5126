"""``explainkit serve`` and ``report.html`` in a real browser (Debian's chromium driven by
Playwright): maps render, the opacity slider re-blends, a corrupt upload is reported in the page
and the next action still works, no request leaves the server (or ``file:``/``data:`` for the
report) and the console stays free of errors. Skipped with a reason where chromium or Playwright
is missing; ``.ci/run`` installs both.

And the app as an API, driven by ``gradio_client`` over HTTP (no browser needed): ``/explain``
answers a script with overlays and the model's probabilities, and the API page lists only the
public endpoints."""

from __future__ import annotations

import shutil
import socket
from urllib.parse import urlparse

import numpy as np
import pytest
import torch
from PIL import Image

from explainkit.app.workbench import Workbench
from explainkit.data.datasets import load_split

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PUBLIC = {"/explain", "/methods", "/classes", "/layers"}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("needs Debian's chromium package (apt-get install chromium)")
    playwright_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (the dev extra)")
    with playwright_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def served(random_model, tiny_folder):
    pytest.importorskip("gradio", reason="needs gradio (explainkit[ui])")
    from explainkit.app.ui import launch

    torch.manual_seed(0)
    bench = Workbench(random_model, torch.device("cpu"))
    bench.add_dataset(load_split("test", bench.card, tiny_folder))
    app, url = launch(bench, "127.0.0.1", _free_port(), block=False)
    yield url, bench
    app.close()


def _watch(page):
    requests: list[str] = []
    errors: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    return requests, errors


def _grid_sources(page) -> list[str]:
    return [image.get_attribute("src") for image in page.locator("#grid img").all()]


def test_app_compares_methods_reblends_and_survives_a_corrupt_upload(browser, served, tmp_path):
    url, bench = served
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    requests, errors = _watch(page)
    page.goto(url)
    page.locator("#pool .thumbnail-item").first.wait_for(timeout=60_000)
    assert page.locator("#pool .thumbnail-item").count() == len(bench.items)  # 20 test images

    page.locator("#pool .thumbnail-item").nth(0).click()
    page.locator("#pool .thumbnail-item").nth(3).click()
    page.get_by_text("Selected: test/").wait_for(timeout=30_000)
    page.get_by_role("checkbox", name="gradcam++", exact=True).check()
    page.locator("#explain").click()
    page.wait_for_function("document.querySelectorAll('#grid img').length >= 6", timeout=60_000)  # 2 x (image + 2 methods)
    before = _grid_sources(page)

    slider = page.locator("#opacity input[type=range]")
    slider.fill("0.9")
    slider.dispatch_event("change")
    slider.dispatch_event("pointerup")
    page.wait_for_function(
        "(old) => { const now = [...document.querySelectorAll('#grid img')].map(i => i.src); "
        "return now.length >= 6 && now.join() !== old.join(); }",
        arg=before,
        timeout=60_000,
    )

    corrupt = tmp_path / "broken.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    page.locator("#upload input[type=file]").set_input_files(str(corrupt))
    page.get_by_text("Could not use broken.png").wait_for(timeout=60_000)
    page.locator("#explain").click()  # the app still works after the bad file
    page.wait_for_function("document.querySelectorAll('#grid img').length >= 6", timeout=60_000)

    hosts = {urlparse(address).netloc for address in requests if not address.startswith(("data:", "blob:"))}
    assert hosts == {urlparse(url).netloc}, hosts
    assert not errors, errors
    page.close()


def test_report_opens_from_disk_with_no_network_request(browser, random_model, tiny_folder, tmp_path):
    import explainkit
    from explainkit.jobs.explain import ExplainOptions, explain_dataset
    from explainkit.models.card import ModelCard

    explainers = {name: explainkit.get_explainer(name, random_model) for name in ("gradcam", "layercam")}
    dataset = load_split("test", ModelCard(), tiny_folder)
    explain_dataset(
        random_model,
        ModelCard(),
        explainers,
        dataset,
        tmp_path,
        torch.device("cpu"),
        ExplainOptions(samples=2, misclassified=3, batch_size=8),
    )
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    requests, errors = _watch(page)
    page.goto((tmp_path / "report.html").as_uri())
    titles = page.locator("section h2").all_inner_texts()
    assert {"Provenance", "Accuracy", "Per-class maps", "Misclassified", "Method comparison"} <= set(titles)
    assert page.locator("img").count() >= 4
    assert all(page.evaluate("[...document.images].every(i => i.complete && i.naturalWidth > 0)") for _ in range(1))
    schemes = {urlparse(address).scheme for address in requests}
    assert schemes <= {"file", "data"}, requests
    assert not errors, errors
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 1280  # readable at laptop width: no horizontal scrolling
    page.close()


def test_serve_without_gradio_says_how_to_install(monkeypatch, capsys, random_checkpoint):
    import builtins

    from explainkit.cli import main

    real_import = builtins.__import__

    def no_gradio(name, *args, **kwargs):
        if name == "gradio":
            raise ImportError("No module named 'gradio'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_gradio)
    assert main(["serve", "--checkpoint", str(random_checkpoint)]) == 2
    assert "pip install 'explainkit[ui]'" in capsys.readouterr().err


def test_a_taken_port_is_a_clear_error_naming_the_parameters(served):
    from explainkit.app.ui import launch
    from explainkit.errors import ExplainkitError

    url, bench = served
    port = urlparse(url).port
    with pytest.raises(ExplainkitError, match=rf"^cannot serve on host=127.0.0.1 port={port}: .*\(try another port\)$"):
        launch(bench, "127.0.0.1", port, block=False)


def test_the_queue_is_bounded_so_overload_answers_busy(random_model):
    pytest.importorskip("gradio", reason="needs gradio (explainkit[ui])")
    from explainkit.app.ui import QUEUE_SIZE, build_app

    app = build_app(Workbench(random_model, torch.device("cpu")))
    assert app._queue.max_size == QUEUE_SIZE and QUEUE_SIZE > 0


@pytest.fixture(scope="module")
def client(served):
    gradio_client = pytest.importorskip("gradio_client", reason="needs gradio_client (comes with gradio)")
    url, _ = served
    return gradio_client.Client(url, verbose=False)


def test_api_explains_an_uploaded_file_like_the_library(client, served, random_model, tmp_path):
    from gradio_client import handle_file

    url, bench = served
    path = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)
    overlays, probabilities = client.predict(
        images=[handle_file(str(path))], methods=["gradcam", "layercam"], layer="", target="predicted", opacity=0.5,
        api_name="/explain",
    )  # fmt: skip
    assert [pane["caption"].split(" @ ")[0] for pane in overlays] == ["photo.png: gradcam", "photo.png: layercam"]
    for pane in overlays:
        picture = np.asarray(Image.open(pane["image"]))
        assert picture.shape == (32, 32, 3) and picture.std() > 0

    with torch.no_grad():  # the same file through the library's own preprocessing
        expected = random_model(random_model.card.preprocess(Image.open(path))).softmax(1)[0]
    (answer,) = probabilities
    predicted = int(expected.argmax())
    assert answer["image"] == "photo.png" and answer["predicted"] == bench.card.classes[predicted]
    assert answer["key"] in bench.items  # through the page's upload path: in the pool, selectable there too
    assert len(answer["top"]) == 5 and list(answer["top"])[0] == answer["predicted"]
    for name, probability in answer["top"].items():
        assert probability == pytest.approx(float(expected[bench.card.classes.index(name)]), abs=1e-5)

    overlays, _ = client.predict(images=[handle_file(str(path))], methods=["gradcam"], target="topk:3", api_name="/explain")
    assert len(overlays) == 3  # defaults for what is not given; one overlay per class asked for
    assert client.predict(api_name="/classes") == list(bench.card.classes)
    assert "gradcam" in client.predict(api_name="/methods")


def test_api_errors_are_one_line_messages_without_server_paths(client, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    corrupt = tmp_path / "broken.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(AppError) as caught:
        client.predict(images=[handle_file(str(corrupt))], api_name="/explain")
    message = str(caught.value)
    assert "cannot read image broken.png" in message and "/" not in message and "\n" not in message
    with pytest.raises(AppError, match="unknown explainer 'nope'; registered: .*gradcam"):
        client.predict(images=[handle_file(str(corrupt))], methods=["nope"], api_name="/explain")


def test_api_page_lists_only_the_public_endpoints(client):
    api = client.view_api(return_format="dict", print_info=False)
    assert set(api["named_endpoints"]) == PUBLIC and not api["unnamed_endpoints"]
    explain = api["named_endpoints"]["/explain"]
    names = [parameter["parameter_name"] for parameter in explain["parameters"]]
    assert names == ["images", "methods", "layer", "target", "opacity", "colormap", "score_threshold"]
    defaults = {p["parameter_name"]: p["parameter_default"] for p in explain["parameters"] if p["parameter_has_default"]}
    assert defaults == {
        "methods": ["gradcam"],
        "layer": "",
        "target": "predicted",
        "opacity": 0.5,
        "colormap": "inferno",
        "score_threshold": 0.5,
    }
    assert all(parameter["label"].startswith(parameter["parameter_name"] + ": ") for parameter in explain["parameters"])
    assert explain["description"].startswith("Explain one or more image files")


def test_api_explains_a_detectors_boxes(tmp_path):
    """A served detector: /explain answers with its figure and the boxes it explained (label, score, box)."""
    gradio_client = pytest.importorskip("gradio_client", reason="needs gradio_client (comes with gradio)")
    import explainkit
    from explainkit.app.ui import launch

    with pytest.warns(RuntimeWarning, match="random weights"):
        model = explainkit.load_spec("tests.task_models:detector", image_size=64, mean=(0, 0, 0), std=(1, 1, 1))
    bench = Workbench(model, torch.device("cpu"))
    app, url = launch(bench, "127.0.0.1", _free_port(), block=False)
    try:
        path = tmp_path / "street.png"
        Image.fromarray(np.random.default_rng(3).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)
        client = gradio_client.Client(url, verbose=False)
        figures, (answer,) = client.predict(
            images=[gradio_client.handle_file(str(path))], score_threshold=0.2, api_name="/explain"
        )
        assert [pane["caption"] for pane in figures] == ["street.png: gradcam @ default layer: detect"]
        assert np.asarray(Image.open(figures[0]["image"])).std() > 0
        assert answer["task"] == "detect" and answer["boxes"]
        assert all(box["label"] in model.card.classes and box["score"] >= 0.2 for box in answer["boxes"])
    finally:
        app.close()


def _hostile_upload(kind: str, folder):
    """A file a hostile or unlucky user might upload."""
    import struct
    import zlib

    path = folder / f"{kind}.png"
    small = folder / "small.png"
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(small)
    data = small.read_bytes()
    if kind in ("bomb", "huge"):  # a 30,000 or 10,000 square header on an 8 x 8 file: never decoded
        side = 30_000 if kind == "bomb" else 10_000
        header = b"IHDR" + struct.pack(">II", side, side) + data[24:29]
        data = data[:12] + header + struct.pack(">I", zlib.crc32(header)) + data[33:]
    elif kind == "empty":
        data = b""
    elif kind == "truncated":
        data = data[: len(data) // 2]
    elif kind == "text":
        data = b"this is not an image, whatever its name says"
    elif kind == "animated":
        frames = [Image.fromarray(np.full((8, 8, 3), v, dtype=np.uint8)) for v in (0, 255)]
        frames[0].save(path, format="GIF", save_all=True, append_images=frames[1:])
        return path
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "kind, words",
    [
        ("bomb", "bomb.png: refused as a decompression bomb"),  # PIL's own guard, past 179 megapixels
        ("huge", "10000 x 10000 pixels is over the limit of 40 megapixels"),
        ("empty", "cannot read image empty.png"),
        ("truncated", "cannot read image truncated.png"),
        ("text", "cannot read image text.png"),
        ("animated", "an animated or multi-frame image (2 frames)"),
    ],
)
def test_hostile_uploads_are_one_line_messages_through_the_api(kind, words, client, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    upload = _hostile_upload(kind, tmp_path)
    with pytest.raises(AppError) as caught:
        client.predict(images=[handle_file(str(upload))], api_name="/explain")
    message = str(caught.value)
    assert words in message and "\n" not in message and str(tmp_path) not in message and "/tmp" not in message
