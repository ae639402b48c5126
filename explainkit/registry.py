"""The explainer registry: what plugins registered through ``register_explainers``.

The registry is rebuilt from the plugin manager on every call (it is a handful of
function calls), so plugins registered or unregistered at run time are always seen.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable

import torch.nn as nn

from explainkit.errors import DuplicateExplainerError, ExplainkitError, UnknownExplainerError
from explainkit.plugins import plugin_manager

ExplainerFactory = Callable[..., Any]


@dataclass(frozen=True)
class Registration:
    name: str
    factory: ExplainerFactory
    plugin: str


def registrations() -> dict[str, Registration]:
    """Every registered explainer by name. Raises :class:`DuplicateExplainerError` on a clash."""
    found: dict[str, Registration] = {}
    manager = plugin_manager()
    # Call each implementation ourselves (not ``manager.hook.register_explainers``) so every
    # registration is attributed to the plugin that made it; duplicates can then name both.
    for impl in manager.hook.register_explainers.get_hookimpls():  # registration order

        def register(name: str, factory: ExplainerFactory, _plugin: str = impl.plugin_name) -> None:
            if not isinstance(name, str) or not name or any(c.isspace() or c == "," for c in name):
                raise ExplainkitError(
                    f"plugin {_plugin!r} registered an invalid explainer name {name!r} "
                    "(a non-empty string without spaces or commas)"
                )
            if not callable(factory):
                raise ExplainkitError(f"plugin {_plugin!r} registered {name!r} with a non-callable factory")
            if name in found:
                other = found[name].plugin
                raise DuplicateExplainerError(
                    f"explainer {name!r} is registered by two plugins, {other!r} and {_plugin!r}; "
                    f"disable one, e.g. EXPLAINKIT_DISABLE_PLUGINS={_plugin}, or uninstall its distribution"
                )
            found[name] = Registration(name, factory, _plugin)

        impl.function(register=register)
    return found


def list_explainers() -> list[str]:
    """Names of all registered explainers, sorted.

    Example:
        >>> "gradcam" in explainkit.list_explainers()
        True
    """
    return sorted(registrations())


def get_explainer(name: str, model: nn.Module, layer: str | nn.Module | None = None) -> Any:
    """Build the explainer registered as ``name`` for ``model`` at ``layer``.

    Args:
        name: a registered name, e.g. ``"gradcam"`` (see :func:`list_explainers`).
        model: the classifier to explain.
        layer: dotted submodule path (``"layer4"``, ``"layer3.1.conv2"``) or the module itself;
            ``None`` picks the default (:func:`explainkit.layers.default_layer`).

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
    """The registration for ``name``; :class:`UnknownExplainerError` listing the others if absent."""
    found = registrations()
    if name not in found:
        close = difflib.get_close_matches(name, found, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UnknownExplainerError(
            f"unknown explainer {name!r}{hint}; registered: {', '.join(sorted(found)) or '(none)'}"
        )
    return found[name]
