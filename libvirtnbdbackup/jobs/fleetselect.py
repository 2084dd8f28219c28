"""Which domains a fleet run backs up: selectors by name, glob, regular
expression and metadata tag.

A pattern's kind is told by its form:

- ``re:EXPR`` a regular expression, searched in the name (anchor it with
  ``^...$`` to match whole names);
- ``tag:NAME`` domains whose fleet metadata holds that tag;
- ``name:NAME`` exactly that name (for names holding ``*``, ``?`` or ``[``);
- anything with ``*``, ``?`` or ``[`` a shell glob on the name;
- anything else exactly that name.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..errors import UsageError

GLOB_CHARS = frozenset("*?[")


@dataclass(frozen=True)
class Selector:
    kind: str  # name, glob, regex or tag
    pattern: str

    def matches(self, name: str, tags: Iterable[str] = ()) -> bool:
        if self.kind == "name":
            return name == self.pattern
        if self.kind == "glob":
            return fnmatch.fnmatchcase(name, self.pattern)
        if self.kind == "regex":
            return re.search(self.pattern, name) is not None
        return self.pattern in tags

    def __str__(self) -> str:
        prefix = {"regex": "re:", "tag": "tag:"}.get(self.kind, "")
        return prefix + self.pattern


def parse_selector(text: str) -> Selector:
    text = text.strip()
    kind, sep, rest = text.partition(":")
    if sep and kind in ("re", "tag", "name"):
        if not rest:
            raise UsageError(f"selector {text!r} names no {kind}")
        if kind == "re":
            try:
                re.compile(rest)
            except re.error as err:
                raise UsageError(f"selector {text!r}: not a regular expression: {err}") from None
            return Selector("regex", rest)
        return Selector(kind, rest)
    if not text:
        raise UsageError("an empty selector: give a name, a glob, re:EXPR or tag:NAME")
    return Selector("glob" if GLOB_CHARS & set(text) else "name", text)


def parse_selectors(texts: Iterable[str]) -> tuple[Selector, ...]:
    return tuple(parse_selector(t) for t in texts)


@dataclass(frozen=True)
class Selection:
    """``select_all`` or any of ``select``, minus any of ``exclude``."""

    select: tuple[Selector, ...] = ()
    exclude: tuple[Selector, ...] = ()
    select_all: bool = False

    def __add__(self, other: Selection) -> Selection:
        return Selection(
            self.select + other.select,
            self.exclude + other.exclude,
            self.select_all or other.select_all,
        )

    @property
    def is_empty(self) -> bool:
        return not (self.select or self.select_all)

    def chooses(self, name: str, tags: Sequence[str] = ()) -> bool:
        if any(s.matches(name, tags) for s in self.exclude):
            return False
        return self.select_all or any(s.matches(name, tags) for s in self.select)

    def unmatched_names(self, names: Iterable[str]) -> list[str]:
        """Selectors of exact names that match none of ``names``: likely typos."""
        known = set(names)
        return [s.pattern for s in self.select if s.kind == "name" and s.pattern not in known]
