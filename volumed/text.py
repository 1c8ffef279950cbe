"""Rules for the text boxvol takes (names, labels, consumers, tags) and shows on a terminal.

One rule, one place: each field's rule is a ``TextRule`` whose pattern is both what the code
checks (Python ``re``, whole string) and what the OpenAPI document states (JSON Schema
``pattern``, ECMA-262), so a generated client knows exactly what the daemon accepts.

No text field may hold a control character (C0, DEL, C1), a lone surrogate (JSON can spell
one, UTF-8 cannot store it), or a character that reorders or hides text on a terminal (bidi
marks, embeddings, overrides and isolates; line and paragraph separators): such text could
make ``boxvol ls`` show something other than what is stored. ``printable`` escapes the same
characters wherever the CLI prints text that came from elsewhere. Pure: no I/O, and cheap
to import (the CLI checks names and prints tables with it).
"""

from __future__ import annotations

import re

from volumed.errors import InvalidArgument

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: the CLI imports this module on every run
if TYPE_CHECKING:
    from typing import TextIO

#: The characters no text field may hold, as a regular-expression class body that Python,
#: ECMA-262 and the Rust regex engines of OpenAPI tools read alike.
UNSAFE_CHARS = r"\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069"
#: Any text without those characters.
SAFE_TEXT = f"^[^{UNSAFE_CHARS}]*$"
#: Lone surrogates are refused on top of every pattern. They are not Unicode scalar values:
#: no conforming client sends one (JSON can only spell it as an escape), and no regex dialect
#: but Python's can name them, so the OpenAPI patterns leave them out.
_SURROGATES = r"\ud800-\udfff"
_SURROGATE = re.compile(f"[{_SURROGATES}]")
_UNSAFE = re.compile(f"[{UNSAFE_CHARS}{_SURROGATES}]")
SAFE_TEXT_RULE = "no control characters, lone surrogates or bidirectional-formatting characters"


class TextRule:
    """What one text field accepts: a length range in characters and a pattern.

    A plain class, not a dataclass: the CLI imports this module on every run, and
    ``dataclasses`` (through ``inspect``) would add about 10 ms to each.

    Attributes:
        what: the field as a message names it ("volume name").
        pattern: anchored regular expression the whole value must match.
        max_chars: longest value, in characters (code points), as JSON Schema counts.
        min_chars: shortest value.
        rule: the rule in words, for error messages and the API's documentation.
    """

    __slots__ = ("max_chars", "min_chars", "pattern", "rule", "what")

    def __init__(
        self,
        what: str,
        pattern: str,
        max_chars: int,
        min_chars: int = 1,
        rule: str = SAFE_TEXT_RULE,
    ) -> None:
        self.what = what
        self.pattern = pattern
        self.max_chars = max_chars
        self.min_chars = min_chars
        self.rule = rule

    def matches(self, text: object) -> bool:
        """True if ``text`` is a string this rule accepts."""
        return (
            isinstance(text, str)
            and self.min_chars <= len(text) <= self.max_chars
            and re.fullmatch(self.pattern, text) is not None
            and _SURROGATE.search(text) is None
        )

    def check(self, text: object) -> str:
        """Return ``text`` if the rule accepts it, else raise InvalidArgument stating it."""
        if not self.matches(text):
            raise InvalidArgument(f"invalid {self.what} {printable_repr(text)}: {self.rule}")
        assert isinstance(text, str)
        return text

    def json_schema(self) -> dict[str, object]:
        """The rule as JSON Schema keywords of a string."""
        schema: dict[str, object] = {
            "type": "string",
            "maxLength": self.max_chars,
            "pattern": self.pattern,
            "description": self.rule,
        }
        if self.min_chars:
            schema["minLength"] = self.min_chars
        return schema


def safe_text_rule(what: str, max_chars: int, *, min_chars: int = 1) -> TextRule:
    """A rule for free text: any safe characters, ``min_chars`` to ``max_chars`` of them."""
    return TextRule(
        what,
        SAFE_TEXT,
        max_chars,
        min_chars,
        f"{min_chars} to {max_chars} characters, {SAFE_TEXT_RULE}",
    )


def is_safe(text: str) -> bool:
    """True if ``text`` holds none of the characters no text field may hold."""
    return _UNSAFE.search(text) is None


def printable(text: str) -> str:
    """``text`` with every unsafe character (and backslash) escaped, for a terminal."""
    if is_safe(text) and "\\" not in text:
        return text
    return _UNSAFE.sub(_escape, text.replace("\\", "\\\\"))


def printable_repr(value: object) -> str:
    """``repr(value)`` safe for a terminal (repr leaves some characters raw, e.g. C1)."""
    return _UNSAFE.sub(_escape, repr(value))


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def print_table(rows: list[list[str]], headers: list[str], out: TextIO) -> None:
    """Left-aligned columns separated by two spaces, as docker and podman print them; every
    cell passes through ``printable``, so no stored text reaches the terminal raw."""
    shown = [[printable(cell) for cell in row] for row in [headers, *rows]]
    widths = [max(len(row[i]) for row in shown) for i in range(len(headers))]
    for row in shown:
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n")
