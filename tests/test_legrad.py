"""LeGrad: parity with torch-cam's LeGrad and with a per-block reference, every ViT family,
every target form, refusal of CNNs and the model left as found."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
import torch.nn as nn
import torchvision

from explainkit.errors import ExplainkitError
from explainkit.explainers.base import normalize_maps
from explainkit.explainers.legrad import LeGrad
from explainkit.models.attention import attention_blocks, final_head, trace_attention
from explainkit.models.outputs import logits_of
from explainkit.targets import BoundTarget, ClassDifference, Target, as_target
from tests.conftest import SHARED, correlation

timm = pytest.importorskip("timm")


def _randomize_heads(model: nn.Module) -> nn.Module:
    """torchvision zero-initialises the classifier (every logit 0, every gradient 0): random heads."""
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.out_features == 10:
            nn.init.normal_(module.weight, std=0.5)
            nn.init.normal_(module.bias)
    return model.eval()


def _torchvision_vit(layers: int = 2) -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=layers, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10
    )
    return _randomize_heads(model)


def _timm_vit(name: str = "vit_tiny_patch16_224", **options) -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(
        name, pretrained=False, img_size=32, patch_size=8, depth=2, num_heads=2, embed_dim=32, num_classes=10, **options
    )
    return _randomize_heads(model)


def _hf_vit() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        image_size=32, patch_size=8, num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64,
        num_labels=10,
    )  # fmt: skip
    return _randomize_heads(transformers.ViTForImageClassification(config))


MODELS = {
    "torchvision-vit": _torchvision_vit,
    "timm-vit": _timm_vit,
    "timm-deit-distilled": lambda: _timm_vit("deit_tiny_distilled_patch16_224"),  # class + distillation tokens
    "timm-vit-registers": lambda: _timm_vit(reg_tokens=4),  # class + 4 register tokens
    "hf-vit": _hf_vit,
}


@pytest.fixture
def vit_images() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32)


def _reference(
    model: nn.Module, images: torch.Tensor, classes: torch.Tensor, start: int = 0, summed: bool = False
) -> torch.Tensor:
    """LeGrad as written in the paper, the slow way: one forward, then per block ``l`` one backward
    of ``s_l`` (mean-pooled tokens through the final norm and head) through the whole graph to
    ``A_l``. ``summed=True`` differentiates ``Σ_k s_k`` instead, the shortcut that is *not* LeGrad
    (later blocks' scores also depend on ``A_l``), to show that the tests tell them apart."""
    head = final_head(model)
    with torch.enable_grad(), trace_attention(model, tuple(images.shape[-2:])) as trace:
        model(images)
    blocks = range(start, len(trace.block_outputs))

    def score(block: int) -> torch.Tensor:
        tokens = trace.block_outputs[block]
        return logits_of(head(tokens.mean(dim=1, keepdim=True).expand_as(tokens))).gather(1, classes[:, None]).sum()

    maps = []
    for block in blocks:
        objective = sum(score(k) for k in blocks) if summed else score(block)
        (gradient,) = torch.autograd.grad(objective, trace.probabilities[block], retain_graph=True)
        maps.append(trace.patch_map(gradient.relu().mean(dim=(1, 2))))
    return torch.stack(maps).mean(dim=0).detach()


# --- parity -------------------------------------------------------------------------------------
@pytest.mark.parametrize("start_block", [0, -1])
def test_parity_with_torchcam_legrad(start_block, vit_images):
    torchcam_methods = pytest.importorskip("torchcam.methods")
    model = _torchvision_vit(layers=3)
    explainer = LeGrad(model, start_block=start_block)
    for classes in (None, torch.tensor([3, 7, 1, 9])):
        result = explainer.explain(vit_images, classes)
        raw = explainer.compute(vit_images, as_target(result.targets)).raw  # (N, 4, 4), before upsampling
        with torchcam_methods.LeGrad(model, list(model.encoder.layers)[start_block:]) as extractor:
            theirs = extractor(result.targets.tolist(), model(vit_images))[0]
        assert theirs.shape == raw.shape
        assert correlation(raw, theirs).min() > 0.999
        torch.testing.assert_close(normalize_maps(raw), theirs, atol=1e-5, rtol=1e-4)
        assert result.targets.tolist() == model(vit_images).argmax(1).tolist() or classes is not None


def test_parity_with_torchcam_on_the_trained_vit():
    """The trained CIFAR-10 ViT of ../shared (6 blocks, 4 heads, 8x8 patches): sharper attention
    gradients than random weights, the same maps as torch-cam's."""
    torchcam_methods = pytest.importorskip("torchcam.methods")
    weights = SHARED / "models" / "vit-tiny-cifar10.pt"
    if not weights.exists():
        pytest.skip(f"trained ViT not found at {weights} (../shared absent)")
    spec = importlib.util.spec_from_file_location("vit_tiny_cifar10", SHARED / "models" / "vit_tiny_cifar10.py")
    assert spec is not None and spec.loader is not None
    architecture = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(architecture)
    model = architecture.build()
    model.load_state_dict(torch.load(weights, weights_only=True, map_location="cpu"))
    model.eval()
    images = torch.randn(4, 3, 32, 32)
    for classes in (model(images).argmax(1), torch.tensor([0, 3, 5, 8])):
        raw = LeGrad(model).compute(images, as_target(classes)).raw  # (4, 8, 8)
        with torchcam_methods.LeGrad(model, list(model.encoder.layers)) as extractor:
            theirs = extractor(classes.tolist(), model(images))[0]
        assert correlation(raw, theirs).min() > 0.999
        torch.testing.assert_close(normalize_maps(raw), theirs, atol=1e-5, rtol=1e-4)


def test_parity_fails_for_the_summed_shortcut(vit_images):
    """The reference with Σ_k s_k in place of s_l differs from torch-cam: the parity tests can fail."""
    model = _torchvision_vit(layers=3)
    classes = model(vit_images).argmax(1)
    exact, shortcut = _reference(model, vit_images, classes), _reference(model, vit_images, classes, summed=True)
    raw = LeGrad(model).compute(vit_images, as_target(classes)).raw
    torch.testing.assert_close(raw, exact, atol=1e-6, rtol=1e-4)
    assert not torch.allclose(normalize_maps(shortcut), normalize_maps(exact), atol=1e-2)


@pytest.mark.parametrize("name", ["timm-vit", "timm-deit-distilled", "timm-vit-registers", "hf-vit"])
@pytest.mark.parametrize("start_block", [0, 1])
def test_parity_with_the_per_block_reference(name, start_block, vit_images):
    model = MODELS[name]()
    classes = torch.tensor([3, 7, 1, 9])
    raw = LeGrad(model, start_block=start_block).compute(vit_images, as_target(classes)).raw
    expected = _reference(model, vit_images, classes, start=start_block)
    assert raw.shape == expected.shape == (4, 4, 4)
    assert correlation(raw, expected).min() > 0.999
    torch.testing.assert_close(raw, expected, atol=1e-6, rtol=1e-4)


# --- every ViT family, every target form ------------------------------------------------------
@pytest.mark.parametrize("name", sorted(MODELS))
def test_maps_are_finite_and_not_flat(name, vit_images):
    maps = LeGrad(MODELS[name]())(vit_images)
    assert maps.shape == (4, 32, 32) and maps.dtype == torch.float32
    assert torch.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
    assert (maps.flatten(1).std(dim=1) > 0.05).all()  # every map has structure


@pytest.mark.parametrize("name", sorted(MODELS))
def test_all_classes_are_the_single_class_maps(name, vit_images):
    explainer = LeGrad(MODELS[name]())
    every = explainer(vit_images, targets="all")
    assert every.shape == (4, 10, 32, 32)
    single = torch.stack([explainer(vit_images, targets=k) for k in range(10)], dim=1)
    torch.testing.assert_close(every, single, atol=2e-4, rtol=1e-3)
    assert not torch.allclose(every[:, 0], every[:, 1], atol=1e-2)  # classes get different maps


def test_topk_chunks_and_explicit_class_sets_are_the_single_class_maps(vit_images):
    model = _timm_vit("deit_tiny_distilled_patch16_224")
    explainer = LeGrad(model, class_chunk=2)  # 5 columns: chunks of 2, 2 and 1
    result = explainer.explain(vit_images, ("topk", 5))
    assert torch.equal(result.targets, result.logits.topk(5, dim=1).indices)
    for rank in range(5):
        torch.testing.assert_close(result.maps[:, rank], explainer(vit_images, result.targets[:, rank]), atol=2e-4, rtol=1e-3)


def test_target_objects_are_differentiated_per_block(vit_images):
    model = _timm_vit()
    explainer = LeGrad(model)
    finer = explainer(vit_images, ClassDifference(comparisons=2))
    plain = explainer(vit_images)
    assert torch.isfinite(finer).all() and (finer.flatten(1).std(dim=1) > 0.05).all()
    assert not torch.allclose(finer, plain, atol=1e-2)
    # A plain callable target: the logit of class 2 is the int target 2.
    torch.testing.assert_close(explainer(vit_images, lambda output: logits_of(output)[:, 2]), explainer(vit_images, 2))


class _Unbatched(Target):
    """Class logits through a bound target that asks for the column-by-column backward."""

    def bind(self, output):
        logits = logits_of(output).detach()
        return BoundTarget(lambda out, index: logits_of(out)[:, :3], logits=logits, batched=False)


def test_column_by_column_backward_gives_the_batched_maps(vit_images):
    explainer = LeGrad(_timm_vit(reg_tokens=4))
    torch.testing.assert_close(explainer(vit_images, _Unbatched()), explainer(vit_images, "all")[:, :3], atol=2e-4, rtol=1e-3)


def test_model_pooling_uses_the_class_token_only(vit_images):
    model = _torchvision_vit()
    mean, token = LeGrad(model)(vit_images), LeGrad(model, pooling="model")(vit_images)
    assert torch.isfinite(token).all() and (token.flatten(1).std(dim=1) > 0.05).all()
    assert not torch.allclose(mean, token, atol=1e-2)


# --- refusals -------------------------------------------------------------------------------------
def test_a_cnn_is_refused_in_one_line(random_model):
    with pytest.raises(ExplainkitError) as error:
        LeGrad(random_model)
    assert "\n" not in str(error.value)


def test_a_layer_is_ignored_like_the_other_attention_methods():
    model, images = _torchvision_vit(), torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(LeGrad(model, layer="encoder")(images), LeGrad(model)(images))
    assert LeGrad(model, layer="encoder").layer_name == "attention blocks"


@pytest.mark.parametrize(
    "options,match",
    [
        ({"start_block": 2}, "start_block"),
        ({"pooling": "max"}, "pooling"),
        ({"class_chunk": 0}, "class_chunk"),
    ],
)
def test_bad_options_are_refused(options, match):
    with pytest.raises(ExplainkitError, match=match):
        LeGrad(_torchvision_vit(), **options)


# --- the model as found -------------------------------------------------------------------------
def _hooks(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) + len(m._backward_pre_hooks)
        for m in model.modules()
    )


