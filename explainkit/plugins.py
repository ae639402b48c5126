"""The plugin manager: built-in plugins plus every ``explainkit`` entry point, loaded once.

Environment variables (read when plugins are first loaded):

* ``EXPLAINKIT_LOAD_PLUGINS`` — comma-separated entry-point names to load; unset loads all,
  an empty string loads none (built-ins always load).
* ``EXPLAINKIT_DISABLE_PLUGINS`` — comma-separated plugin names (entry-point names, or
  ``explainkit.builtin``) to block, e.g. to settle a duplicate explainer name.
"""

from __future__ import annotations

import importlib
import os
import warnings
from importlib.metadata import entry_points
from typing import Any

import pluggy

from explainkit import hookspecs

ENTRY_POINT_GROUP = hookspecs.PROJECT_NAME
BUILTIN_NAME = "explainkit.builtin"
BUILTIN_MODULE = "explainkit.default_plugins.builtin_explainers"

_manager: pluggy.PluginManager | None = None


class ExplainkitPluginError(Exception):
    """Why a plugin was skipped at load (reported as a warning, never raised to the user)."""


_distributions: dict[str, tuple[str, str]] = {}  # plugin name -> (distribution, version)


def _names_from_env(variable: str) -> set[str] | None:
    value = os.environ.get(variable)
    if value is None:
        return None
    return {name.strip() for name in value.split(",") if name.strip()}


def _load_entry_points(manager: pluggy.PluginManager) -> None:
    wanted = _names_from_env("EXPLAINKIT_LOAD_PLUGINS")
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        if wanted is not None and entry_point.name not in wanted:
            continue
        if manager.is_blocked(entry_point.name) or manager.get_plugin(entry_point.name):
            continue
        try:
            plugin = entry_point.load()
            manager.register(plugin, name=entry_point.name)
            dist = getattr(entry_point, "dist", None)
            if dist is not None:
                _distributions[entry_point.name] = (dist.name, dist.version)
            try:
                manager.check_pending()  # only this plugin can be pending: the others passed
            except pluggy.PluginValidationError as exc:
                manager.unregister(name=entry_point.name)
                raise ExplainkitPluginError(f"it implements a hook explainkit does not define ({exc})") from None
        except Exception as exc:  # a broken plugin must not take the others down
            dist = getattr(entry_point, "dist", None)
            source = f" (distribution {dist.name} {dist.version})" if dist else ""
            warnings.warn(
                f"explainkit plugin {entry_point.name!r}{source} failed to load and was skipped: "
                + (str(exc) if isinstance(exc, ExplainkitPluginError) else f"{type(exc).__name__}: {exc}"),
                RuntimeWarning,
                stacklevel=2,
            )


def plugin_manager() -> pluggy.PluginManager:
    """The process-wide :class:`pluggy.PluginManager`, created and loaded on first use.

    Tests may ``register``/``unregister`` plugin objects on it directly.
    """
    global _manager
    if _manager is None:
        manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        manager.add_hookspecs(hookspecs)
        for name in _names_from_env("EXPLAINKIT_DISABLE_PLUGINS") or ():
            manager.set_blocked(name)
        if not manager.is_blocked(BUILTIN_NAME):
            manager.register(importlib.import_module(BUILTIN_MODULE), name=BUILTIN_NAME)
        _load_entry_points(manager)  # a misspelled hook skips its plugin with a warning
        _manager = manager
    return _manager


def reset_plugin_manager() -> None:
    """Forget the loaded plugins; the next :func:`plugin_manager` call loads them afresh."""
    global _manager
    _manager = None


def describe_plugins() -> list[dict[str, Any]]:
    """Name, distribution, version and hooks of every loaded plugin (``explainkit plugins``)."""
    manager = plugin_manager()
    described = []
    for name, plugin in manager.list_name_plugin():
        if plugin is None:  # blocked
            continue
        distribution, version = plugin_distribution(name)
        described.append(
            {
                "name": name,
                "distribution": distribution,
                "version": version,
                "hooks": sorted(caller.name for caller in manager.get_hookcallers(plugin) or ()),
            }
        )
    return described


def plugin_distribution(name: str) -> tuple[str, str]:
    """(distribution, version) that shipped the plugin called ``name``; tests' plugins are local."""
    if name in _distributions:
        return _distributions[name]
    if name == BUILTIN_NAME:
        from explainkit._version import __version__

        return ("explainkit", __version__)
    return ("(registered at run time)", "")
