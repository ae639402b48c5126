"""Registering, listing and building explainers; duplicates and unknown names."""

from __future__ import annotations

import pytest
import torch

import explainkit
from explainkit.explainers.gradient import GradCAM
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


def test_duplicate_names_raise_naming_both_plugins(fresh_plugins):
    class Clash:
        @explainkit.hookimpl
        def register_explainers(self, register):
            register("gradcam", GradCAM)

    fresh_plugins.register(Clash(), name="clash")
    for call in (explainkit.list_explainers, lambda: explainkit.get_explainer("gradcam", torch.nn.Conv2d(3, 3, 1))):
        with pytest.raises(explainkit.DuplicateExplainerError) as info:
            call()
        message = str(info.value)
        assert "explainkit.builtin" in message and "clash" in message
        assert "EXPLAINKIT_DISABLE_PLUGINS" in message


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
    with pytest.raises(explainkit.ExplainkitError, match="bad"):
        explainkit.list_explainers()


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
