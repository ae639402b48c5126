"""explainkit.models.attention: attention probabilities in the autograd graph for torchvision,
timm and Hugging Face ViTs, and the model left exactly as found (tiny random-init models)."""

from __future__ import annotations

from typing import Callable

import pytest
import torch
import torch.nn as nn
import torchvision

from explainkit.errors import ExplainkitError
from explainkit.models.attention import attention_blocks, final_head, trace_attention
from explainkit.models.outputs import logits_of

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")


def torchvision_vit() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10
    )
    nn.init.normal_(model.heads.head.weight, std=0.5)  # torchvision zero-initialises the head
    return model.eval()


def timm_deit_distilled() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "deit_tiny_distilled_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2, embed_dim=32,
        num_heads=2, num_classes=10,
    ).eval()  # fmt: skip


def timm_registers() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2,
        num_classes=10, reg_tokens=4,
    ).eval()  # fmt: skip


def timm_mean_pooled() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2,
        num_classes=10, global_pool="avg", class_token=False,
    ).eval()  # fmt: skip


def hf_vit() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        image_size=32, patch_size=8, num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64,
        num_labels=10,
    )  # fmt: skip
    return transformers.ViTForImageClassification(config).eval()


def hf_deit_teacher() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.DeiTConfig(
        image_size=32, patch_size=8, num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64,
        num_labels=10,
    )  # fmt: skip
    return transformers.DeiTForImageClassificationWithTeacher(config).eval()


# name -> (builder, prefix tokens, rows the head reads)
FAMILIES = {
    "torchvision": (torchvision_vit, 1, (0,)),
    "timm-deit-distilled": (timm_deit_distilled, 2, (0, 1)),
    "timm-registers": (timm_registers, 5, (0,)),
    "timm-mean-pooled": (timm_mean_pooled, 0, tuple(range(16))),
    "hf-vit": (hf_vit, 1, (0,)),
    "hf-deit-teacher": (hf_deit_teacher, 2, (0, 1)),
}


def _hooks(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) + len(m._backward_pre_hooks)
        for m in model.modules()
    )


def _switches(model: nn.Module) -> list:
    """What tracing flips: timm's fused_attn, Hugging Face's attention implementation, instance forwards."""
    return [
        (
            name,
            getattr(m, "fused_attn", None),
            "forward" in m.__dict__,
            getattr(getattr(m, "config", None), "_attn_implementation", None),
        )
        for name, m in model.named_modules()
    ]


@pytest.fixture(params=list(FAMILIES))
def family(request):
    build, prefix, readout = FAMILIES[request.param]
    return request.param, build(), prefix, readout


