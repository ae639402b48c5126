"""Registering, listing and building explainers; duplicates and unknown names."""

from __future__ import annotations

import pytest
import torch

import explainkit
from explainkit.errors import ExplainkitError
from explainkit.explainers.gradient import GradCAM, GradientCAM
from explainkit.registry import registrations


class EchoPlugin:
    """A third-party plugin defined in the test: a GradCAM under another name."""

    @explainkit.hookimpl
    def register_explainers(self, register):
        register("test-echo", GradCAM)


@pytest.fixture
def echo_plugin(fresh_plugins):
    fresh_plugins.register(EchoPlugin(), name="echo")
    yield
    fresh_plugins.unregister(name="echo")


def test_builtins_are_registered(fresh_plugins):
    names = explainkit.list_explainers()
    assert {"gradcam", "gradcam++", "captum-gradcam"} <= set(names)
    assert names == sorted(names)
    assert registrations()["gradcam"].plugin == "explainkit.builtin"


def test_a_registered_plugin_is_listed_and_usable(echo_plugin, random_model):
    assert "test-echo" in explainkit.list_explainers()
    assert registrations()["test-echo"].plugin == "echo"
    maps = explainkit.get_explainer("test-echo", random_model)(torch.randn(2, 3, 32, 32))
    assert maps.shape == (2, 32, 32)


def test_unregistered_plugin_disappears(fresh_plugins):
    fresh_plugins.register(EchoPlugin(), name="echo")
    fresh_plugins.unregister(name="echo")
    assert "test-echo" not in explainkit.list_explainers()


def test_a_clashing_name_fails_only_when_asked_for(fresh_plugins, random_model):
    class Clash:
        @explainkit.hookimpl
        def register_explainers(self, register):
            register("gradcam", GradCAM)
            register("clash-only", GradCAM)

    fresh_plugins.register(Clash(), name="clash")
    with pytest.raises(explainkit.DuplicateExplainerError) as info:
        explainkit.get_explainer("gradcam", random_model)
    message = str(info.value)
    assert "explainkit.builtin" in message and "clash" in message and "EXPLAINKIT_DISABLE_PLUGINS" in message
    names = explainkit.list_explainers()  # every other name still resolves
    assert "gradcam" not in names and "gradcam++" in names and "clash-only" in names
    assert explainkit.get_explainer("gradcam++", random_model)(torch.randn(1, 3, 32, 32)).shape == (1, 32, 32)


def test_a_plugin_whose_hook_raises_is_skipped_with_a_warning(fresh_plugins, random_model):
    class Raises:
        @explainkit.hookimpl
        def register_explainers(self, register):
            register("half-done", GradCAM)
            raise RuntimeError("boom")

    fresh_plugins.register(Raises(), name="raises")
    with pytest.warns(RuntimeWarning, match="'raises'.*skipped.*boom"):
        names = explainkit.list_explainers()
    assert "half-done" not in names and "gradcam" in names
    with pytest.warns(RuntimeWarning, match="'raises'"):
        assert explainkit.get_explainer("gradcam", random_model) is not None


def test_unknown_name_lists_registered_and_suggests(fresh_plugins, random_model):
    with pytest.raises(explainkit.UnknownExplainerError) as info:
        explainkit.get_explainer("gradcamm", random_model)
    message = str(info.value)
    assert "did you mean 'gradcam'" in message
    assert "gradcam++" in message and "captum-gradcam" in message


@pytest.mark.parametrize("name", ["", "has space", "a,b", 3])
def test_invalid_names_are_rejected(fresh_plugins, name):
    class Bad:
        @explainkit.hookimpl
        def register_explainers(self, register):
            register(name, GradCAM)

    fresh_plugins.register(Bad(), name="bad")
    with pytest.warns(RuntimeWarning, match="'bad'.*invalid explainer name"):
        names = explainkit.list_explainers()
    assert "gradcam" in names


def test_factory_receives_model_and_layer(fresh_plugins, random_model):
    seen = {}

    def factory(model, layer=None):
        seen.update(model=model, layer=layer)
        return lambda images, targets=None, normalize=True: images[:, 0]

    class FunctionPlugin:
        @explainkit.hookimpl
        def register_explainers(self, register):
            register("fn", factory)

    fresh_plugins.register(FunctionPlugin(), name="fn-plugin")
    explainkit.get_explainer("fn", random_model, layer="layer3")
    assert seen == {"model": random_model, "layer": "layer3"}


def _register_plain(fresh_plugins, fn, name="plain"):
    class Plain:
        @explainkit.hookimpl
        def register_explainers(self, register):
            register(name, lambda model, layer=None: fn)

    fresh_plugins.register(Plain(), name=f"{name}-plugin")


def test_a_plain_function_plugin_comes_back_as_an_explainer(fresh_plugins, random_model):
    from explainkit.explainers.base import Explainer

    calls = []

    def brightness(images, targets=None, normalize=True):  # one class per image
        calls.append(targets)
        return images.mean(1) + targets.view(-1, 1, 1)

    _register_plain(fresh_plugins, brightness)
    explainer = explainkit.get_explainer("plain", random_model)
    assert isinstance(explainer, Explainer)
    images = torch.randn(3, 3, 32, 32)
    result = explainer.explain(images)
    assert result.maps.shape == (3, 32, 32) and result.logits.shape == (3, 10)
    assert torch.equal(result.targets, random_model(images).argmax(1))
    topk = explainer.explain(images, "topk:2")
    assert topk.maps.shape == (3, 2, 32, 32) and topk.targets.shape == (3, 2) and len(calls) == 3  # one call per column
    assert explainer(images, targets="all").shape == (3, 10, 32, 32)


def test_a_plain_function_returning_the_wrong_shape_is_a_clear_error(fresh_plugins, random_model):
    _register_plain(fresh_plugins, lambda images, targets=None, normalize=True: torch.zeros(len(images), 5, 5), "tiny")
    with pytest.raises(ExplainkitError, match=r"'tiny' returned maps of shape \(3, 5, 5\)"):
        explainkit.get_explainer("tiny", random_model)(torch.randn(3, 3, 32, 32))


def test_a_class_registers_under_its_own_name(fresh_plugins, random_model):
    class Mine(GradCAM):
        name = "my-own-name"

    class ByClass:
        @explainkit.hookimpl
        def register_explainers(self, register):
            register(Mine)

    fresh_plugins.register(ByClass(), name="by-class")
    assert "my-own-name" in explainkit.list_explainers()
    assert isinstance(explainkit.get_explainer("my-own-name", random_model), Mine)


GRADIENT_METHODS = sorted(
    r.name for r in registrations().values() if isinstance(r.factory, type) and issubclass(r.factory, GradientCAM)
)


@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_options_reach_every_gradient_method(name, random_model):
    images = torch.randn(2, 3, 32, 32)
    plain = explainkit.get_explainer(name, random_model, layer="layer4")
    bf16 = explainkit.get_explainer(name, random_model, layer="layer4", autocast=torch.bfloat16)
    assert bf16.autocast is torch.bfloat16
    maps = bf16(images)
    assert maps.dtype == torch.float32 and torch.isfinite(maps).all()
    assert float(torch.nn.functional.cosine_similarity(maps.flatten(1), plain(images).flatten(1)).min()) > 0.9


def test_an_option_a_method_does_not_take_is_a_clear_error(random_model):
    with pytest.raises(ExplainkitError, match="'scorecam' does not take autocast; it takes batch_size, layout"):
        explainkit.get_explainer("scorecam", random_model, autocast=torch.bfloat16)
    assert explainkit.get_explainer("scorecam", random_model, batch_size=8).batch_size == 8
