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
