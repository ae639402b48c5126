"""The explainer registry: what plugins registered through ``register_explainers``.

The registry is rebuilt from the plugin manager on every call (it is a handful of
function calls), so plugins registered or unregistered at run time are always seen.
"""

from __future__ import annotations

import difflib
import warnings
from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

from explainkit.errors import DuplicateExplainerError, ExplainkitError, UnknownExplainerError
from explainkit.explainers.base import ExplainerFn
from explainkit.plugins import plugin_manager

ExplainerFactory = Callable[..., ExplainerFn]


@dataclass(frozen=True)
class Registration:
    name: str
    factory: ExplainerFactory
    plugin: str


@dataclass
class Catalog:
    """What the plugins registered: usable ``explainers`` and ``clashes`` (a name -> the plugins
    that all registered it; such a name is an error only when asked for)."""

    explainers: dict[str, Registration]
    clashes: dict[str, list[str]]


def _warn_skipped(plugin: str, reason: str) -> None:
    from explainkit.plugins import plugin_distribution

    distribution, version = plugin_distribution(plugin)
    source = f" (distribution {distribution} {version})" if version else ""
    warnings.warn(f"explainkit plugin {plugin!r}{source} was skipped: {reason}", RuntimeWarning, stacklevel=3)


def _valid_name(name: object) -> bool:
    return isinstance(name, str) and bool(name) and not any(c.isspace() or c == "," for c in name)


def catalog() -> Catalog:
    """Every registration, plugin by plugin. A plugin whose hook raises or that registers an invalid
    name or a non-callable factory is skipped with a warning naming it; the others stay usable."""
    found: dict[str, Registration] = {}
    owners: dict[str, list[str]] = {}
    manager = plugin_manager()
    # Call each implementation ourselves (not ``manager.hook.register_explainers``) so every
    # registration is attributed to its plugin, and one plugin's failure stays its own.
    for impl in manager.hook.register_explainers.get_hookimpls():  # registration order
        plugin = impl.plugin_name
        mine: dict[str, Registration] = {}
        problems: list[str] = []

        def register(name: str, factory: ExplainerFactory, _plugin: str = plugin, _mine=mine, _problems=problems) -> None:
            if not _valid_name(name):
                _problems.append(f"invalid explainer name {name!r} (a non-empty string without spaces or commas)")
            elif not callable(factory):
                _problems.append(f"{name!r} registered with a non-callable factory")
            else:
                _mine[name] = Registration(name, factory, _plugin)

        try:
            impl.function(register=register)
        except Exception as exc:  # a broken plugin must not take the others down
            _warn_skipped(plugin, f"its register_explainers hook raised {type(exc).__name__}: {exc}")
            continue
        if problems:
            _warn_skipped(plugin, "; ".join(problems))
            continue
        for name, registration in mine.items():
            owners.setdefault(name, []).append(plugin)
            found.setdefault(name, registration)
    clashes = {name: plugins for name, plugins in owners.items() if len(plugins) > 1}
    return Catalog({name: r for name, r in found.items() if name not in clashes}, clashes)


def registrations() -> dict[str, Registration]:
    """Every usable registered explainer by name (names registered twice are left out)."""
    return catalog().explainers


def parse_methods(text: str) -> list[str]:
    """``"gradcam, gradcam++"`` -> ``["gradcam", "gradcam++"]`` (the CLI's ``--method`` value), de-duplicated in order."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise ExplainkitError("--method needs at least one explainer name")
    return list(dict.fromkeys(names))


def list_explainers() -> list[str]:
    """Names of all registered explainers, sorted.

    Example:
        >>> "gradcam" in explainkit.list_explainers()
        True
    """
    return sorted(registrations())


def get_explainer(name: str, model: nn.Module, layer: str | nn.Module | None = None) -> ExplainerFn:
    """Build the explainer registered as ``name`` for ``model`` at ``layer``.

    Args:
        name: a registered name, e.g. ``"gradcam"`` (see :func:`list_explainers`).
        model: the classifier to explain.
        layer: dotted submodule path (``"layer4"``, ``"layer3.1.conv2"``) or the module itself;
            ``None`` picks the default (:func:`explainkit.models.layers.default_layer`).

    Returns:
        A callable ``explainer(images, targets=None, normalize=True)`` returning maps.

    Raises:
        UnknownExplainerError: no such name (the message lists the registered ones).

    Example:
        >>> cam = explainkit.get_explainer("gradcam", model, layer="layer4")
        >>> maps = cam(images)            # (N, H, W), each in [0, 1]
    """
    return require_explainer(name).factory(model, layer=layer)


def require_explainer(name: str) -> Registration:
    """The registration for ``name``: :class:`DuplicateExplainerError` naming the plugins if two
    registered it, :class:`UnknownExplainerError` listing the others if none did."""
    registered = catalog()
    if name in registered.clashes:
        first, *others = registered.clashes[name]
        raise DuplicateExplainerError(
            f"explainer {name!r} is registered by several plugins, {first!r} and {', '.join(repr(o) for o in others)}; "
            f"disable one, e.g. EXPLAINKIT_DISABLE_PLUGINS={others[0]}, or uninstall its distribution"
        )
    found = registered.explainers
    if name not in found:
        close = difflib.get_close_matches(name, found, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UnknownExplainerError(f"unknown explainer {name!r}{hint}; registered: {', '.join(sorted(found)) or '(none)'}")
    return found[name]
