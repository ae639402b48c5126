"""explainers/graphs.py: CapturedCAM is the plain explainer on the CPU, and its capture
bookkeeping (static input buffer, one entry per shape and target form, outputs copied out,
entries dropped when the parameters move) gives the plain explainer's maps (``mode="static"``:
the call run again where CUDA would replay the graph). CUDA parity runs in benchmarks/gpu.py."""

from __future__ import annotations

import copy

import pytest
import torch

from explainkit.errors import ExplainkitError
from explainkit.explainers.gradient import GradCAM, GradCAMPlusPlus, LayerCAM
from explainkit.explainers.graphs import MODES, CapturedCAM, capture

TARGETS = [None, 3, "all", "topk:2", ("topk", 3)]


def _hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


def _assert_same(got, want):
    assert torch.equal(got.maps, want.maps)
    assert torch.equal(got.logits, want.logits)
    assert torch.equal(got.scores, want.scores)
    assert (got.targets is None) == (want.targets is None)
    if want.targets is not None:
        assert torch.equal(got.targets, want.targets)


@pytest.mark.parametrize("targets", TARGETS + [[0, 1, 2, 3, 4, 5]])
def test_cpu_is_a_pass_through(random_model, images, targets):
    plain = GradCAM(random_model, "layer4")
    captured = CapturedCAM(GradCAM(random_model, "layer4"))
    _assert_same(captured.explain(images, targets), plain.explain(images, targets))
    assert captured.last_path == "eager" and not captured._entries
    assert torch.equal(captured(images, targets), plain(images, targets))


@pytest.mark.parametrize("cls", [GradCAM, GradCAMPlusPlus, LayerCAM])  # both override levels
@pytest.mark.parametrize("targets", TARGETS)
def test_static_capture_gives_the_plain_maps(random_model, cls, targets):
    plain = cls(random_model, "layer3")
    captured = CapturedCAM(cls(random_model, "layer3"), mode="static")
    first, second = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    _assert_same(captured.explain(first, targets), plain.explain(first, targets))
    assert captured.last_path == "captured"
    # The second batch goes through the same static buffer: its own maps, not the first batch's.
    _assert_same(captured.explain(second, targets), plain.explain(second, targets))
    assert captured.last_path == "replayed" and len(captured._entries) == 1


def test_one_entry_per_shape_target_form_and_normalize(random_model, images):
    captured = CapturedCAM(GradCAM(random_model, "layer4"), mode="static", max_graphs=16)
    plain = GradCAM(random_model, "layer4")
    for batch in (images, images[:2], images):
        for targets in (None, "all", 1, 2):
            for normalize in (True, False):
                got = captured(batch, targets, normalize=normalize)
                assert torch.equal(got, plain(batch, targets, normalize=normalize))
    assert len(captured._entries) == 2 * 4 * 2 and captured.last_path == "replayed"


def test_least_recently_used_entries_go_first(random_model, images):
    captured = CapturedCAM(GradCAM(random_model, "layer4"), mode="static", max_graphs=2)
    for targets in (1, 2, 1, 3):  # 2 is the least recently used when 3 arrives
        captured(images, targets)
    assert [key[-2] for key in captured._entries] == [("class", 1), ("class", 3)]
    captured(images, 2)
    assert captured.last_path == "captured"


def test_returned_maps_are_copies(random_model, images):
    captured = CapturedCAM(GradCAM(random_model, "layer4"), mode="static")
    first = captured(images, "all")
    kept = first.clone()
    captured(torch.randn_like(images), "all")  # overwrites the entry's own outputs
    assert torch.equal(first, kept)


def test_per_image_targets_and_target_objects_run_the_plain_call(random_model, images):
    captured = CapturedCAM(GradCAM(random_model, "layer4"), mode="static")
    plain = GradCAM(random_model, "layer4")
    wanted = torch.tensor([k % 10 for k in range(len(images))])
    _assert_same(captured.explain(images, wanted), plain.explain(images, wanted))
    assert captured.last_path == "eager" and not captured._entries
    scores = captured(images, lambda logits: logits[:, 0])
    assert captured.last_path == "eager" and torch.equal(scores, plain(images, lambda logits: logits[:, 0]))


def test_moved_or_replaced_parameters_drop_the_entries(random_model, images):
    model = copy.deepcopy(random_model)
    captured = CapturedCAM(GradCAM(model, "layer4"), mode="static")
    captured(images, "all")
    with torch.no_grad():  # in place: the entry stays and sees the new values
        model.fc.weight.mul_(-1)
    assert torch.equal(captured(images, "all"), GradCAM(model, "layer4")(images, "all"))
    assert captured.last_path == "replayed"
    model.fc.weight = torch.nn.Parameter(torch.randn_like(model.fc.weight))  # replaced: re-captured
    assert torch.equal(captured(images, "all"), GradCAM(model, "layer4")(images, "all"))
    assert captured.last_path == "captured" and len(captured._entries) == 1


def test_model_left_as_found(random_model, images):
    model = copy.deepcopy(random_model).train()
    model.layer2.eval()
    model.fc.weight.requires_grad_(False)
    model.conv1.weight.grad = torch.full_like(model.conv1.weight, 0.25)
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    modes = {n: m.training for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for mode in ("auto", "static"):
        captured = capture(GradCAM(model, "layer3"), mode)
        captured(images, "all")
        captured(images, "all")
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    for key, value in model.named_buffers():
        torch.testing.assert_close(value, buffers[key], msg=key)
    assert torch.equal(model.conv1.weight.grad, torch.full_like(model.conv1.weight, 0.25))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "conv1.weight")
    assert _hooks(model) == 0


def test_a_failed_capture_falls_back_to_the_plain_call(random_model, images):
    class FailsOnce(GradCAM):
        calls = 0

        def compute(self, images, target):
            type(self).calls += 1
            if type(self).calls == 1:
                raise RuntimeError("operation not permitted when stream is capturing\nmore detail")
            return super().compute(images, target)

    captured = CapturedCAM(FailsOnce(random_model, "layer4"), mode="static")
    assert torch.equal(captured(images), GradCAM(random_model, "layer4")(images))
    assert captured.last_path == "eager"
    assert list(captured.fallbacks.values()) == ["RuntimeError: operation not permitted when stream is capturing"]
    captured(images)
    assert captured.last_path == "eager" and not captured._entries


def test_user_errors_are_the_plain_calls_errors(random_model, images):
    captured = CapturedCAM(GradCAM(random_model, "layer4"), mode="static")
    with pytest.raises(ExplainkitError, match="out of range"):
        captured(images, targets=10)
    with pytest.raises(ExplainkitError, match="NaN or Inf"):
        captured(torch.full_like(images, float("nan")))
    assert not captured.fallbacks and _hooks(random_model) == 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mode": "graph"}, "mode='graph': must be one of " + ", ".join(MODES)),
        ({"max_graphs": 0}, "max_graphs=0: must be at least 1"),
    ],
)
def test_bad_options_are_one_line_errors(random_model, kwargs, message):
    with pytest.raises(ExplainkitError) as info:
        CapturedCAM(GradCAM(random_model, "layer4"), **kwargs)
    assert str(info.value) == message and "\n" not in str(info.value)


def test_only_explainers_are_wrapped():
    with pytest.raises(ExplainkitError, match="must be an Explainer, got function"):
        CapturedCAM(lambda images: images)  # type: ignore[arg-type]
