"""Token-sequence and channels-last layers: parity with pytorch-grad-cam given the right
``reshape_transform``, on small random-initialised torchvision ViT and Swin models (offline)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torchvision
from pytorch_grad_cam import GradCAM as PgcGradCAM
from pytorch_grad_cam import GradCAMPlusPlus as PgcGradCAMPlusPlus
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from explainkit.errors import LayerNotFoundError
from explainkit.explainers.gradient import GradCAM, GradCAMPlusPlus
from explainkit.models.layouts import Layout, infer_layout
from tests.conftest import correlation


def tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=4, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10
    )
    nn.init.normal_(model.heads.head.weight, std=0.5)  # torchvision zero-initialises the head: all maps flat
    return model.eval()


def tiny_swin() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=[4, 4], num_classes=10
    )
    # A head with trained-like scale: with torchvision's tiny init the gradients are ~1e-3, and
    # pytorch-grad-cam's 1e-7 in the GradCAM++ denominator then moves its maps by up to 0.1.
    nn.init.normal_(model.head.weight, std=0.5)
    return model.eval()


def tiny_deit() -> nn.Module:
    """timm's distilled DeiT: two prefix tokens (class and distillation) before the patches."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(
        "deit_tiny_distilled_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        depth=2,
        embed_dim=32,
        num_heads=2,
        num_classes=10,
    )
    assert model.num_prefix_tokens == 2
    nn.init.normal_(model.head.weight, std=0.5)
    nn.init.normal_(model.head_dist.weight, std=0.5)
    return model.eval()


def tiny_hf_vit() -> nn.Module:
    """A Hugging Face ViTForImageClassification: its forward returns an object with ``.logits``."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        image_size=32,
        patch_size=8,
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=10,
    )
    model = transformers.ViTForImageClassification(config)
    nn.init.normal_(model.classifier.weight, std=0.5)
    return model.eval()


class HFLogits(nn.Module):
    """pytorch-grad-cam needs a tensor output: the documented wrapper for Hugging Face models."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).logits


def _prefix_reshape(prefix: int):
    def reshape(tensor: torch.Tensor) -> torch.Tensor:  # pytorch-grad-cam's documented ViT recipe
        patches = tensor[:, prefix:, :]
        side = int(patches.shape[1] ** 0.5)
        return patches.reshape(tensor.shape[0], side, side, tensor.shape[2]).permute(0, 3, 1, 2)

    return reshape


_vit_reshape = _prefix_reshape(1)


