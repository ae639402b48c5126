"""A localisation task with ground truth: which pixels matter is known by construction.

Each 32x32 image has a background (CIFAR-10 images when given, else smooth noise), one *class
object* — a 9x9 patch whose texture decides the class — at a random position (its box is
saved), and 1-2 *distractor* patches of textures that belong to no class. Every box is 81 px,
7.9% of the image. A small CNN with three downsampling stages is trained on it; CAMs are taken at
its last conv layer and scored by the pointing game (map maximum inside the box) and the share
of map energy inside the box.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

PATCH = 9
SIZE = 32
NUM_CLASSES = 4


def _textures() -> torch.Tensor:
    """(6, 3, 9, 9) patterns in [0, 1]: 4 class textures, then 2 distractor textures."""
    y, x = torch.meshgrid(torch.arange(PATCH), torch.arange(PATCH), indexing="ij")
    patterns = [
        (y % 2 == 0),  # horizontal stripes
        (x % 2 == 0),  # vertical stripes
        ((x + y) % 2 == 0),  # checkerboard
        ((y - 4) ** 2 + (x - 4) ** 2 <= 12),  # disc
        ((x - y).abs() <= 1) | ((x + y - 8).abs() <= 1),  # cross (distractor)
        (x >= 4),  # half block (distractor)
    ]
    colours = torch.tensor([[1.0, 0.1, 0.1], [0.1, 1.0, 0.1], [0.1, 0.3, 1.0], [1.0, 1.0, 0.1], [1.0, 0.1, 1.0], [0.1, 1.0, 1.0]])
    return torch.stack([p.float()[None] * c.view(3, 1, 1) + (1 - p.float()[None]) * 0.05 for p, c in zip(patterns, colours)])


@dataclass
class SyntheticSet:
    images: torch.Tensor  # (N, 3, 32, 32) in [0, 1]
    labels: torch.Tensor  # (N,)
    boxes: torch.Tensor  # (N, 4): y0, x0, y1, x1 (exclusive) of the class object


def generate(count: int, seed: int = 0, backgrounds: torch.Tensor | None = None) -> SyntheticSet:
    """``count`` images; ``backgrounds`` (M, 3, 32, 32) in [0, 1] are used (darkened) when given."""
    generator = torch.Generator().manual_seed(seed)
    textures = _textures()
    if backgrounds is not None and len(backgrounds):
        picks = torch.randint(0, len(backgrounds), (count,), generator=generator)
        images = backgrounds[picks].clone() * 0.6
    else:
        coarse = torch.rand(count, 3, 4, 4, generator=generator)
        images = F.interpolate(coarse, size=(SIZE, SIZE), mode="bilinear", align_corners=False) * 0.6
    labels = torch.randint(0, NUM_CLASSES, (count,), generator=generator)
    boxes = torch.zeros(count, 4, dtype=torch.long)
    for i in range(count):  # generating data, not a hot path
        taken: list[tuple[int, int]] = []
        n_distractors = int(torch.randint(1, 3, (1,), generator=generator))
        kinds = [int(labels[i])] + [
            NUM_CLASSES + int(torch.randint(0, 2, (1,), generator=generator)) for _ in range(n_distractors)
        ]
        for j, kind in enumerate(kinds):
            for _ in range(50):  # rejection-sample a free spot
                y, x = (int(v) for v in torch.randint(0, SIZE - PATCH + 1, (2,), generator=generator))
                if all(abs(y - ty) >= PATCH or abs(x - tx) >= PATCH for ty, tx in taken):
                    break
            taken.append((y, x))
            images[i, :, y : y + PATCH, x : x + PATCH] = textures[kind]
            if j == 0:
                boxes[i] = torch.tensor([y, x, y + PATCH, x + PATCH])
    return SyntheticSet(images.clamp(0, 1), labels, boxes)


def small_cnn(num_classes: int = NUM_CLASSES) -> nn.Sequential:
    """Three conv blocks, each followed by a 2x downsampling (32 -> 4), then global pooling.

    The last conv layer (its ReLU, ``0.10``) sits at 8x8, before the third downsampling: a 4x4
    map quantises a 9x9 box too coarsely for the pointing game to say anything.
    """

    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    return nn.Sequential(
        nn.Sequential(*block(3, 32), nn.MaxPool2d(2), *block(32, 64), nn.MaxPool2d(2), *block(64, 128), nn.MaxPool2d(2)),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, num_classes),
    )


LAST_CONV = "0.10"  # the ReLU after the last conv of small_cnn (8x8 maps)


def train_small_cnn(
    data: SyntheticSet, epochs: int = 6, batch_size: int = 128, seed: int = 0, progress: bool = True
) -> nn.Module:
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    model = small_cnn()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = epochs * ((len(data.images) + batch_size - 1) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    bar = tqdm(total=steps, desc="synthetic: training the small CNN", disable=not progress, delay=2)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(data.images), generator=generator)
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            loss = F.cross_entropy(model(data.images[index]), data.labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.update(1)
    bar.close()
    return model.eval()


def box_masks(boxes: torch.Tensor, size: int = SIZE) -> torch.Tensor:
    """``(N, size, size)`` boolean masks of the boxes, built without a Python loop."""
    coords = torch.arange(size)
    rows = (coords[None, :] >= boxes[:, 0:1]) & (coords[None, :] < boxes[:, 2:3])
    cols = (coords[None, :] >= boxes[:, 1:2]) & (coords[None, :] < boxes[:, 3:4])
    return rows[:, :, None] & cols[:, None, :]


def pointing_game(maps: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Per image 1.0 if the map's maximum falls inside the box (ties: any maximal pixel inside counts), else 0."""
    masks = box_masks(boxes).to(maps.device)
    peak = maps.flatten(1).amax(1).view(-1, 1, 1)
    hit = ((maps >= peak) & (peak > 0) & masks).flatten(1).any(1)
    return hit.float()


def energy_in_box(maps: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Per image: share of the map's total mass inside the box (0 for an all-zero map)."""
    masks = box_masks(boxes).to(maps.device)
    total = maps.flatten(1).sum(1)
    inside = (maps * masks).flatten(1).sum(1)
    return torch.where(total > 0, inside / torch.where(total > 0, total, 1), torch.zeros_like(total))
