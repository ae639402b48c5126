"""explainkit.explainers.attention: attention rollout and Chefer et al. 2021, checked against the
formulas written out with explicit loops on a 1-image batch, on every ViT family, and for the
explainer contract (targets, model state, refusals)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from explainkit.errors import ExplainkitError
from explainkit.explainers.attention import AttentionRollout, CheferRelevance, rollout
from explainkit.models.attention import trace_attention
from explainkit.targets import as_target
from tests.test_attention_capture import (
    FAMILIES,
    _hooks,
    _switches,
    hf_vit,
    timm_deit_distilled,
    timm_mean_pooled,
    timm_registers,
    torchvision_vit,
)

METHODS = {"rollout": AttentionRollout, "chefer2021": CheferRelevance}


def reference_forward(model: nn.Module, image: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A torchvision ViT written out by hand: the logits and each block's (1, heads, T, T) attention."""
    x = model._process_input(image)
    x = torch.cat([model.class_token.expand(x.shape[0], -1, -1), x], dim=1) + model.encoder.pos_embedding
    attentions = []
    for block in model.encoder.layers:
        mha = block.self_attention
        heads = mha.num_heads
        q, k, v = F.linear(block.ln_1(x), mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))
        a = torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1)
        attentions.append(a)
        x = x + mha.out_proj((a @ v).transpose(1, 2).flatten(2))
        x = x + block.mlp(block.ln_2(x))
    return model.heads(model.encoder.ln(x)[:, 0]), attentions


def test_chefer_equals_the_formula_written_out_block_by_block():
    model = torchvision_vit()
    image = torch.randn(1, 3, 32, 32)
    for klass in (2, 7):
        logits, attentions = reference_forward(model, image)
        gradients = torch.autograd.grad(logits[0, klass], attentions)
        tokens, heads = attentions[0].shape[-1], attentions[0].shape[1]
        relevance = torch.eye(tokens)
        for a, g in zip(attentions, gradients):  # rule 5: mean over heads of (grad * A)^+; rule 6: R += A_bar R
            a_bar = torch.zeros(tokens, tokens)
            for h in range(heads):
                a_bar += torch.clamp(g[0, h] * a[0, h], min=0)
            relevance = relevance + (a_bar / heads) @ relevance
        expected = relevance[0, 1:].reshape(4, 4)
        raw = CheferRelevance(model).compute(image, as_target(klass)).raw
        torch.testing.assert_close(raw[0], expected.detach(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("head_fusion", "discard_ratio"), [("mean", 0.0), ("max", 0.0), ("min", 0.5), ("mean", 0.9)])
def test_rollout_equals_the_formula_written_out_block_by_block(head_fusion, discard_ratio):
    model = torchvision_vit()
    image = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        _, attentions = reference_forward(model, image)
    tokens, heads = attentions[0].shape[-1], attentions[0].shape[1]
    relevance = torch.eye(tokens)
    for a in attentions:
        fused = torch.zeros(tokens, tokens)
        for i in range(tokens):
            for j in range(tokens):
                values = [float(a[0, h, i, j]) for h in range(heads)]
                fused[i, j] = {"mean": sum(values) / heads, "max": max(values), "min": min(values)}[head_fusion]
        flat = fused.flatten()
        for index in flat.argsort()[: int(tokens * tokens * discard_ratio)].tolist():
            if index != 0:  # the class token's attention to itself is kept
                flat[index] = 0.0
        fused = flat.view(tokens, tokens)
        residual = 0.5 * fused + 0.5 * torch.eye(tokens)
        for i in range(tokens):
            residual[i] = residual[i] / residual[i].sum()
        relevance = residual @ relevance
    expected = relevance[0, 1:].reshape(4, 4)
    explainer = AttentionRollout(model, head_fusion=head_fusion, discard_ratio=discard_ratio)
    raw = explainer.compute(image, as_target(None)).raw
    torch.testing.assert_close(raw[0], expected, atol=1e-5, rtol=1e-4)


VIEWED = ["torchvision", "timm-deit-distilled", "timm-registers", "timm-mean-pooled", "hf-vit", "hf-deit-teacher"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", VIEWED)
def test_maps_are_finite_and_not_flat_on_every_family(method, family):
    model = FAMILIES[family][0]()
    images = torch.randn(2, 3, 32, 32)
    result = METHODS[method](model).explain(images, normalize=False)
    assert result.maps.shape == (2, 32, 32) and torch.isfinite(result.maps).all()
    assert (result.maps.flatten(1).std(dim=1) > 0).all(), f"{method} on {family} gives a flat map"
    assert result.logits.shape == (2, 10)


def test_mean_pooled_models_read_the_mean_of_the_patch_rows():
    model = timm_mean_pooled()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), trace_attention(model, (32, 32)) as trace:
        model(images)
    expected = rollout(trace.probabilities).mean(dim=1).view(2, 4, 4)  # no class token: every row is a patch
    torch.testing.assert_close(AttentionRollout(model).compute(images, as_target(None)).raw, expected)


def test_distilled_deit_reads_the_class_and_distillation_rows_over_patches_only():
    model = timm_deit_distilled()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), trace_attention(model, (32, 32)) as trace:
        model(images)
    relevance = rollout(trace.probabilities)
    expected = relevance[:, 0:2, 2:].mean(dim=1).view(2, 4, 4)
    torch.testing.assert_close(AttentionRollout(model).compute(images, as_target(None)).raw, expected)


