"""Targets beyond a class: parity with pytorch-grad-cam's targets of the same meaning on small
random-weight torchvision models (a segmenter, a detector, a multi-label head, an embedding
model, Finer-CAM's class difference), and the rules each target follows on hand-made outputs."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
from pytorch_grad_cam import AblationCAM as PgcAblationCAM
from pytorch_grad_cam import FinerCAM as PgcFinerCAM
from pytorch_grad_cam import GradCAM as PgcGradCAM
from pytorch_grad_cam import ScoreCAM as PgcScoreCAM
from pytorch_grad_cam.utils.model_targets import (
    ClassifierOutputTarget,
    FasterRCNNBoxScoreTarget,
    FinerWeightedTarget,
    SemanticSegmentationTarget,
)

from explainkit.errors import ExplainkitError
from explainkit.registry import get_explainer
from explainkit.targets import (
    ClassDifference,
    ClassScores,
    DetectionBoxes,
    MultiLabel,
    SegmentationRegion,
    Similarity,
    as_target,
    embed,
)
from tests import task_models
from tests.conftest import correlation

PGC = {"gradcam": PgcGradCAM, "scorecam": PgcScoreCAM, "ablationcam": PgcAblationCAM}


class SimilarityToConceptTarget:
    """pytorch-grad-cam's similarity target (from its "Pixel Attribution for embeddings" tutorial)."""

    def __init__(self, features: torch.Tensor) -> None:
        self.features = features

    def __call__(self, model_output: torch.Tensor) -> torch.Tensor:
        return torch.nn.CosineSimilarity(dim=0)(model_output, self.features)


