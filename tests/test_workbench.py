"""The web app's model, image pool and maps cache (:class:`~explainkit.app.workbench.Workbench`),
without any web framework."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from PIL import Image

from explainkit import figures
from explainkit.app.workbench import Target, ViewOptions, Workbench
from explainkit.data.datasets import load_split


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


def test_upload_errors_name_the_file_not_the_server_folder(random_model, tmp_path):
    from explainkit.errors import ImageReadError

    bench = Workbench(random_model, torch.device("cpu"))
    (tmp_path / "bad.jpg").write_bytes(b"nope")
    with pytest.raises(ImageReadError) as caught:
        bench.add_upload(tmp_path / "bad.jpg")
    assert "bad.jpg" in str(caught.value) and str(tmp_path) not in str(caught.value)


def test_concurrent_uploads_get_distinct_keys(random_model, tmp_path):
    bench = Workbench(random_model, torch.device("cpu"))
    path = tmp_path / "same.png"
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(path)
    threads = [threading.Thread(target=bench.add_upload, args=(path,)) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(bench.items) == [f"upload/{n}/same.png" for n in range(6)]  # none overwrote another (or its cached maps)


def test_blend_is_the_figures_overlay_as_uint8(random_model, tiny_folder):
    bench = Workbench(random_model, torch.device("cpu"))
    bench.add_dataset(load_split("test", bench.card, tiny_folder), limit=1)
    (item,) = bench.items.values()
    heat = torch.rand(32, 32)
    for opacity, colormap in ((0.5, "inferno"), (0.8, "viridis")):
        expected = figures.overlay(bench.card.denormalize(item.input[None])[0], heat, opacity, colormap)
        picture = bench.blend(item, heat, ViewOptions(opacity, colormap))
        assert picture.dtype == np.uint8 and picture.shape == (32, 32, 3)
        assert np.abs(picture / 255 - expected).max() <= 1 / 255


def test_class_index_targets(random_model, tiny_folder):
    from explainkit.errors import ExplainkitError

    bench = Workbench(random_model, torch.device("cpu"))
    bench.add_dataset(load_split("test", bench.card, tiny_folder), limit=1)
    (item,) = bench.items.values()
    assert bench.class_index(item, Target()) == [item.predicted]
    assert bench.class_index(item, Target("true")) == [item.label]
    assert bench.class_index(item, Target("all")) == list(range(10))
    assert bench.class_index(item, Target("top-k", 3)) == item.probabilities.topk(3).indices.tolist()
    assert bench.class_index(item, Target("class", class_name="dog")) == [bench.card.classes.index("dog")]
    with pytest.raises(ExplainkitError, match="unknown class 'wolf'"):
        bench.class_index(item, Target("class", class_name="wolf"))
    with pytest.raises(ExplainkitError, match="unknown target kind 'top3'"):
        Target("top3")


def test_view_options_refuse_what_cannot_be_drawn():
    from explainkit.errors import ExplainkitError

    assert ViewOptions() == ViewOptions(0.5, "inferno")
    with pytest.raises(ExplainkitError, match="opacity 1.5: give a number from 0 to 1"):
        ViewOptions(1.5)
    with pytest.raises(ExplainkitError, match="unknown colour map 'rainbow': choose from inferno, "):
        ViewOptions(colormap="rainbow")


def test_a_plain_function_plugin_gives_maps_for_several_classes_per_image(fresh_plugins, random_model, tiny_folder):
    """The registry wraps a plain-function plugin into an Explainer: the workbench asks it for ``(N, J)`` classes too."""
    import explainkit

    seen = []

    def plain(images, targets=None, normalize=True):  # one class per image, a map that names it: hot at column `class`
        seen.append(targets.tolist())
        maps = torch.zeros(len(images), *images.shape[-2:])
        maps[torch.arange(len(images)), 0, targets] = 1
        return maps

    class Plain:
        @explainkit.hookimpl
        def register_explainers(self, register):
            register("plain", lambda model, layer=None: plain)

    fresh_plugins.register(Plain(), name="plain-plugin")
    bench = Workbench(random_model, torch.device("cpu"))
    bench.add_dataset(load_split("test", bench.card, tiny_folder), limit=2)
    items = list(bench.items.values())
    maps = bench.maps(items, "plain", None, [[3, 5], [7, 1]])
    assert maps.shape == (2, 2, 32, 32)
    assert maps[:, :, 0].argmax(-1).tolist() == [[3, 5], [7, 1]]
    assert seen  # the plugin's own function made them


def test_the_upload_pool_keeps_the_most_recent_and_the_dataset(random_model, tiny_folder, tmp_path):
    bench = Workbench(random_model, torch.device("cpu"), max_uploads=3)
    bench.add_dataset(load_split("test", bench.card, tiny_folder), limit=4)
    keys = []
    for index in range(5):
        path = tmp_path / f"u{index}.png"
        Image.fromarray(np.full((32, 32, 3), 40 * index, dtype=np.uint8)).save(path)
        keys.append(bench.add_upload(path).key)
    uploads = [key for key in bench.items if key.startswith("upload/")]
    assert uploads == keys[-3:]  # the two oldest went
    assert len([key for key in bench.items if key.startswith("test/")]) == 4  # the gallery stays


def test_hostile_uploads_are_one_line_messages_without_server_paths(random_model, tmp_path):
    from explainkit.errors import ImageReadError

    bench = Workbench(random_model, torch.device("cpu"))
    animated = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (16, 16), colour) for colour in ("red", "blue")]
    frames[0].save(animated, save_all=True, append_images=frames[1:])
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    liar = tmp_path / "liar.png"
    liar.write_text("not an image at all")
    truncated = tmp_path / "cut.png"
    Image.new("RGB", (64, 64), "white").save(tmp_path / "whole.png")
    truncated.write_bytes((tmp_path / "whole.png").read_bytes()[:60])
    for path, fragment in ((animated, "multi-frame"), (empty, "cannot read"), (liar, "cannot read"), (truncated, "cannot read")):
        with pytest.raises(ImageReadError, match=fragment) as info:
            bench.add_upload(path)
        message = str(info.value)
        assert str(tmp_path) not in message and "\n" not in message and path.name in message