def _swin_reshape(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.permute(0, 3, 1, 2)


CASES = {
    "vit": (tiny_vit, "encoder.layers.encoder_layer_1.ln_1", _vit_reshape, 32),
    "swin": (tiny_swin, "features", _swin_reshape, 64),
    "timm-deit": (tiny_deit, "blocks.1.norm1", _prefix_reshape(2), 32),
    "hf-vit": (tiny_hf_vit, None, _vit_reshape, 32),
}


def _pgc_model_and_layer(model: nn.Module, layer: str) -> tuple[nn.Module, nn.Module]:
    if hasattr(model, "config"):  # Hugging Face: pytorch-grad-cam needs tensor outputs
        return HFLogits(model), model.get_submodule(layer)
    return model, model.get_submodule(layer)


@pytest.mark.parametrize(
    "ours_class, pgc_class", [(GradCAM, PgcGradCAM), (GradCAMPlusPlus, PgcGradCAMPlusPlus)], ids=["gradcam", "gradcam++"]
)
@pytest.mark.parametrize("family", CASES)
def test_parity_with_pytorch_grad_cam_and_its_reshape_transform(family, ours_class, pgc_class):
    build, layer, reshape, size = CASES[family]
    model = build()
    images = torch.randn(4, 3, size, size)
    explainer = ours_class(model, layer)  # layer None: the model's default layer
    ours = explainer.explain(images)
    peer_model, peer_layer = _pgc_model_and_layer(model, explainer.layer_name)
    with pgc_class(model=peer_model, target_layers=[peer_layer], reshape_transform=reshape) as cam:
        reference = torch.from_numpy(cam(input_tensor=images, targets=[ClassifierOutputTarget(int(t)) for t in ours.targets]))
    informative = reference.flatten(1).std(1) > 1e-4
    assert informative.sum() >= 2
    corr = correlation(ours.maps, reference)[informative]
    assert corr.min() > 0.99, corr


@pytest.mark.parametrize("family", CASES)
def test_all_classes_equal_single_targets_on_transformers(family):
    build, layer, _, size = CASES[family]
    model = build()
    images = torch.randn(2, 3, size, size)
    explainer = GradCAM(model, layer)
    every = explainer(images, targets="all")
    for k in (0, 7):
        torch.testing.assert_close(every[:, k], explainer(images, targets=k), atol=1e-4, rtol=1e-4)


def test_prefix_tokens_never_enter_the_map():
    """Gradients on the class token alone must not change the map (it is dropped, not averaged in)."""
    layout = Layout("tokens", prefix=2, grid=(2, 3))
    tokens = torch.arange(2 * 8 * 5, dtype=torch.float32).view(2, 8, 5)
    grid = layout.to_channels_first(tokens)
    assert grid.shape == (2, 5, 2, 3)
    torch.testing.assert_close(grid[:, :, 0, 0], tokens[:, 2, :])  # first patch token
    assert layout.to_channels_first(torch.zeros(10, 2, 8, 5)).shape == (10, 2, 5, 2, 3)  # batched gradients


class Declared(nn.Module):
    """Stands in for a timm ViT: it declares its prefix tokens and patch grid."""

    num_prefix_tokens = 3

    def __init__(self) -> None:
        super().__init__()
        self.patch_embed = nn.Identity()
        self.patch_embed.grid_size = (4, 4)


def test_layouts_read_off_the_model_or_inferred():
    assert infer_layout((2, 19, 32), (32, 32), Declared(), "x") == Layout("tokens", 3, (4, 4))
    assert infer_layout((2, 65, 32), (32, 32), tiny_vit(), "x") == Layout("tokens", 1, (8, 8))  # patch_size 4
    assert infer_layout((2, 65, 32), (32, 32), nn.Module(), "x") == Layout("tokens", 1, (8, 8))  # inferred
    assert infer_layout((2, 32, 8, 4), (32, 16), nn.Module(), "x") == Layout("nchw")
    assert infer_layout((2, 7, 7, 768), (224, 224), nn.Module(), "x") == Layout("nhwc")
    assert infer_layout((2, 512, 4, 4), (32, 32), nn.Module(), "x") == Layout("nchw")


def test_a_grid_that_cannot_be_inferred_is_a_clear_error():
    with pytest.raises(LayerNotFoundError, match="17 tokens.*candidates.*layout=Layout"):
        infer_layout((2, 17, 8), (32, 32), nn.Module(), "blocks.0")  # 1 + 4x4 or 8 + 3x3
    with pytest.raises(LayerNotFoundError, match="not 3 prefix"):
        infer_layout((2, 20, 32), (32, 32), Declared(), "blocks.0")


def test_an_explicit_layout_wins():
    model = tiny_vit()
    images = torch.randn(2, 3, 32, 32)
    layer = "encoder.layers.encoder_layer_1.ln_1"
    inferred = GradCAM(model, layer)(images)
    explicit = GradCAM(model, layer, layout=Layout("tokens", 1, (8, 8)))(images)
    torch.testing.assert_close(inferred, explicit)
    shifted = GradCAM(model, layer, layout=Layout("tokens", 0, (8, 8)), autocast=None)
    with pytest.raises(RuntimeError):  # 65 tokens cannot be an 8x8 grid without the class token
        shifted(images)
