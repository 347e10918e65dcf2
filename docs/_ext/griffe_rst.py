"""Griffe extension: render the reST bits of the package docstrings as Markdown.

The docstrings are Google style but use a few reStructuredText constructs (Sphinx roles
such as ``:class:`~sbnn_addons.IWSTSpike```, ``.. code-block:: text`` directives, ``::``
literal blocks and ``>>>`` doctest lines). mkdocstrings renders docstrings as Markdown, so
this extension rewrites those constructs before the docstrings are parsed:

* ``:role:`~a.b.C``` -> ```C``` and ``:role:`a.b.C``` -> ```a.b.C```;
* ``.. code-block:: LANG`` and ``Text::`` followed by an indented block -> a fenced block;
* a run of ``>>>`` / ``...`` lines (with their output) -> a fenced ``pycon`` block.

It changes only what the documentation site shows; the source files are not touched.
"""

from __future__ import annotations

import re

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|data|attr|exc|obj|const):`(~?)([^`]+)`")
_DIRECTIVE = re.compile(r"^(\s*)\.\. code-block::\s*(\S*)\s*$")
_LITERAL = re.compile(r"^(\s*)(.*\S)::\s*$")


def _role(match: re.Match) -> str:
    tilde, target = match.groups()
    target = target.strip()
    if target.startswith("!"):
        target = target[1:]
    if tilde:
        target = target.split(".")[-1]
    return f"`{target}`"


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _take_block(lines: list[str], start: int, base: int) -> tuple[list[str], int]:
    """Lines from ``start`` that are blank or indented deeper than ``base``."""
    end = start
    while end < len(lines) and (not lines[end].strip() or _indent(lines[end]) > base):
        end += 1
    while end > start and not lines[end - 1].strip():
        end -= 1
    return lines[start:end], end


def _fence(block: list[str], lang: str, indent: str) -> list[str]:
    body = list(block)
    depth = min((_indent(ln) for ln in body if ln.strip()), default=0)
    body = [indent + ln[depth:] if ln.strip() else "" for ln in body]
    while body and not body[0].strip():
        body.pop(0)
    return [f"{indent}```{lang}", *body, f"{indent}```"]


def rst_to_markdown(text: str) -> str:
    """Convert the reST constructs listed in the module docstring to Markdown."""
    lines = _ROLE.sub(_role, text).splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        directive = _DIRECTIVE.match(line)
        literal = None if directive else _LITERAL.match(line)
        if directive or (literal and not line.lstrip().startswith("..")):
            indent = (directive or literal).group(1)
            block, end = _take_block(lines, i + 1, len(indent))
            if any(ln.strip() for ln in block):
                if directive:
                    lang = directive.group(2) or "text"
                else:
                    out.append(f"{indent}{literal.group(2)}:")
                    out.append("")
                    lang = "text"
                out.extend(_fence(block, lang, indent))
                i = end
                continue
        if line.lstrip().startswith(">>>"):
            indent = line[: _indent(line)]
            block = []
            while i < len(lines) and lines[i].strip():
                block.append(lines[i])
                i += 1
            if out and out[-1].strip():
                out.append("")
            out.extend(_fence(block, "pycon", indent))
            continue
        out.append(line)
        i += 1
    return "\n".join(out)


class RstToMarkdown(griffe.Extension):
    """Rewrite every docstring with :func:`rst_to_markdown` when it is loaded."""

    def on_object(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rst_to_markdown(obj.docstring.value)
