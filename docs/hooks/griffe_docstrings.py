"""Griffe extension (listed under mkdocstrings' ``extensions`` in ``mkdocs.yml``): read the package's
docstrings as the API page should show them, without editing the package.

The package's docstrings are Google style with a few reStructuredText habits; this rewrites, at
docs build time only:

- an ``Example:`` section heading to ``Examples:`` (griffe reads only the plural as an examples
  section, with ``>>>`` lines as code; the singular would be an admonition of Markdown text);
- Sphinx roles (``:class:`~explainkit.x.Y```, ``:func:`f```, ...) to inline code (``Y``, ``f``);
- a paragraph ending in ``::`` before a literal block to one colon.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^([ \t]*)Example:[ \t]*$", re.M)
_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|data|attr|exc|obj|const):`(~?)([^`]+)`")
_LITERAL = re.compile(r"(\S)::[ \t]*$", re.M)


def _role(match: re.Match[str]) -> str:
    short, target = match.groups()
    target = target.split("<")[-1].rstrip(">").strip()  # :class:`title <target>`
    return f"`{target.rsplit('.', 1)[-1] if short else target}`"


def rewrite(text: str) -> str:
    text = _EXAMPLE.sub(r"\1Examples:", text)
    text = _ROLE.sub(_role, text)
    return _LITERAL.sub(r"\1:", text)


class ReadableDocstrings(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:  # noqa: ARG002 - griffe's signature
        if obj.docstring is not None:
            obj.docstring.value = rewrite(obj.docstring.value)
