"""The hooks a plugin can implement. Modelled on simonw/llm's ``hookspecs.py``.

A plugin is any module or object with functions decorated by :data:`hookimpl`,
published under the ``explainkit`` entry-point group::

    [project.entry-points.explainkit]
    my_cams = "my_package.plugin"
"""

from __future__ import annotations

from typing import Callable

import pluggy

PROJECT_NAME = "explainkit"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def register_explainers(register: Callable[..., None]) -> None:
    """Register explainers (CAM methods) with explainkit.

    :param register: call ``register(name, factory)`` once per explainer. ``name`` is what
        users type after ``--method``; ``factory(model, layer=None)`` returns a callable
        ``explainer(images, targets=None, normalize=True)`` as described in
        :class:`explainkit.explainers.base.Explainer` (subclassing it is the easy way:
        the class itself is then the factory).
    :return: nothing; all implementations are called, in plugin registration order.
        Two plugins registering the same name is an error
        (:class:`explainkit.DuplicateExplainerError`), never a silent override.
    """