@pytest.mark.parametrize("build", [torchvision_vit, timm_registers, hf_vit])
def test_chefer_all_classes_and_topk_equal_single_class_calls(build):
    model = build()
    explainer = CheferRelevance(model, class_chunk=4)  # 10 classes: three chunks, the last one short
    images = torch.randn(2, 3, 32, 32)
    every = explainer(images, targets="all")
    assert every.shape == (2, 10, 32, 32)
    for klass in range(10):
        torch.testing.assert_close(every[:, klass], explainer(images, targets=klass), atol=1e-5, rtol=1e-4)
    top = explainer.explain(images, ("topk", 3))
    for rank in range(3):
        torch.testing.assert_close(top.maps[:, rank], explainer(images, targets=top.targets[:, rank]), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(every[:, 0], every[:, 1])  # class-specific


def test_rollout_is_class_agnostic():
    model = torchvision_vit()
    explainer = AttentionRollout(model)
    images = torch.randn(2, 3, 32, 32)
    every = explainer(images, targets="all")
    single = explainer(images, targets=3)
    assert every.shape == (2, 10, 32, 32)
    for klass in range(10):
        assert torch.equal(every[:, klass], single)


@pytest.mark.parametrize("method", METHODS)
def test_a_cnn_is_refused_in_one_line(method):
    import torchvision

    model = torchvision.models.resnet18(num_classes=10).eval()
    explainer = METHODS[method](model)
    with pytest.raises(ExplainkitError) as error:
        explainer(torch.randn(1, 3, 32, 32))
    assert str(error.value) == f"{method} needs a vision transformer with attention blocks; ResNet has none"
    assert _hooks(model) == 0


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", ["torchvision", "timm-registers", "hf-vit"])
def test_model_state_left_as_found_also_when_the_call_raises(method, family):
    model = FAMILIES[family][0]().train()  # training mode, to see it restored
    first, *rest = list(model.children())
    first.eval()  # a mixed mode must survive too
    parameters = dict(model.named_parameters())
    name, param = next(iter(parameters.items()))
    param.grad = torch.full_like(param, 0.25)
    list(parameters.values())[-1].requires_grad_(False)
    modes = {n: m.training for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    switches = _switches(model)

    METHODS[method](model)(torch.randn(2, 3, 32, 32), targets="all")
    with pytest.raises((RuntimeError, ValueError)):
        METHODS[method](model)(torch.randn(2, 5, 32, 32))  # wrong channel count fails inside the model

    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    for key, value in model.named_buffers():
        torch.testing.assert_close(value, buffers[key], msg=key)
    assert torch.equal(param.grad, torch.full_like(param, 0.25))
    assert all(p.grad is None for n, p in model.named_parameters() if n != name)
    assert _hooks(model) == 0 and _switches(model) == switches


def test_chefer_works_under_no_grad_and_on_a_frozen_model():
    model = torchvision_vit()
    images = torch.randn(2, 3, 32, 32)
    expected = CheferRelevance(model)(images)
    frozen = copy.deepcopy(model).requires_grad_(False)
    with torch.no_grad():
        maps = CheferRelevance(frozen)(images)
        assert not torch.is_grad_enabled()
    torch.testing.assert_close(maps, expected)


def test_bad_options_are_one_line_errors():
    model = torchvision_vit()
    with pytest.raises(ExplainkitError, match="head_fusion must be one of mean, max, min"):
        AttentionRollout(model, head_fusion="median")
    with pytest.raises(ExplainkitError, match=r"discard_ratio is a fraction in \[0, 1\)"):
        AttentionRollout(model, discard_ratio=1.0)
    with pytest.raises(ExplainkitError, match="class_chunk must be a positive integer"):
        CheferRelevance(model, class_chunk=0)


def test_methods_declare_their_family_and_name():
    assert AttentionRollout.name == "rollout" and CheferRelevance.name == "chefer2021"
    assert AttentionRollout.family == CheferRelevance.family == "attention"
