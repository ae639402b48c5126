"""The explainer registry: what plugins registered through ``register_explainers``.

The registry is rebuilt from the plugin manager on every call (it is a handful of
function calls), so plugins registered or unregistered at run time are always seen.
"""

from __future__ import annotations

import difflib
import inspect
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch.nn as nn

from explainkit.errors import DuplicateExplainerError, ExplainkitError, UnknownExplainerError
from explainkit.explainers.base import Explainer, ExplainerFn
from explainkit.explainers.function import function_factory
from explainkit.plugins import plugin_manager

ExplainerFactory = Callable[..., ExplainerFn]  # an Explainer subclass, or a factory of plain map functions


@dataclass(frozen=True)
class Registration:
    """One registered explainer: ``factory(model, layer=None, **options)`` always returns an
    :class:`~explainkit.explainers.base.Explainer` (a plain-function plugin is wrapped once, here);
    ``registered`` is what the plugin passed, ``plugin`` the plugin that registered it."""

    name: str
    factory: Callable[..., Explainer]
    plugin: str
    registered: ExplainerFactory

    @property
    def family(self) -> str:
        """What the method reads (the class's ``family``: "gradient", "perturbation",
        "class-agnostic", "attention", "fusion"); "other" for factories that are not classes."""
        return getattr(self.registered, "family", "other") if isinstance(self.registered, type) else "other"


def as_explainer_factory(name: str, factory: ExplainerFactory) -> Callable[..., Explainer]:
    """An :class:`Explainer` subclass as is; any other factory wrapped so it returns an Explainer."""
    if isinstance(factory, type) and issubclass(factory, Explainer):
        return factory
    return function_factory(name, factory)


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

        def register(
            name: str | type[Explainer], factory: ExplainerFactory | None = None, _plugin=plugin, _mine=mine, _problems=problems
        ) -> None:
            if factory is None and isinstance(name, type) and issubclass(name, Explainer):
                factory = name
                name = name.name  # a class registers under its own name
            if not _valid_name(name):
                _problems.append(f"invalid explainer name {name!r} (a non-empty string without spaces or commas)")
            elif not callable(factory):
                _problems.append(f"{name!r} registered with a non-callable factory")
            else:
                assert isinstance(name, str)
                _mine[name] = Registration(name, as_explainer_factory(name, factory), _plugin, factory)

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


def get_explainer(name: str, model: nn.Module, layer: str | nn.Module | None = None, **options: Any) -> Explainer:
    """Build the explainer registered as ``name`` for ``model`` at ``layer``.

    Args:
        name: a registered name, e.g. ``"gradcam"`` (see :func:`list_explainers`).
        model: the model to explain.
        layer: dotted submodule path (``"layer4"``, ``"layer3.1.conv2"``) or the module itself;
            ``None`` picks the default (:func:`explainkit.models.layers.default_layer`).
        **options: the method's own keyword options, e.g. ``autocast=torch.bfloat16`` for the
            gradient CAMs, ``batch_size=`` for Score-CAM and Ablation-CAM, ``layout=``.

    Returns:
        An :class:`~explainkit.explainers.base.Explainer`, whatever the plugin registered:
        ``explainer(images, targets=None, normalize=True)`` returns maps and
        ``explainer.explain(...)`` maps, logits and targets.

    Raises:
        UnknownExplainerError: no such name (the message lists the registered ones).
        ExplainkitError: an option the method does not take.

    Example:
        >>> cam = explainkit.get_explainer("gradcam", model, layer="layer4")
        >>> maps = cam(images)            # (N, H, W), each in [0, 1]
    """
    registration = require_explainer(name)
    check_options(registration, options)
    return registration.factory(model, layer=layer, **options)


def accepts_option(registration: Registration, option: str) -> bool:
    """Whether the registered factory takes the keyword ``option`` (e.g. ``"autocast"``)."""
    try:
        parameters = inspect.signature(registration.registered).parameters
    except (TypeError, ValueError):
        return False
    return option in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def check_options(registration: Registration, options: dict[str, Any]) -> None:
    """A clear error for options the registered factory does not take (not a TypeError from deep inside)."""
    check_factory_options(registration.name, registration.registered, options)


def check_factory_options(name: str, factory: Any, options: dict[str, Any], kind: str = "explainer") -> None:
    """:func:`check_options` for any factory ``factory(model, layer=..., **options)`` called ``name``
    (``kind`` names it in the message: "explainer", or "method" inside a fusion)."""
    if not options:
        return
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # a builtin or C callable: let the call speak
        return
    try:
        signature.bind(None, layer=None, **options)
    except TypeError:
        accepted = [p for p in signature.parameters if p not in ("self", "model", "layer")]
        unknown = ", ".join(sorted(set(options) - set(accepted)))
        raise ExplainkitError(
            f"{kind} {name!r} does not take {unknown}; it takes {', '.join(accepted) or 'no options'}"
        ) from None


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
