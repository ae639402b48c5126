"""Entry-point loading: once, broken plugins reported by name, env-var controls, pending hooks."""

from __future__ import annotations

import types
from importlib.metadata import EntryPoint

import pytest

import explainkit
from explainkit import plugins


def _fake_entry_points(monkeypatch, *eps):
    monkeypatch.setattr(plugins, "entry_points", lambda group: [ep for ep in eps if ep.group == group])


@pytest.fixture
def good_module(monkeypatch):
    module = types.ModuleType("ek_test_good_plugin")

    @explainkit.hookimpl
    def register_explainers(register):
        from explainkit.explainers.gradient import GradCAM

        register("good-cam", GradCAM)

    module.register_explainers = register_explainers
    monkeypatch.setitem(__import__("sys").modules, "ek_test_good_plugin", module)
    return module


def test_broken_plugin_warns_by_name_and_others_still_work(monkeypatch, fresh_plugins, good_module):
    _fake_entry_points(
        monkeypatch,
        EntryPoint("broken", "ek_test_missing_module_xyz", "explainkit"),
        EntryPoint("good", "ek_test_good_plugin", "explainkit"),
    )
    plugins.reset_plugin_manager()
    with pytest.warns(RuntimeWarning, match="'broken'"):
        explainkit.plugin_manager()
    names = explainkit.list_explainers()
    assert "good-cam" in names and "gradcam" in names


def test_entry_points_are_loaded_once(monkeypatch, fresh_plugins, good_module):
    calls = []
    _fake_entry_points(monkeypatch, EntryPoint("good", "ek_test_good_plugin", "explainkit"))
    original = plugins._load_entry_points
    monkeypatch.setattr(plugins, "_load_entry_points", lambda m: (calls.append(1), original(m)))
    plugins.reset_plugin_manager()
    for _ in range(3):
        explainkit.plugin_manager()
        explainkit.list_explainers()
    assert calls == [1]


def test_load_and_disable_env_vars(monkeypatch, fresh_plugins, good_module):
    _fake_entry_points(monkeypatch, EntryPoint("good", "ek_test_good_plugin", "explainkit"))
    monkeypatch.setenv("EXPLAINKIT_LOAD_PLUGINS", "")
    plugins.reset_plugin_manager()
    assert "good-cam" not in explainkit.list_explainers()

    monkeypatch.delenv("EXPLAINKIT_LOAD_PLUGINS")
    monkeypatch.setenv("EXPLAINKIT_DISABLE_PLUGINS", "explainkit.builtin")
    plugins.reset_plugin_manager()
    names = explainkit.list_explainers()
    assert "good-cam" in names and "gradcam" not in names


def test_misspelled_hook_skips_that_plugin_with_a_warning(monkeypatch, fresh_plugins, good_module):
    module = types.ModuleType("ek_test_typo_plugin")

    @explainkit.hookimpl
    def register_explainer(register):  # missing "s"
        pass

    module.register_explainer = register_explainer
    monkeypatch.setitem(__import__("sys").modules, "ek_test_typo_plugin", module)
    _fake_entry_points(
        monkeypatch,
        EntryPoint("typo", "ek_test_typo_plugin", "explainkit"),
        EntryPoint("good", "ek_test_good_plugin", "explainkit"),
    )
    plugins.reset_plugin_manager()
    with pytest.warns(RuntimeWarning, match="'typo'.*does not define"):
        manager = explainkit.plugin_manager()
    assert manager.get_plugin("typo") is None
    names = explainkit.list_explainers()
    assert "gradcam" in names and "good-cam" in names


def test_describe_plugins_names_builtin(fresh_plugins):
    described = {p["name"]: p for p in plugins.describe_plugins()}
    assert described["explainkit.builtin"]["distribution"] == "explainkit"
    assert described["explainkit.builtin"]["hooks"] == ["register_explainers"]