def _attributes(model: nn.Module) -> dict:
    """Every module's plain attributes (flags such as timm's ``fused_attn``, no ``forward`` override)."""
    plain = (bool, int, float, str, type(None), tuple)
    return {
        (name, key): value if isinstance(value, plain) else type(value).__name__
        for name, module in model.named_modules()
        for key, value in vars(module).items()
        if not key.startswith("_")
    }


@pytest.mark.parametrize("name", ["torchvision-vit", "timm-vit-registers", "hf-vit"])
def test_model_state_left_as_found_also_when_the_call_raises(name, vit_images):
    model = MODELS[name]().train()
    first, *_ = attention_blocks(model)
    first.eval()  # a mixed mode must survive
    parameters = dict(model.named_parameters())
    frozen, graded = list(parameters)[-1], list(parameters)[0]
    parameters[frozen].requires_grad_(False)
    parameters[graded].grad = torch.full_like(parameters[graded], 0.25)
    modes = {n: m.training for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    attributes = _attributes(model)
    implementation = getattr(getattr(model, "config", None), "_attn_implementation", None)  # Hugging Face
    explainer = LeGrad(model)

    def unchanged() -> None:
        assert {n: m.training for n, m in model.named_modules()} == modes
        assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
        for key, value in model.named_buffers():
            torch.testing.assert_close(value, buffers[key])
        assert torch.equal(parameters[graded].grad, torch.full_like(parameters[graded], 0.25))
        assert all(p.grad is None for n, p in model.named_parameters() if n != graded)
        assert _hooks(model) == 0 and _attributes(model) == attributes
        assert getattr(getattr(model, "config", None), "_attn_implementation", None) == implementation
        assert torch.is_grad_enabled()

    explainer(vit_images, targets="all")
    unchanged()
    with pytest.raises(ExplainkitError):
        explainer(vit_images, targets=[0, 1])  # wrong length: raises after the forward
    unchanged()
    with pytest.raises((RuntimeError, ValueError)):  # torch's and Hugging Face's channel checks
        explainer(torch.randn(2, 5, 32, 32))  # wrong channel count: raises inside the forward
    unchanged()


def test_no_grad_and_frozen_models_give_the_same_maps(vit_images):
    model = _timm_vit(reg_tokens=4)
    expected = LeGrad(model)(vit_images)
    frozen = copy.deepcopy(model).requires_grad_(False)
    with torch.no_grad():
        maps = LeGrad(frozen)(vit_images)
        assert not torch.is_grad_enabled()
    torch.testing.assert_close(maps, expected, atol=1e-5, rtol=1e-4)
