"""The web app's actions (:mod:`explainkit.app.handlers`) as plain functions: no Gradio, no browser."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import explainkit
from explainkit import figures
from explainkit.app import handlers
from explainkit.app.handlers import CompareRequest
from explainkit.app.workbench import Target, ViewOptions, Workbench
from explainkit.data.datasets import load_split
from explainkit.errors import ExplainkitError


@pytest.fixture(scope="module")
def pool(random_model, tiny_folder) -> dict:
    bench = Workbench(random_model, torch.device("cpu"))
    bench.add_dataset(load_split("test", bench.card, tiny_folder))
    return bench.items


@pytest.fixture
def bench(random_model, pool) -> Workbench:
    """A fresh workbench (no uploads, empty cache) on the 20 test images, predicted once per module."""
    bench = Workbench(random_model, torch.device("cpu"))
    bench.items.update(pool)
    return bench


@pytest.fixture
def photo(tmp_path):
    path = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)
    return path


def test_handlers_do_not_need_gradio():
    code = "import sys, explainkit.app.handlers; assert 'gradio' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_explain_matches_the_library_on_the_same_preprocessed_image(bench, random_model, photo):
    overlays, probabilities = handlers.explain(bench, [str(photo)], ["gradcam", "layercam"], "", "predicted", 0.6)
    batch = random_model.card.preprocess(Image.open(photo))  # the library's own preprocessing of the same file
    with torch.no_grad():
        expected = random_model(batch).softmax(1)[0]
    predicted = int(expected.argmax())
    (answer,) = probabilities
    item = bench.items[answer["key"]]  # the upload went into the pool
    torch.testing.assert_close(item.input, batch[0])
    assert answer["predicted"] == bench.card.classes[predicted] and answer["image"] == "photo.png"
    assert answer["confidence"] == pytest.approx(float(expected.max()), abs=1e-6)
    assert {name: pytest.approx(float(expected[bench.card.classes.index(name)]), abs=1e-6) for name in answer["top"]} == answer[
        "top"
    ]

    assert [caption for _, caption in overlays] == [
        f"photo.png: {method} @ default layer: {bench.card.classes[predicted]}" for method in ("gradcam", "layercam")
    ]
    image = bench.card.denormalize(batch)[0]
    for (picture, _), method in zip(overlays, ("gradcam", "layercam")):
        heat = explainkit.get_explainer(method, random_model)(batch, targets=predicted)[0]
        torch.testing.assert_close(bench.maps([item], method, None, [[predicted]])[0, 0], heat)
        assert picture.dtype == np.uint8 and picture.shape == (32, 32, 3)
        assert np.abs(picture / 255 - figures.overlay(image, heat, 0.6)).max() <= 1 / 255


@pytest.mark.parametrize(("target", "count"), [("predicted", 1), ("all", 10), ("topk:3", 3), ("TopK: 2", 2), ("cat", 1), ("", 1)])
def test_explain_targets(bench, photo, target, count):
    overlays, answers = handlers.explain(bench, [photo, photo], "gradcam", "layer4", target)
    assert len(overlays) == 2 * count and len(answers) == 2  # one image after the other
    assert [answer["key"] for answer in answers] == [f"upload/{n}/photo.png" for n in range(2)]
    captions = [caption for _, caption in overlays]
    assert all(caption.startswith("photo.png: gradcam @ layer4: ") for caption in captions)
    if target == "cat":
        assert captions[0].endswith(": cat")
    if target == "all":
        assert [caption.rsplit(": ", 1)[1] for caption in captions[:10]] == list(bench.card.classes)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"images": []}, "no image given"),
        ({"methods": []}, "no method given: choose from .*gradcam"),
        ({"methods": ["gradcam", "nope"]}, "unknown explainer 'nope'; registered: "),
        ({"target": "wolf"}, r"unknown target 'wolf': use predicted, all, topk:K or a class name \(airplane, "),
        ({"target": "topk:11"}, "K in topk:K must be a whole number from 1 to 10"),
        ({"opacity": 1.5}, "opacity 1.5: give a number from 0 to 1"),
        ({"colormap": "rainbow"}, "unknown colour map 'rainbow'"),
        ({"layer": "layer9"}, "unknown layer 'layer9'"),
        ({"target": "all", "methods": ["gradcam", "layercam", "hirescam"], "images": ["x.png"] * 9}, "more than 256 overlays"),
        ({"images": ["x.png"] * 33}, "33 images: at most 32 per call"),
    ],
)
def test_explain_refuses_clearly(bench, photo, change, message):
    arguments = {"images": [photo], "methods": ["gradcam"], "layer": "", "target": "predicted", "opacity": 0.5} | change
    before = len(bench.items)
    with pytest.raises(ExplainkitError, match=message):
        handlers.explain(bench, **arguments)
    if "layer" not in change:
        assert len(bench.items) == before  # checked before anything is uploaded


def test_explain_names_an_unreadable_file_but_not_its_folder(bench, tmp_path):
    corrupt = tmp_path / "broken.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(ExplainkitError, match="cannot read image broken.png") as caught:
        handlers.explain(bench, [corrupt])
    assert str(tmp_path) not in str(caught.value)


def test_gallery_filters_pick_and_upload(bench, photo, tmp_path):
    panes, keys = handlers.filtered(bench, handlers.ANY, handlers.ANY, "all", handlers.ANY, "index")
    assert keys == [f"test/{n}" for n in range(20)] and len(panes) == 20
    picture, caption = panes[0]
    assert picture.shape == (32, 32, 3) and caption.startswith("test/0: true airplane, pred ")
    _, cats = handlers.filtered(bench, "cat", None, "all", None, "confidence")
    assert len(cats) == 2
    pair = handlers.pair_labels(bench)[0]
    _, wrong = handlers.filtered(bench, handlers.ANY, handlers.ANY, "all", pair, "index")
    true_class, predicted = pair.split(" (")[0].split(" -> ")
    assert wrong and all(bench.card.classes[bench.items[key].label] == true_class for key in wrong)
    assert all(bench.card.classes[bench.items[key].predicted] == predicted for key in wrong)

    selected, text = handlers.pick(keys, [], 3)
    selected, text = handlers.pick(keys, selected, 3)  # twice: still once
    assert selected == ["test/3"] and text == "Selected: test/3"
    for index in range(10):
        selected, _ = handlers.pick(keys, selected, index)
    assert len(selected) == handlers.MAX_SELECTED

    (tmp_path / "notes.txt").write_text("hello")
    selected, text, message = handlers.upload(bench, [str(photo), str(tmp_path / "notes.txt")], ["test/0"])
    assert selected == ["test/0", "upload/0/photo.png"] and text.endswith("upload/0/photo.png")
    assert message.startswith("**Could not use notes.txt**: notes.txt: not an image type")


def test_compare_per_class_and_faithfulness(bench):
    progress = []
    request = CompareRequest(["test/0", "test/1"], ["gradcam", "layercam"], "layer4", Target("top-k", 2))
    result = handlers.compare(
        bench, request, ViewOptions(0.5, "viridis"), lambda fraction, desc: progress.append((fraction, desc))
    )
    assert not result.message and result.columns == 5  # the image, then 2 methods x 2 classes
    assert len(result.panes) == 10 and result.panes[1][1].startswith("gradcam @ layer4: ")
    assert progress == [(0.0, "gradcam on 2 images"), (0.5, "layercam on 2 images")]
    assert list(result.top) == list(handlers.top_classes(bench, bench.items["test/0"]))
    view = ViewOptions()
    assert handlers.compare(bench, CompareRequest([], ["gradcam"], "layer4"), view).message.startswith("Select")
    assert handlers.compare(bench, CompareRequest(["test/0"], [], "layer4"), view).message.startswith("Choose")
    assert "unknown layer" in handlers.compare(bench, CompareRequest(["test/0"], ["gradcam"], "nope"), view).message
    assert (
        "unknown class 'wolf'"
        in handlers.compare(bench, CompareRequest(["test/0"], ["gradcam"], "", Target("class", class_name="wolf")), view).message
    )

    panes, note = handlers.per_class(bench, ["test/0", "test/5"], ["gradcam"], "", view)
    assert len(panes) == 10 and note.startswith("test/5: every class's map")
    assert handlers.per_class(bench, [], None, "", view) == ([], "Select an image first.")

    figure, note = handlers.faithfulness(bench, ["test/2"], None, "")
    assert figure is not None and "deletion AUC" in note and "gradcam" in note
    assert handlers.faithfulness(bench, [], None, "") == (None, "Select an image first.")


def test_the_listing_endpoints(bench):
    assert "gradcam" in handlers.methods(bench)
    assert handlers.classes(bench) == list(bench.card.classes)
    assert handlers.layers(bench)[0] == bench.layer_choices()[0]


# --- detectors and segmenters --------------------------------------------------------------------
def _task_bench(spec: str, **preprocessing) -> Workbench:
    with pytest.warns(RuntimeWarning, match="random weights"):
        model = explainkit.load_spec(f"tests.task_models:{spec}", image_size=64, **preprocessing)
    return Workbench(model, torch.device("cpu"))


@pytest.fixture(scope="module")
def detector_bench() -> Workbench:
    return _task_bench("detector", mean=(0, 0, 0), std=(1, 1, 1))  # torchvision detectors normalise themselves


@pytest.fixture(scope="module")
def segmenter_bench() -> Workbench:
    return _task_bench("segmenter")


def test_a_detector_gets_its_figure_and_the_boxes(detector_bench, photo):
    bench = detector_bench
    assert bench.task == "detect"
    overlays, answers = handlers.explain(bench, [photo], ["gradcam"], "", "predicted", score_threshold=0.2)
    ((figure, caption),) = overlays
    assert caption == "photo.png: gradcam @ default layer: detect"
    assert figure.dtype == np.uint8 and figure.ndim == 3 and figure.shape[1] > figure.shape[0] and figure.std() > 0
    (answer,) = answers
    assert answer["task"] == "detect" and answer["image"] == "photo.png" and answer["key"] in bench.items
    assert answer["boxes"] and all(box["label"] in bench.card.classes[1:] and box["score"] >= 0.2 for box in answer["boxes"])
    assert all(len(box["box"]) == 4 for box in answer["boxes"])

    result = handlers.compare(bench, CompareRequest([answer["key"]], ["gradcam"], "", score_threshold=0.2), ViewOptions())
    assert len(result.panes) == 1 and result.top == {}
    assert result.message.startswith(f"photo.png: {len(answer['boxes'])} boxes (")  # served from the cache
    assert handlers.caption(bench, bench.items[answer["key"]]) == answer["key"]
    assert handlers.per_class(bench, [answer["key"]], None, "", ViewOptions())[1].startswith("Every class is for classifiers")
    assert handlers.faithfulness(bench, [answer["key"]], None, "")[0] is None


def test_a_detector_that_finds_nothing_says_so_in_one_line(detector_bench, photo):
    bench = detector_bench
    with pytest.raises(ExplainkitError, match=r"^photo.png: the detector found nothing scoring >= 0.9999 ") as caught:
        handlers.explain(bench, [photo], ["gradcam"], score_threshold=0.9999)
    assert "\n" not in str(caught.value) and "--task" not in str(caught.value)
    key = next(key for key in bench.items if key.endswith("photo.png"))
    result = handlers.compare(bench, CompareRequest([key], ["gradcam"], "", score_threshold=0.9999), ViewOptions())
    assert not result.panes and result.message.startswith("**photo.png: the detector found nothing scoring >= 0.9999")
    with pytest.raises(ExplainkitError, match="a detector explains every box above score_threshold"):
        handlers.explain(bench, [photo], target="cat")
    with pytest.raises(ExplainkitError, match="score_threshold 1.5: give a probability"):
        handlers.explain(bench, [photo], score_threshold=1.5)


def test_a_segmenter_gets_its_figure_and_the_region(segmenter_bench, photo):
    bench = segmenter_bench
    assert bench.task == "segment"
    overlays, answers = handlers.explain(bench, [photo], ["gradcam", "layercam"])
    assert [caption for _, caption in overlays] == [f"photo.png: {m} @ default layer: segment" for m in ("gradcam", "layercam")]
    assert all(picture.dtype == np.uint8 and picture.std() > 0 for picture, _ in overlays)
    (answer,) = answers
    assert answer["task"] == "segment" and answer["region"] in bench.card.classes[1:] and answer["region_pixels"] > 0

    _, (road,) = handlers.explain(bench, [photo], ["gradcam"], target="road")
    assert road["region"] == "road"
    request = CompareRequest([answer["key"]], ["gradcam"], "", region="road")
    result = handlers.compare(bench, request, ViewOptions())
    assert len(result.panes) == 1 and result.message == f"photo.png: region road ({road['region_pixels']} pixels)"
    with pytest.raises(ExplainkitError, match="unknown class 'wolf': choose from background, sky, road, car"):
        handlers.explain(bench, [photo], target="wolf")


def test_classifier_benches_stay_classifiers(bench):
    assert bench.task == "classify" and bench.classifies
