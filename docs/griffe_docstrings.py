"""Reads funcsam's docstrings as the site renders them (a griffe extension, loaded by mkdocs.yml).

The docstrings are written for ``help()`` and an editor: Google-style ``Args:``/``Returns:``, with
reST's ``:func:`name``` roles, ``Fields:`` for a NamedTuple's fields and ``::`` before a literal
block. Markdown knows none of the three, so each docstring is rewritten once, before it is parsed:
a role becomes inline code, ``Fields:`` an ``Attributes:`` section, ``::`` a ``:`` (the indented
block that follows is a code block in Markdown already). The source files are not changed.
"""

from __future__ import annotations

import re

import griffe

ROLE = re.compile(r":(?:func|class|mod|meth|attr|data|obj|exc):`~?([^`]+)`")
FIELDS = re.compile(r"^([ \t]*)Fields:[ \t]*$", re.MULTILINE)
LITERAL = re.compile(r"::[ \t]*$", re.MULTILINE)


def markdown_docstring(text: str) -> str:
    """The docstring ``text`` with roles, ``Fields:`` and ``::`` written the Markdown way."""
    text = ROLE.sub(r"`\1`", text)
    text = FIELDS.sub(r"\1Attributes:", text)
    return LITERAL.sub(":", text)


class MarkdownDocstrings(griffe.Extension):
    """Rewrites every loaded object's docstring with :func:`markdown_docstring`."""

    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown_docstring(obj.docstring.value)
