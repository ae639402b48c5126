"""The hooks a plugin can implement. Modelled on simonw/llm's ``hookspecs.py``.

A plugin is any module or object with functions decorated by :data:`hookimpl`,
published under the ``explainkit`` entry-point group::

    [project.entry-points.explainkit]
    my_cams = "my_package.plugin"
"""

from __future__ import annotations

from typing import Any, Callable

import pluggy

PROJECT_NAME = "explainkit"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def register_explainers(register: Callable[..., None]) -> None:
    """Register explainers (CAM methods) with explainkit.

    :param register: call ``register(ExplainerSubclass)`` (it registers under its ``name``
        attribute) or ``register(name, factory)`` once per explainer. ``name`` is what users
        type after ``--method``. ``factory(model, layer=None, **options)`` returns an
        :class:`explainkit.explainers.base.Explainer`, or a plain callable
        ``fn(images, targets) -> (N, H, W) maps`` taking one class per image, which explainkit
        wraps once so that ``get_explainer`` always returns an ``Explainer`` (``.explain()``
        with logits and targets, top-k and ``"all"`` by one ``fn`` call per class column).
        Keyword options given to ``get_explainer`` reach the factory unchanged.
    :return: nothing; all implementations are called, in plugin registration order.
        Two plugins registering the same name is an error
        (:class:`explainkit.DuplicateExplainerError`), never a silent override.
    """


@hookspec
def register_commands(subparsers: Any) -> None:
    """Add commands to ``explainkit`` (as simonw/llm's ``register_commands``).

    :param subparsers: the ``argparse`` sub-parsers of ``explainkit``. Add one with
        ``parser = subparsers.add_parser("name", help=...)``, declare its flags, and set
        ``parser.set_defaults(run=function)``, where ``function(args) -> int`` is the exit code.
        Raise :class:`explainkit.ExplainkitError` for a user error: it is shown on one line.
    :return: nothing; all implementations are called, after the built-in commands. A name that
        is already taken is an error naming the plugin.
    """