def test_probabilities_outputs_and_head_agree_with_the_untraced_model(family):
    name, model, prefix, readout = family
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = logits_of(model(images))
    with trace_attention(model, images.shape[-2:]) as trace:
        output = logits_of(model(images))
    tokens = prefix + 16
    assert len(trace.probabilities) == len(trace.block_outputs) == len(attention_blocks(model)) == 2
    for probabilities in trace.probabilities:
        assert probabilities.shape == (2, 2, tokens, tokens) and probabilities.requires_grad
        torch.testing.assert_close(probabilities.sum(-1), torch.ones(2, 2, tokens))
    assert trace.prefix_tokens == prefix and trace.grid == (4, 4) and trace.readout == readout
    torch.testing.assert_close(output, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(final_head(model)(trace.block_outputs[-1]), reference, atol=1e-5, rtol=1e-5)
    scores = torch.arange(2 * tokens, dtype=torch.float32).view(2, tokens)
    assert torch.equal(trace.patch_map(scores), scores[:, prefix:].view(2, 4, 4))


def _attention_values(model: nn.Module, block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, Callable]:
    """The block's values ``(N, heads, T, d)`` and the rest of the block given probabilities ``A``,
    written out independently for each library: ``x + proj(A @ V)`` then the MLP."""
    heads = 2
    if isinstance(block, torchvision.models.vision_transformer.EncoderBlock):
        h = block.ln_1(x)
        attention = block.self_attention
        w, b = attention.in_proj_weight.chunk(3)[2], attention.in_proj_bias.chunk(3)[2]
        v = nn.functional.linear(h, w, b).unflatten(-1, (heads, -1)).transpose(1, 2)

        def rest(a):
            y = x + attention.out_proj((a @ v).transpose(1, 2).flatten(2))
            return y + block.mlp(block.ln_2(y))

        return rest
    if hasattr(block, "attn"):  # timm
        h = block.norm1(x)
        v = block.attn.qkv(h).unflatten(-1, (3, heads, -1))[:, :, 2].transpose(1, 2)

        def rest(a):
            y = x + block.ls1(block.attn.proj(block.attn.norm((a @ v).transpose(1, 2).flatten(2))))
            return y + block.ls2(block.mlp(block.norm2(y)))

        return rest
    h = block.layernorm_before(x)  # Hugging Face
    v = block.attention.v_proj(h).unflatten(-1, (heads, -1)).transpose(1, 2)

    def rest(a):
        y = x + block.attention.o_proj((a @ v).transpose(1, 2).flatten(2))
        return y + block.mlp(block.layernorm_after(y))

    return rest


def test_gradient_wrt_probabilities_is_the_real_one(family):
    """d logit / d A of the last block equals that of an independent eager block fed the traced A,
    which reproduces the block's output: A is the tensor multiplied with V."""
    name, model, _, _ = family
    images = torch.randn(2, 3, 32, 32)
    with trace_attention(model, images.shape[-2:]) as trace:
        logits = logits_of(model(images))
    score = logits[:, 3].sum() + logits[:, 7].sum()
    traced = torch.autograd.grad(score, trace.probabilities[-1])[0]

    rest = _attention_values(model, attention_blocks(model)[-1], trace.block_outputs[-2].detach())
    a = trace.probabilities[-1].detach().double().float().requires_grad_(True)
    out = rest(a)
    torch.testing.assert_close(out, trace.block_outputs[-1].detach(), atol=1e-5, rtol=1e-5)
    reference_logits = final_head(model)(out)
    reference = torch.autograd.grad(reference_logits[:, 3].sum() + reference_logits[:, 7].sum(), a)[0]
    torch.testing.assert_close(traced, reference, atol=1e-5, rtol=1e-4)
    assert traced.abs().max() > 0
    # and a finite difference along one random direction agrees with it
    direction = torch.randn_like(a)
    with torch.no_grad():
        eps = 1e-3
        up, down = final_head(model)(rest(a + eps * direction)), final_head(model)(rest(a - eps * direction))
        numeric = ((up[:, 3] + up[:, 7]) - (down[:, 3] + down[:, 7])).sum() / (2 * eps)
    torch.testing.assert_close((traced * direction).sum(), numeric, atol=2e-3, rtol=2e-2)


def test_model_restored_and_no_hooks_left_also_after_an_exception(family):
    name, model, _, _ = family
    before, hooks = _switches(model), _hooks(model)
    with trace_attention(model, (32, 32)):
        if name.startswith("timm"):
            assert not any(m.fused_attn for m in model.modules() if hasattr(m, "fused_attn"))
        if name.startswith("hf"):
            assert model.config._attn_implementation == "eager"
        model(torch.randn(1, 3, 32, 32))
    assert _switches(model) == before and _hooks(model) == hooks == 0
    with pytest.raises((RuntimeError, ValueError)), trace_attention(model, (32, 32)):
        model(torch.randn(1, 5, 32, 32))  # wrong channel count fails inside the model
    assert _switches(model) == before and _hooks(model) == 0
    if name.startswith("timm"):
        assert all(m.fused_attn for m in model.modules() if hasattr(m, "fused_attn"))
    if name.startswith("hf"):
        assert model.config._attn_implementation == "sdpa"


def test_nested_traces_share_one_patch_and_the_last_out_restores():
    model = timm_registers()
    with trace_attention(model, (32, 32)) as outer:
        with trace_attention(model, (32, 32)) as inner:
            model(torch.randn(1, 3, 32, 32))
        assert not model.blocks[0].attn.fused_attn  # the outer trace is still open
        model(torch.randn(1, 3, 32, 32))
    assert len(inner.probabilities) == 2 and len(outer.probabilities) == 2
    assert model.blocks[0].attn.fused_attn and _hooks(model) == 0


def test_forward_outside_the_trace_records_nothing_and_is_untouched():
    model = torchvision_vit()
    with trace_attention(model, (32, 32)) as trace:
        pass
    model(torch.randn(1, 3, 32, 32))
    assert trace.probabilities == [] and "forward" not in model.encoder.layers[0].self_attention.__dict__


def test_a_cnn_is_refused_in_one_line():
    model = torchvision.models.resnet18(num_classes=10)
    with pytest.raises(ExplainkitError, match=r"^rollout needs a vision transformer with attention blocks; ResNet has none$"):
        attention_blocks(model, "rollout")
    with pytest.raises(ExplainkitError, match="ResNet has none"), trace_attention(model, (32, 32)):
        pass
    with pytest.raises(ExplainkitError, match="no known head for ResNet"):
        final_head(model)
    assert _hooks(model) == 0


def test_explainkits_logits_wrapper_is_read_through():
    from explainkit.models.outputs import LogitsOnly

    wrapped = LogitsOnly(hf_deit_teacher())
    images = torch.randn(2, 3, 32, 32)
    with trace_attention(wrapped, (32, 32)) as trace:
        logits = wrapped(images)
    assert trace.readout == (0, 1) and trace.prefix_tokens == 2
    torch.testing.assert_close(final_head(wrapped)(trace.block_outputs[-1]), logits)


def test_concurrent_traces_from_two_threads_record_their_own_forwards():
    import threading

    model = timm_registers()
    batches = {0: torch.randn(1, 3, 32, 32), 1: torch.randn(3, 3, 32, 32)}
    inside = threading.Barrier(2)
    recorded: dict[int, list] = {}

    def work(k: int) -> None:
        with trace_attention(model, (32, 32)) as trace:
            inside.wait(timeout=30)  # both traces open at once
            model(batches[k])
            inside.wait(timeout=30)
        recorded[k] = [p.shape[0] for p in trace.probabilities]

    threads = [threading.Thread(target=work, args=(k,)) for k in batches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert recorded == {0: [1, 1], 1: [3, 3]}
    assert model.blocks[0].attn.fused_attn and _hooks(model) == 0
