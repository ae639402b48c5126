"""The explain job over a dataset and over image files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import explainkit
from explainkit.data.datasets import load_split
from explainkit.jobs.explain import ExplainOptions, explain_dataset, explain_images, pick_misclassified, pick_samples, scan
from explainkit.jobs.maps_store import load_results
from explainkit.models.card import ModelCard


def test_pick_samples_prefers_distinct_classes():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    assert pick_samples(labels, 3) == [0, 2, 4]
    assert pick_samples(labels, 4) == [0, 2, 4, 1]
    assert pick_samples(labels, 0) == []


def test_misclassified_are_spread_over_true_classes_most_confident_first():
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2])
    predictions = torch.tensor([1, 1, 1, 0, 0, 0, 0, 2, 1])  # wrong: 0, 1, 2 (class 0), 4, 5 (class 1), 6, 8 (class 2)
    confidence = torch.tensor([0.5, 0.9, 0.7, 0.99, 0.6, 0.95, 0.4, 0.3, 0.8])
    assert pick_misclassified(predictions, labels, confidence, 4) == [5, 1, 8, 4]  # 1 per class, by top mistake
    assert pick_misclassified(predictions, labels, confidence, 100) == [5, 1, 8, 4, 2, 6, 0]
    assert pick_misclassified(predictions, labels, confidence, 0) == []
    assert pick_misclassified(labels, labels, confidence, 3) == []


def test_scan_predicts_every_image_and_matches_the_model(random_model, tiny_folder):
    dataset = load_split("test", ModelCard(), tiny_folder)
    result = scan(random_model, dataset, torch.device("cpu"), batch_size=8)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    with torch.no_grad():
        expected = random_model(images).argmax(1)
    assert torch.equal(result.predictions, expected)
    assert result.labels.tolist() == [i // 2 for i in range(20)]


def test_scan_with_explainers_returns_maps_per_method(random_model, tiny_folder):
    dataset = load_split("test", ModelCard(), tiny_folder)
    explainers = {n: explainkit.get_explainer(n, random_model) for n in ("gradcam", "gradcam++")}
    result = scan(random_model, dataset, torch.device("cpu"), batch_size=8, explainers=explainers)
    assert result.maps["gradcam"].shape == (20, 32, 32)


def test_explain_dataset_writes_everything(random_model, tiny_folder, tmp_path):
    dataset = load_split("test", ModelCard(), tiny_folder)
    explainers = {n: explainkit.get_explainer(n, random_model) for n in ("gradcam", "captum-gradcam")}
    result = explain_dataset(
        random_model,
        ModelCard(),
        explainers,
        dataset,
        tmp_path,
        torch.device("cpu"),
        ExplainOptions(samples=2, misclassified=4, limit=10, batch_size=4, save_maps=True),
    )
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "confusion_matrix.png",
        "maps.zarr",
        "methods.png",
        "misclassified.png",
        "per_class.png",
        "report.html",
        "summary.json",
    ]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["schema_version"] == 1 and summary["images"] == 10
    assert summary["methods"] == ["gradcam", "captum-gradcam"] and summary["layer"] == "layer3"
    maps = explainkit.load_maps(tmp_path)
    assert list(maps) == ["gradcam", "captum-gradcam"] and maps["gradcam"].shape == (10, 32, 32)
    saved = load_results(tmp_path)
    wrong = int((saved["predictions"] != saved["labels"]).sum())
    assert summary["misclassified"] == wrong
    assert summary["accuracy"] == pytest.approx(1 - wrong / 10)
    assert result.summary == summary


def test_explain_images(random_model, tmp_path):
    images = ModelCard().preprocess(np.zeros((2, 32, 32, 3), dtype=np.uint8))
    result = explain_images(
        ModelCard(),
        {"gradcam": explainkit.get_explainer("gradcam", random_model)},
        images,
        ["a.png", "b.png"],
        tmp_path,
        torch.device("cpu"),
        ExplainOptions(save_maps=True),
    )
    assert [p["image"] for p in result.summary["predictions"]] == ["a.png", "b.png"]
    assert (tmp_path / "per_class.png").exists()
    maps = np.asarray(explainkit.load_maps(tmp_path)["gradcam"][:])
    assert maps.shape == (2, 32, 32) and maps.dtype == np.float16


def test_a_plugin_that_only_returns_maps_still_gets_probabilities(fresh_plugins, random_model, tiny_folder, tmp_path):
    def maps_only(images, targets=None, normalize=True):
        return torch.rand(len(images), *images.shape[-2:])

    class MapsOnly:
        @explainkit.hookimpl
        def register_explainers(self, register):
            register("plain", lambda model, layer=None: maps_only)

    fresh_plugins.register(MapsOnly(), name="maps-only")
    dataset = load_split("test", ModelCard(), tiny_folder)
    result = explain_dataset(
        random_model,
        ModelCard(),
        {"plain": explainkit.get_explainer("plain", random_model), "gradcam": explainkit.get_explainer("gradcam", random_model)},
        dataset,
        tmp_path,
        torch.device("cpu"),
        ExplainOptions(samples=2, misclassified=2, batch_size=8, save_maps=True),
    )
    assert result.summary["images"] == 20
    assert explainkit.load_maps(tmp_path)["plain"].shape == (20, 32, 32)


def test_saved_maps_are_the_explainers_maps_in_scan_order(random_model, tiny_folder, tmp_path):
    dataset = load_split("test", ModelCard(), tiny_folder)
    gradcam = explainkit.get_explainer("gradcam", random_model)
    explain_dataset(
        random_model,
        ModelCard(),
        {"gradcam": gradcam},
        dataset,
        tmp_path,
        torch.device("cpu"),
        ExplainOptions(samples=1, misclassified=1, batch_size=6, save_maps=True),
    )
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    expected = gradcam(images).to(torch.float16).numpy()
    np.testing.assert_allclose(np.asarray(explainkit.load_maps(tmp_path)["gradcam"][:]), expected, atol=2e-3)
    assert load_results(tmp_path)["labels"].tolist() == [i // 2 for i in range(20)]
