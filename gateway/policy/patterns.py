"""Path patterns: compile once at load, match by walking a segment trie.

Pattern syntax (matched against the *decoded* segments of the guard's canonical path):

* a literal segment matches exactly that segment (case-sensitive);
* ``{name}`` matches exactly one non-empty segment;
* a trailing ``/**`` matches the prefix itself and anything below it (``/**`` alone: every path).

Patterns are compiled into one :class:`PathIndex` per method, so the cost of a lookup grows with
the depth of the path and the number of patterns that really match, not with the number of
rules in the policy.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")

_PARAM = re.compile(r"^\{[A-Za-z_][A-Za-z0-9_]*\}$")
_FORBIDDEN_IN_LITERAL = re.compile(r"[{}*\x00-\x20\x7f/\\;?#%]")


class PatternError(ValueError):
    """A path pattern is malformed; the message says why."""


@dataclass(frozen=True, slots=True)
class Pattern:
    """A compiled path pattern: ``segments`` with ``None`` for a ``{param}``."""

    text: str
    segments: tuple[str | None, ...]
    prefix: bool

    def matches(self, path: tuple[str, ...]) -> bool:
        """True when the decoded path segments match this pattern."""
        n = len(self.segments)
        if len(path) < n or (not self.prefix and len(path) != n):
            return False
        for want, got in zip(self.segments, path):
            if want is None:
                if not got:
                    return False
            elif want != got:
                return False
        return True

    def covers(self, other: Pattern) -> bool:
        """True when every path ``other`` matches is matched by this pattern too."""
        n = len(self.segments)
        if self.prefix:
            if len(other.segments) < n:
                return False
        elif other.prefix or len(other.segments) != n:
            return False
        for want, got in zip(self.segments, other.segments):
            if want is not None and want != got:
                return False
        return True


def compile_pattern(text: str) -> Pattern:
    """Parse ``text`` into a :class:`Pattern` or raise :class:`PatternError`."""
    if not isinstance(text, str) or not text.startswith("/"):
        raise PatternError("a path pattern must be a string starting with '/'")
    if text == "/":
        return Pattern(text, (), False)
    body, prefix = text, False
    if body.endswith("/**"):
        body, prefix = body[:-3], True
    parts = body.split("/")[1:] if body else []
    segments: list[str | None] = []
    for part in parts:
        if part == "":
            raise PatternError("empty segment ('//' or a trailing '/') in path pattern")
        if part in (".", ".."):
            raise PatternError("dot segments are not allowed in path patterns")
        if part.startswith("{"):
            if not _PARAM.fullmatch(part):
                raise PatternError(f"bad parameter segment {part!r}: use {{name}}")
            segments.append(None)
            continue
        if part == "**":
            raise PatternError("'**' is only allowed as the last segment")
        bad = _FORBIDDEN_IN_LITERAL.search(part)
        if bad:
            raise PatternError(f"character {bad.group()!r} is not allowed in segment {part!r}")
        segments.append(part)
    return Pattern(text, tuple(segments), prefix)


@dataclass(slots=True)
class _Node(Generic[T]):
    literal: dict[str, _Node[T]] = field(default_factory=dict)
    param: _Node[T] | None = None
    exact: list[T] = field(default_factory=list)
    below: list[T] = field(default_factory=list)


class PathIndex(Generic[T]):
    """Maps patterns to payloads; :meth:`match` returns the payloads of every matching pattern."""

    __slots__ = ("_root", "size")

    def __init__(self) -> None:
        self._root: _Node[T] = _Node()
        self.size = 0

    def add(self, pattern: Pattern, payload: T) -> None:
        """Register ``payload`` under ``pattern``."""
        node = self._root
        for seg in pattern.segments:
            if seg is None:
                if node.param is None:
                    node.param = _Node()
                node = node.param
            else:
                nxt = node.literal.get(seg)
                if nxt is None:
                    nxt = node.literal[seg] = _Node()
                node = nxt
        (node.below if pattern.prefix else node.exact).append(payload)
        self.size += 1

    def match(self, path: tuple[str, ...]) -> list[T]:
        """Every payload whose pattern matches the decoded ``path`` segments."""
        out: list[T] = []
        self._walk(self._root, path, 0, out)
        return out

    def _walk(self, node: _Node[T], path: tuple[str, ...], i: int, out: list[T]) -> None:
        if node.below:
            out.extend(node.below)
        if i == len(path):
            out.extend(node.exact)
            return
        seg = path[i]
        nxt = node.literal.get(seg)
        if nxt is not None:
            self._walk(nxt, path, i + 1, out)
        if node.param is not None and seg:
            self._walk(node.param, path, i + 1, out)

    def __iter__(self) -> Iterator[T]:
        stack = [self._root]
        while stack:
            node = stack.pop()
            yield from node.exact
            yield from node.below
            stack.extend(node.literal.values())
            if node.param is not None:
                stack.append(node.param)
