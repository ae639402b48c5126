"""``explainkit serve`` and ``report.html`` in a real browser (Debian's chromium driven by
Playwright): maps render, the opacity slider re-blends, a corrupt upload is reported in the page
and the next action still works, no request leaves the server (or ``file:``/``data:`` for the
report) and the console stays free of errors. Skipped with a reason where chromium or Playwright
is missing; ``.ci/run`` installs both."""

from __future__ import annotations

import shutil
import socket
from urllib.parse import urlparse

import pytest
import torch

from explainkit.app.workbench import Workbench
from explainkit.data.datasets import load_split

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium package (apt-get install chromium)")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def browser():
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
    from explainkit.jobs.explain import explain_dataset
    from explainkit.models.card import ModelCard

    explainers = {name: explainkit.get_explainer(name, random_model) for name in ("gradcam", "layercam")}
    dataset = load_split("test", ModelCard(), tiny_folder)
    explain_dataset(
        random_model, ModelCard(), explainers, dataset, tmp_path, torch.device("cpu"), samples=2, misclassified=3, batch_size=8
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


def test_workbench_filters_and_caches(random_model, tiny_folder):
    bench = Workbench(random_model, torch.device("cpu"))
    bench.add_dataset(load_split("test", bench.card, tiny_folder))
    wrong = bench.select(correctness="wrong")
    assert all(item.label != item.predicted for item in wrong)
    cats = bench.select(true_class="cat")
    assert len(cats) == 2 and all(bench.card.classes[item.label] == "cat" for item in cats)
    ordered = bench.select(order="confidence")
    assert [item.confidence for item in ordered] == sorted((item.confidence for item in ordered), reverse=True)
    items = ordered[:2]
    first = bench.maps(items, "gradcam", None, [[3, 5], [3, 5]])
    calls = []
    original = bench.explainer("gradcam", None)
    bench._explainers[("gradcam", None)] = lambda *a, **k: calls.append(1) or original(*a, **k)
    again = bench.maps(items, "gradcam", None, [[3, 5], [3, 5]])
    assert not calls and torch.equal(first, again)  # served from the cache
    torch.testing.assert_close(first[:, 0], original(torch.stack([i.input for i in items]), targets=3))


def test_workbench_rejects_bad_uploads_clearly(random_model, tmp_path):
    from explainkit.errors import ImageReadError

    bench = Workbench(random_model, torch.device("cpu"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ImageReadError, match="not an image type"):
        bench.add_upload(tmp_path / "notes.txt")
    (tmp_path / "bad.jpg").write_bytes(b"nope")
    with pytest.raises(ImageReadError, match="cannot read image"):
        bench.add_upload(tmp_path / "bad.jpg")
    assert not bench.items


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
