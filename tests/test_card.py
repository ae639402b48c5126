"""Model cards: reading, validation and preprocessing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from explainkit.errors import CheckpointError
from explainkit.models.card import ModelCard


def test_round_trip_keeps_extra_fields(tmp_path):
    card = ModelCard(test_accuracy=0.9, epochs=20, extra={"recipe": {"optimizer": "adam"}})
    path = tmp_path / "m.json"
    path.write_text(json.dumps(card.to_dict()))
    again = ModelCard.read(path)
    assert again == card and again.to_dict()["recipe"] == {"optimizer": "adam"}


@pytest.mark.parametrize(
    "content", ["{not json", "[1, 2]", json.dumps({"num_classes": 3}), json.dumps({"bogus": 1, "mean": [0.5]})]
)
def test_invalid_cards_raise_checkpoint_error(tmp_path, content):
    path = tmp_path / "m.json"
    path.write_text(content)
    with pytest.raises(CheckpointError, match="m.json"):
        ModelCard.read(path)


def test_preprocess_pil_and_arrays_agree():
    card = ModelCard()
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    from_pil = card.preprocess(Image.fromarray(pixels))
    from_array = card.preprocess(pixels)
    from_batch = card.preprocess(np.stack([pixels, pixels]))
    assert from_pil.shape == (1, 3, 32, 32) and from_batch.shape == (2, 3, 32, 32)
    torch.testing.assert_close(from_pil, from_array)
    expected = (torch.from_numpy(pixels).permute(2, 0, 1).float() / 255 - torch.tensor(card.mean).view(3, 1, 1)) / torch.tensor(
        card.std
    ).view(3, 1, 1)
    torch.testing.assert_close(from_array[0], expected)
    torch.testing.assert_close(card.denormalize(from_array)[0], torch.from_numpy(pixels).permute(2, 0, 1).float() / 255)


def test_preprocess_resizes_and_converts_grayscale():
    card = ModelCard()
    batch = card.preprocess([np.zeros((100, 80), dtype=np.uint8), Image.new("RGBA", (7, 9))])
    assert batch.shape == (2, 3, 32, 32)
