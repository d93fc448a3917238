"""A griffe extension: render the reST roles of kivigo-async docstrings as cross-references.

The docstrings are written for ``help()`` and editors, where ``:class:`Client``` reads
well. The site renders them as Markdown, where the role would show up raw, so this
turns each role into an mkdocs-autorefs link (optional: a target the site does not
document, like ``ssl.SSLContext``, becomes plain code instead of a build warning).
"""

from __future__ import annotations

import html
import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?P<role>class|meth|func|mod|attr|data|exc|obj):`(?P<body>[^`]+)`")
_EXPLICIT = re.compile(r"^(?P<title>.+?)\s*<(?P<target>[^<>]+)>$")
_LINK_TARGET = re.compile(r"^[ \t]*\.\. _(?P<name>[^:\n]+): (?P<url>\S+)[ \t]*(?:\n|$)", re.MULTILINE)
_LINK_USE = re.compile(r"`(?P<name>[^`<>\n]+)`_(?![_\w])")
# "Text::" introduces a literal block in reST; Markdown only needs the indentation.
_LITERAL_INTRO = re.compile(r"(?<=\S)::[ \t]*$", re.MULTILINE)
# A fenced block indented by four spaces is a code block *containing* the fence in
# Markdown; inside a Google section the parser removes that indentation, elsewhere we do.
_INDENTED_FENCE = re.compile(r"^    (```|~~~)[^\n]*\n(?:    [^\n]*\n|[ \t]*\n)*?    \1[ \t]*$", re.MULTILINE)
# An indented doctest outside a Google section: after a list, Markdown would read it
# as part of the last item (and ">>>" as nested quotes), so it becomes a fenced block.
_INDENTED_DOCTEST = re.compile(r"^    >>>[^\n]*(?:\n    [^\n]*\S[^\n]*)*", re.MULTILINE)
_SECTION = re.compile(
    r"^(?:Args|Arguments|Attributes|Example|Examples|Note|Notes|Other Parameters|Parameters|"
    r"Raises|Receives|References|Returns|See Also|Todo|Warning|Warnings|Warns|Yields)\s*:\s*$"
)


def _exists(package: griffe.Module, path: str) -> bool:
    if path == package.path:
        return True
    if not path.startswith(package.path + "."):
        return False
    try:
        package[path[len(package.path) + 1 :]]
    except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
        return False
    return True


def _resolve(package: griffe.Module, obj: griffe.Object, target: str) -> str:
    """The full path of ``target`` as seen from ``obj`` (its class, module, parent packages)."""
    if target.split(".")[0] == package.path:
        return target
    scope: griffe.Object | None = obj if obj.is_class or obj.is_module else obj.parent
    while scope is not None:
        candidate = f"{scope.path}.{target}"
        if _exists(package, candidate):
            return candidate
        scope = scope.parent
    return target


def _rewrite(package: griffe.Module, obj: griffe.Object, text: str) -> str:
    targets = {m["name"]: m["url"] for m in _LINK_TARGET.finditer(text)}
    text = _LINK_TARGET.sub("", text)

    def link(match: re.Match[str]) -> str:
        name = match["name"]
        return f"[{name}]({targets[name]})" if name in targets else match[0]

    def role(match: re.Match[str]) -> str:
        body = match["body"].strip()
        explicit = _EXPLICIT.match(body)
        if explicit:
            title, target = explicit["title"], explicit["target"]
        else:
            target = body.lstrip("~")
            title = target.rsplit(".", 1)[-1] if body.startswith("~") else target
            if match["role"] in ("meth", "func") and not title.endswith(")"):
                title += "()"
        identifier = _resolve(package, obj, target.lstrip("~"))
        return (
            f'<autoref identifier="{html.escape(identifier)}" optional>'
            f"<code>{html.escape(title)}</code></autoref>"
        )

    text = _LINK_USE.sub(link, text)
    text = _ROLE.sub(role, text)
    text = _dedent_blocks(text)
    return _LITERAL_INTRO.sub(":", text)


def _in_section(text: str, start: int) -> bool:
    """Whether the last unindented line before ``start`` is a Google section header."""
    for line in reversed(text[:start].splitlines()):
        if line.strip() and not line.startswith((" ", "\t")):
            return bool(_SECTION.match(line))
    return False


def _dedent_blocks(text: str) -> str:
    def dedent(match: re.Match[str]) -> str:
        if _in_section(text, match.start()):
            return match[0]
        return re.sub(r"^    ", "", match[0], flags=re.MULTILINE)

    def fence(match: re.Match[str]) -> str:
        if _in_section(text, match.start()):
            return match[0]
        return "```pycon\n" + re.sub(r"^    ", "", match[0], flags=re.MULTILINE) + "\n```"

    text = _INDENTED_FENCE.sub(dedent, text)
    return _INDENTED_DOCTEST.sub(fence, text)


def _walk(obj: griffe.Object, seen: set[str]) -> list[griffe.Object]:
    found = [obj]
    seen.add(obj.path)
    for member in obj.members.values():
        if member.is_alias or member.path in seen:
            continue
        found += _walk(member, seen)  # type: ignore[arg-type]
    return found


class RstRoles(griffe.Extension):
    """Rewrite every docstring of a package once it is fully loaded."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        for obj in _walk(pkg, set()):
            if obj.docstring is not None:
                obj.docstring.value = _rewrite(pkg, obj, obj.docstring.value)
