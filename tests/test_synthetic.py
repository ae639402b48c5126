"""The ground-truth localisation benchmark."""

from __future__ import annotations

import torch

import explainkit
from explainkit.evaluation import run, synthetic


def test_generated_images_follow_the_spec():
    data = synthetic.generate(200, seed=0)
    assert data.images.shape == (200, 3, 32, 32) and 0 <= data.images.min() and data.images.max() <= 1
    areas = (data.boxes[:, 2] - data.boxes[:, 0]) * (data.boxes[:, 3] - data.boxes[:, 1])
    assert (areas <= 0.1 * 32 * 32).all()
    assert set(data.labels.tolist()) == set(range(synthetic.NUM_CLASSES))
    again = synthetic.generate(200, seed=0)
    assert torch.equal(again.images, data.images)


def test_pointing_game_and_energy_on_hand_made_maps():
    boxes = torch.tensor([[0, 0, 8, 8], [10, 10, 20, 20]])
    inside = synthetic.box_masks(boxes).float()
    assert synthetic.pointing_game(inside, boxes).tolist() == [1.0, 1.0]
    assert synthetic.pointing_game(1 - inside, boxes).tolist() == [0.0, 0.0]
    assert synthetic.energy_in_box(inside, boxes).tolist() == [1.0, 1.0]
    assert synthetic.energy_in_box(torch.zeros(2, 32, 32), boxes).tolist() == [0.0, 0.0]
    uniform = synthetic.energy_in_box(torch.ones(2, 32, 32), boxes)
    assert torch.allclose(uniform, torch.tensor([64 / 1024, 100 / 1024]))


def test_small_cnn_has_three_downsamplings():
    model = synthetic.small_cnn()
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in model.modules()) == 3
    assert model[0](torch.zeros(1, 3, 32, 32)).shape[-2:] == (4, 4)
    assert model[0][: int(synthetic.LAST_CONV.split(".")[1]) + 1](torch.zeros(1, 3, 32, 32)).shape[-2:] == (8, 8)
    assert isinstance(synthetic.small_cnn().get_submodule(synthetic.LAST_CONV), torch.nn.ReLU)


def test_gradcam_finds_the_class_object():
    factories = {"gradcam": lambda m: explainkit.get_explainer("gradcam", m, layer=synthetic.LAST_CONV)}
    results, _, _ = run.evaluate_synthetic(factories, train_count=4000, test_count=300, epochs=5)
    assert results["meta"]["test_accuracy"] > 0.9
    assert results["gradcam"]["pointing_game"] >= 0.9
    assert results["baseline:random"]["pointing_game"] <= 0.3
    assert results["gradcam"]["energy_in_box"] > results["baseline:center"]["energy_in_box"]
