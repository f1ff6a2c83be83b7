"""Griffe extension: render the Sphinx markup of bpttjax's docstrings as Markdown.

The docstrings are Google style with Sphinx cross-reference roles, which read
well in ``help()``. For the docs site this turns

* ``:class:`~bpttjax.StoreAll``` (and ``:func:``, ``:meth:``, ``:mod:``,
  ``:attr:``, ``:data:``) into an autorefs link ``[`StoreAll`][bpttjax.StoreAll]``,
  resolving names relative to the object and its parents, so that a name
  that does not exist fails ``mkdocs build --strict``;
* reStructuredText links (`` `text <url>`_ ``) into Markdown links;
* a paragraph ending in ``::`` (a literal block follows) into one ending in ``:``;
* a "Returns:" section's prose, so that it is not split at its first colon
  into a type and a description (the type comes from the signature).

Only the text given to the Markdown renderer changes; the source is untouched.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(class|func|meth|mod|attr|data|obj|exc):`(~?)([\w.]+)`")
_RST_LINK = re.compile(r"`([^`<>]+?)\s*<(https?://[^>]+)>`__?")
_LITERAL = re.compile(r"(\S)::$", re.MULTILINE)
_RETURNS = re.compile(r"^([ \t]*(?:Returns|Yields):[ \t]*\n[ \t]+)(?=\S)", re.MULTILINE)


def _exists(collection: Any, path: str) -> bool:
    try:
        collection[path]
    except (KeyError, ValueError, griffe.AliasResolutionError, griffe.CyclicAliasError):
        return False
    return True


def _has_docstring(collection: Any, path: str) -> bool:
    try:
        return collection[path].docstring is not None
    except (KeyError, ValueError, griffe.AliasResolutionError, griffe.CyclicAliasError):
        return False


def _public(collection: Any, path: str) -> str:
    """Where ``path`` is documented: the site renders public modules only, so a
    name found in a private module (``bpttjax.cells._registry.rnn``) links to the
    innermost public module that has it (``bpttjax.cells.rnn``)."""
    parts = path.split(".")
    if not any(p.startswith("_") for p in parts[:-1]):
        return path
    public = [p for p in parts[:-1] if not p.startswith("_")]
    for i in range(len(public), 0, -1):
        candidate = ".".join([*public[:i], parts[-1]])
        if _exists(collection, candidate):
            return candidate
    return path


def _resolve(obj: griffe.Object, name: str) -> str:
    """The full path of ``name`` as seen from ``obj``'s scope (innermost first),
    then in the package's public modules; always a path the site documents."""
    collection = obj.modules_collection
    if _exists(collection, name):
        return _public(collection, name)
    scope: Any = obj
    while scope is not None:
        candidate = f"{scope.path}.{name}"
        if _exists(collection, candidate):
            return _public(collection, candidate)
        scope = scope.parent
    package = obj.package
    for module in [package, *package.modules.values()]:
        candidate = f"{module.path}.{name}"
        if not module.name.startswith("_") and _exists(collection, candidate):
            return candidate
    # Unresolved: link it anyway, so that autorefs reports it.
    if name.split(".")[0] == package.name:
        return name
    return f"{obj.module.path}.{name}"


def _convert(obj: griffe.Object, text: str) -> str:
    def role(match: re.Match) -> str:
        kind, tilde, name = match.groups()
        path = _resolve(obj, name)
        collection = obj.modules_collection
        if kind == "attr" and _exists(collection, path) and not _has_docstring(collection, path):
            # Documented in its class's "Attributes:" table, which has no anchors.
            path = path.rsplit(".", 1)[0]
        shown = name.rsplit(".", 1)[-1] if tilde else name
        return f"[`{shown}`][{path}]"

    text = _ROLE.sub(role, text)
    text = _RST_LINK.sub(r"[\1](\2)", text)
    # "Returns:" holds prose; an empty type before a colon keeps griffe from
    # reading the prose up to its first colon as the type.
    text = _RETURNS.sub(r"\1: ", text)
    return _LITERAL.sub(r"\1:", text)


class SphinxRoles(griffe.Extension):
    """Rewrite the docstrings of every object in the loaded package."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        seen: set[str] = set()

        def visit(obj: griffe.Object) -> None:
            if obj.path in seen:
                return
            seen.add(obj.path)
            if obj.docstring is not None:
                obj.docstring.value = _convert(obj, obj.docstring.value)
            for member in obj.members.values():
                if not member.is_alias:
                    visit(member)

        visit(pkg)