class OutWrapper(nn.Module):
    """pytorch-grad-cam's ``SegmentationModelOutputWrapper``: the ``"out"`` tensor of the dict."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)["out"]


def _pgc(method: str, model: nn.Module, layer: nn.Module, images: torch.Tensor, targets: list) -> torch.Tensor:
    with warnings.catch_warnings(), PGC[method](model=model, target_layers=[layer]) as cam:
        warnings.simplefilter("ignore")
        return torch.from_numpy(cam(input_tensor=images, targets=targets))


def _assert_close(ours: torch.Tensor, reference: torch.Tensor) -> None:
    informative = reference.flatten(1).std(1) > 1e-4
    assert informative.any(), "the reference maps are flat: the test model is degenerate"
    corr = correlation(ours[informative], reference[informative])
    assert corr.min() > 0.99, corr


@pytest.fixture(scope="module")
def segmenter() -> nn.Module:
    return task_models.segmenter()


@pytest.fixture(scope="module")
def detector() -> nn.Module:
    return task_models.detector()


@pytest.fixture(scope="module")
def tagger() -> nn.Module:
    return task_models.tagger()


@pytest.fixture(scope="module")
def embedder() -> nn.Module:
    return task_models.embedder()


@pytest.fixture(scope="module")
def pictures() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(2, 3, 64, 64)


# --- parity with pytorch-grad-cam ---------------------------------------------------------------


@pytest.mark.parametrize("method", ["gradcam", "scorecam"])
def test_segmentation_region_matches_semantic_segmentation_target(method, segmenter, pictures):
    layer = "backbone.4"  # 40 channels: Score-CAM's masked forwards stay cheap
    with torch.no_grad():
        predicted = segmenter(pictures)["out"].argmax(dim=1)
    category = int(predicted.flatten().mode().values)
    ours = get_explainer(method, segmenter, layer=layer).explain(pictures, SegmentationRegion(category))
    masks = (predicted == category).float().numpy()
    wrapped = OutWrapper(segmenter)
    reference = _pgc(
        method, wrapped, wrapped.model.get_submodule(layer), pictures, [SemanticSegmentationTarget(category, m) for m in masks]
    )
    _assert_close(ours.maps, reference)
    assert torch.equal(ours.target.details["mask"], torch.from_numpy(masks).bool())


def test_detection_boxes_match_faster_rcnn_box_score_target_per_box(detector, pictures):
    image = pictures[:1]
    target = DetectionBoxes(score_threshold=0.05, max_boxes=3)
    ours = get_explainer("gradcam", detector, layer="backbone.body.16").explain(image, target)
    details = ours.target.details
    assert ours.maps.shape == (1, details["boxes"].shape[1], 64, 64) and bool(ours.valid.all())
    layer = detector.get_submodule("backbone.body.16")
    for j, (box, label) in enumerate(zip(details["boxes"][0], details["labels"][0])):
        reference = _pgc("gradcam", detector, layer, image, [FasterRCNNBoxScoreTarget([int(label)], [box.numpy()])])
        _assert_close(ours.maps[:, j], reference)


def test_multilabel_columns_match_one_classifier_target_per_label(tagger, pictures):
    target = MultiLabel(threshold=0.5)
    ours = get_explainer("gradcam", tagger, layer="layer4").explain(pictures, target)
    labels, valid = ours.targets, ours.valid
    assert labels.shape == valid.shape == ours.maps.shape[:2]
    probabilities = ours.logits.sigmoid().gather(1, labels)
    assert bool((probabilities[valid] > 0.5).all())
    assert int(valid.sum()) == int((ours.logits.sigmoid() > 0.5).sum())  # every label above, none twice
    assert bool((ours.maps[~valid] == 0).all())  # padding columns are zero maps
    for j in range(labels.shape[1]):
        reference = _pgc("gradcam", tagger, tagger.layer4, pictures, [ClassifierOutputTarget(int(k)) for k in labels[:, j]])
        for n in range(len(pictures)):
            if valid[n, j]:
                _assert_close(ours.maps[n : n + 1, j], reference[n : n + 1])


# Ablation-CAM here rather than on the segmenter: its MobileNet blocks end without a ReLU, so the
# ablated channel is filled with min - 1e7 (pytorch-grad-cam's rule) and both libraries' scores
# become float32 noise of 1e9-scale values; ResNet's post-ReLU layers ablate to 0.
@pytest.mark.parametrize("method", ["gradcam", "scorecam", "ablationcam"])
def test_similarity_matches_similarity_to_concept_target(method, embedder, pictures):
    torch.manual_seed(2)
    reference_embedding = embed(embedder, torch.rand(1, 3, 64, 64))[0]
    layer = "layer3" if method == "gradcam" else "layer2"
    ours = get_explainer(method, embedder, layer=layer).explain(pictures, Similarity(reference_embedding))
    reference = _pgc(
        method,
        embedder,
        embedder.get_submodule(layer),
        pictures,
        [SimilarityToConceptTarget(reference_embedding)] * len(pictures),
    )
    _assert_close(ours.maps, reference)
    expected = torch.nn.functional.cosine_similarity(embed(embedder, pictures), reference_embedding[None])
    assert torch.allclose(ours.scores, expected, atol=1e-5)


def test_class_difference_matches_finer_cam(tagger, pictures):
    ours = get_explainer("gradcam", tagger, layer="layer4").explain(pictures, ClassDifference(comparisons=3, alpha=1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cam = PgcFinerCAM(tagger, [tagger.layer4])
        reference = torch.from_numpy(cam(input_tensor=pictures, alpha=1.0))
        cam.base_cam.activations_and_grads.release()
    _assert_close(ours.maps, reference)


# --- the targets' own rules ---------------------------------------------------------------------


def test_class_difference_is_finer_weighted_target_on_hand_logits():
    logits = torch.tensor([[2.0, 1.5, -1.0, 1.9, 0.0]])
    bound = ClassDifference(comparisons=2, alpha=0.5).bind(logits)
    assert bound.details["comparisons"].tolist() == [[3, 1]]  # nearest to the predicted logit 2.0
    expected = FinerWeightedTarget(0, [3, 1], 0.5)(logits[0])
    assert torch.allclose(bound(logits), expected[None])


def _detections(boxes, labels, scores):
    return {"boxes": torch.tensor(boxes, dtype=torch.float), "labels": torch.tensor(labels), "scores": torch.tensor(scores)}


def test_detection_boxes_keep_matched_same_label_boxes_and_pad():
    reference = [
        _detections([[0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 5, 5]], [1, 2, 1], [0.9, 0.8, 0.1]),
        _detections([[5, 5, 15, 15]], [3], [0.7]),
    ]
    bound = DetectionBoxes(score_threshold=0.5).bind(reference)
    assert bound.valid.tolist() == [[True, True], [True, False]]
    assert bound.details["labels"].tolist() == [[1, 2], [3, -1]]
    perturbed = [
        _detections([[0, 0, 10, 12], [20, 20, 30, 30]], [1, 4], [0.6, 0.9]),  # box 1 moved, box 2 relabelled
        _detections([], [], []),  # nothing detected
    ]
    scores = bound(perturbed)
    assert torch.allclose(scores[0], torch.tensor([100 / 120 + 0.6, 0.0]))
    assert scores[1].tolist() == [0.0, 0.0]
    assert bound(perturbed[1:], torch.tensor([1])).shape == (1, 2)  # rows from image 1 only


def test_detection_that_finds_nothing_says_so():
    empty = [_detections([[0, 0, 4, 4]], [1], [0.2])]
    with pytest.raises(ExplainkitError, match="found nothing scoring >= 0.5.*best scores 0.200"):
        DetectionBoxes(score_threshold=0.5).bind(empty)


def test_multilabel_chosen_labels_and_nothing_above_threshold():
    logits = torch.tensor([[3.0, -3.0, 0.5], [-2.0, 2.0, -4.0]])
    assert MultiLabel(labels=[2, 0]).bind(logits).classes.tolist() == [[2, 0], [2, 0]]
    bound = MultiLabel(threshold=0.6).bind(logits)
    assert bound.classes.tolist() == [[0, 2], [1, 0]] and bound.valid.tolist() == [[True, True], [True, False]]
    with pytest.raises(ExplainkitError, match="no label has a sigmoid probability above 0.99"):
        MultiLabel(threshold=0.99).bind(logits)


def test_segmentation_region_with_a_given_mask_and_an_empty_region(segmenter, pictures):
    with torch.no_grad():
        output = segmenter(pictures)
    mask = torch.zeros(64, 64, dtype=torch.bool)
    mask[:8, :8] = True
    bound = SegmentationRegion(0, mask).bind(output)
    assert torch.allclose(bound(output), output["out"][:, 0, :8, :8].sum(dim=(1, 2)))
    absent = int(output["out"].argmax(dim=1).flatten().bincount(minlength=4).argmin())
    result = get_explainer("gradcam", segmenter, layer="backbone.4").explain(pictures, SegmentationRegion(absent))
    empty = ~result.valid[:, 0]
    assert bool((result.maps[empty] == 0).all())


@pytest.mark.parametrize(
    "target, words",
    [
        (DetectionBoxes(), "needs a list of {'boxes', 'labels', 'scores'} dicts.*returns a \\(2, 6\\) tensor"),
        (SegmentationRegion(1), "needs \\(N, classes, H, W\\) scores, but the model returns a \\(2, 6\\) tensor"),
    ],
)
def test_a_target_that_does_not_fit_the_output_says_what_the_output_is(target, words, tagger, pictures):
    with pytest.raises(ExplainkitError, match=words):
        get_explainer("gradcam", tagger, layer="layer4").explain(pictures, target)


def test_similarity_refuses_a_classifier_output_of_another_width(embedder, pictures):
    with pytest.raises(ExplainkitError, match="the reference has 7 dimensions, the model's embeddings 512"):
        get_explainer("gradcam", embedder, layer="layer4").explain(pictures, Similarity(torch.ones(7)))


def test_a_plain_callable_is_a_target_and_may_take_index(tagger, pictures):
    pictures = pictures[:1]
    explainer = get_explainer("scorecam", tagger, layer="layer3", batch_size=256)  # 256 channels: one chunk
    plain = explainer.explain(pictures, lambda output: output[:, 2] - output[:, 1])
    seen: list[torch.Tensor | None] = []

    def indexed(output, index=None):
        seen.append(index)
        return output[:, 2] - output[:, 1]

    assert torch.allclose(explainer.explain(pictures, indexed).maps, plain.maps)
    assert seen[0] is None and any(i is not None and len(i) == 256 for i in seen)  # perturbed rows carry their image
    gradcam = get_explainer("gradcam", tagger, layer="layer4")
    difference = gradcam.explain(pictures, lambda output: output[:, 2] - output[:, 1]).maps
    assert not torch.allclose(difference, gradcam(pictures, 2))


def test_class_forms_become_class_scores_and_others_pass_through():
    assert isinstance(as_target(None), ClassScores) and isinstance(as_target("topk:3"), ClassScores)
    region = SegmentationRegion(1)
    assert as_target(region) is region


def test_class_only_methods_refuse_other_targets(tagger, pictures):
    from explainkit.evaluation.baselines import make_baseline

    with pytest.raises(ExplainkitError, match="explains class scores only"):
        make_baseline("center", tagger, "layer4").explain(pictures, MultiLabel())


def test_detector_left_as_found(detector, pictures):
    for parameter in detector.parameters():
        parameter.grad = None  # pytorch-grad-cam's backward in an earlier test filled them
    detector.train()
    before = {name: p.requires_grad for name, p in detector.named_parameters()}
    get_explainer("gradcam", detector, layer="backbone.body.16").explain(pictures[:1], DetectionBoxes(score_threshold=0.05))
    assert detector.training
    assert all(p.grad is None for p in detector.parameters())
    assert before == {name: p.requires_grad for name, p in detector.named_parameters()}
    assert not any(m._forward_hooks for m in detector.modules())
    detector.eval()


def test_mask_from_numpy_is_accepted(segmenter, pictures):
    mask = np.zeros((64, 64), dtype=bool)
    mask[10:20, 10:20] = True
    with torch.no_grad():
        output = segmenter(pictures)
    assert SegmentationRegion(2, torch.from_numpy(mask)).bind(output)(output).shape == (2,)


def test_own_target_example_in_the_docs_runs(segmenter, pictures):
    import re
    from pathlib import Path

    page = (Path(__file__).parents[1] / "docs" / "tasks.md").read_text()
    code = re.search(r"<!-- own-target-example -->\s*```python\n(.*?)```", page, re.S).group(1)
    names = {"segmenter": segmenter, "images": pictures}
    exec(compile(code, "docs/tasks.md:own-target-example", "exec"), names)
    assert names["peak"].maps.shape == names["region"].maps.shape == (2, 64, 64)
    with torch.no_grad():
        out = segmenter(pictures)["out"]
    assert torch.allclose(names["region"].scores, out[:, 2, 16:48, 16:48].sum(dim=(1, 2)), rtol=1e-4)
