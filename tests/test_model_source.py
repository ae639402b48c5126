"""``--model SPEC`` end to end through the CLI, one per kind, and every way it can be wrong
(one line, exit 2, nothing written)."""

from __future__ import annotations

import json
import urllib.error

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision
from PIL import Image

from explainkit.cli import main
from explainkit.models.card import CIFAR10_CLASSES
from tests.conftest import save_tiny_hf_vit


class SmallNet(nn.Module):
    """A user's own network, as in a course notebook."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def build_small() -> nn.Module:
    torch.manual_seed(0)
    return SmallNet()


@pytest.fixture(scope="module")
def odd_images(tmp_path_factory):
    """A wide RGB PNG, a tall greyscale JPEG and an RGBA PNG."""
    root = tmp_path_factory.mktemp("odd")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (90, 300, 3), dtype=np.uint8)).save(root / "wide.png")
    Image.fromarray(rng.integers(0, 256, (120, 40), dtype=np.uint8)).save(root / "tall.jpg")
    Image.fromarray(rng.integers(0, 256, (50, 50, 4), dtype=np.uint8)).save(root / "alpha.png")
    return [str(root / name) for name in ("wide.png", "tall.jpg", "alpha.png")]


def _explain(capsys, tmp_path, *flags):
    out = tmp_path / "out"
    code = main(["explain", *flags, "--out", str(out)])
    captured = capsys.readouterr()
    return code, out, captured.err


def _assert_clean_failure(code, err, out, *fragments):
    lines = [line for line in err.strip().splitlines() if ": error:" in line]  # other lines: what was loaded
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not out.exists()


def test_torchvision_model_with_local_weights_and_classes(capsys, tmp_path, odd_images):
    torch.manual_seed(0)
    torch.save(torchvision.models.mobilenet_v3_small(num_classes=3).state_dict(), tmp_path / "mnv3.pt")
    (tmp_path / "classes.txt").write_text("cat\ndog\nbird\n")
    code, out, err = _explain(
        capsys, tmp_path, "--model", "torchvision:mobilenet_v3_small", "--weights", str(tmp_path / "mnv3.pt"),
        "--classes", str(tmp_path / "classes.txt"), "--image", *odd_images, "--methods", "gradcam,layercam",
    )  # fmt: skip
    assert code == 0, err
    assert "layer features" in err and "resize 256 + centre crop 224x224" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == "torchvision:mobilenet_v3_small" and summary["layer"] == "features"
    assert {p["predicted"] for p in summary["predictions"]} <= {"cat", "dog", "bird"}
    assert (out / "per_class.png").is_file() and (out / "methods.png").is_file()


def test_thousand_class_model_shows_the_top_k_classes(capsys, tmp_path, odd_images):
    code, out, err = _explain(
        capsys, tmp_path, "--model", "torchvision:resnet18", "--image", odd_images[0], "--targets", "topk:3"
    )
    assert code == 0, err
    with Image.open(out / "per_class.png") as figure:
        assert figure.width < 1200  # 1 image + 3 maps, not 1000 columns


def test_timm_vit_over_an_image_folder(capsys, tmp_path, tiny_folder):
    timm = pytest.importorskip("timm")
    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10)
    torch.save(net.state_dict(), tmp_path / "vit.pt")
    (tmp_path / "classes.txt").write_text("\n".join(CIFAR10_CLASSES))
    code, out, err = _explain(
        capsys, tmp_path, "--model", "timm:vit_tiny_patch16_224", "--weights", str(tmp_path / "vit.pt"),
        "--classes", str(tmp_path / "classes.txt"), "--data-dir", str(tiny_folder),
        "--samples", "2", "--misclassified", "2",
    )  # fmt: skip
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 20 and summary["layer"] == "blocks.11.norm1"


def test_hugging_face_directory(capsys, tmp_path, odd_images):
    save_tiny_hf_vit(tmp_path / "vit", {"size": {"height": 32, "width": 32}})
    code, out, err = _explain(capsys, tmp_path, "--model", f"hf:{tmp_path / 'vit'}", "--image", *odd_images)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["layer"] == "vit.layers.0.layernorm_before" or summary["layer"].endswith("layernorm_before")
    assert {p["predicted"] for p in summary["predictions"]} <= {"cat", "dog"}


def test_the_users_own_module(capsys, tmp_path, odd_images):
    torch.save(build_small().state_dict(), tmp_path / "small.pt")
    code, out, err = _explain(
        capsys, tmp_path, "--model", f"{__name__}:build_small", "--weights", str(tmp_path / "small.pt"),
        "--image-size", "48", "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25", "--image", *odd_images,
    )  # fmt: skip
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["layer"] == "features"
    assert {p["predicted"] for p in summary["predictions"]} <= {"class_0", "class_1", "class_2"}


def test_wrong_specs_are_one_line_exit_2_and_nothing_written(capsys, tmp_path, odd_images, monkeypatch):
    image = ["--image", odd_images[0]]
    torch.save(torchvision.models.resnet18(num_classes=4).state_dict(), tmp_path / "r18.pt")
    cases = [
        (["--model", "torchvision:resnet5000"], "torchvision has no classification model"),
        (["--model", "no_such_module_xyz:build"], "cannot import 'no_such_module_xyz'"),
        (["--model", "torchvision:resnet50", "--weights", str(tmp_path / "r18.pt")], "do not fit torchvision:resnet50"),
        (["--model", "torchvision:resnet18", "--weights", str(tmp_path / "nope.pt")], "no such file"),
        (["--model", "resnet18"], "expected torchvision:NAME"),
        (["--weights", str(tmp_path / "r18.pt")], "refine --model SPEC"),
        (["--model", "torchvision:resnet18", "--checkpoint", str(tmp_path / "r18.pt")], "pass one"),
    ]
    for flags, fragment in cases:
        code, out, err = _explain(capsys, tmp_path, *flags, *image)
        _assert_clean_failure(code, err, out, fragment)

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    code, out, err = _explain(capsys, tmp_path, "--model", "torchvision:resnet18", "--weights", "DEFAULT", *image)
    _assert_clean_failure(code, err, out, "cannot fetch the pretrained weights", "--weights PATH")


def test_data_whose_classes_the_model_does_not_have(capsys, tmp_path, tiny_folder):
    code, out, err = _explain(capsys, tmp_path, "--model", "torchvision:resnet18", "--data-dir", str(tiny_folder))
    _assert_clean_failure(code, err, out, "are not classes of the model")


def test_evaluate_a_hugging_face_model_whose_forward_returns_an_object(capsys, tmp_path):
    """Every metric (ROAD through pytorch-grad-cam included) reads the logits out of ``.logits``."""
    save_tiny_hf_vit(tmp_path / "vit")
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (tmp_path / "data" / "test" / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(
                tmp_path / "data" / "test" / name / f"{i}.png"
            )
    code = main(
        ["evaluate", "--model", f"hf:{tmp_path / 'vit'}", "--data-dir", str(tmp_path / "data"), "--methods", "gradcam",
         "--limit", "6", "--steps", "4", "--skip", "sanity", "--out", str(tmp_path / "eval")]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["meta"]["model"].startswith("hf:") and 0 <= metrics["gradcam"]["deletion_auc"] <= 1
    assert "road_morf" in metrics["gradcam"]
