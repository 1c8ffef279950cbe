"""volumed.text: the one rule per text field, the unsafe characters, and terminal output."""

from __future__ import annotations

import io
import re
import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from volumed.errors import InvalidArgument
from volumed.exports import TAG, VM_NAME
from volumed.names import CONSUMER, LABEL_KEY, LABEL_VALUE, NAME, REFERENCE
from volumed.text import SAFE_TEXT, is_safe, print_table, printable, printable_repr

UNSAFE = ["\x00", "\x1b", "\r", "\n", "\x7f", "\x85", "\x9b", "\u202e", "\u2066", "\u200f"]
UNSAFE += ["\u061c", "\u2028", "\u2029", "\ud800", "\udfff"]
RULES = [NAME, REFERENCE, CONSUMER, LABEL_KEY, LABEL_VALUE, TAG, VM_NAME]


@pytest.mark.parametrize("bad", UNSAFE)
@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.what)
def test_every_rule_refuses_every_unsafe_character(rule: object, bad: str) -> None:
    assert not rule.matches(f"a{bad}b")  # type: ignore[attr-defined]
    with pytest.raises(InvalidArgument) as caught:
        rule.check(f"a{bad}b")  # type: ignore[attr-defined]
    assert is_safe(caught.value.message), "the message itself must be safe to print"


def test_every_control_and_bidi_character_is_unsafe() -> None:
    for code in range(0x110000):
        char = chr(code)
        category = unicodedata.category(char)
        if (
            category in ("Cc", "Cs")
            or unicodedata.bidirectional(char)
            in ("LRE", "RLE", "LRO", "RLO", "PDF", "LRI", "RLI", "FSI", "PDI")
            or char in "\u200e\u200f\u061c\u2028\u2029"
        ):
            assert not is_safe(char), hex(code)


@settings(max_examples=300, derandomize=True)
@given(st.text(min_size=1, max_size=80))
def test_the_documented_pattern_and_the_check_agree(text: str) -> None:
    for rule in RULES:
        documented = (
            rule.min_chars <= len(text) <= rule.max_chars
            and re.fullmatch(rule.pattern, text) is not None
            and not any(0xD800 <= ord(c) <= 0xDFFF for c in text)
        )
        assert rule.matches(text) == documented


def test_printable_escapes_what_a_terminal_would_act_on() -> None:
    assert printable("plain café") == "plain café"
    assert printable("a\x1b[31mb") == "a\\x1b[31mb"
    assert printable("x\u202ey") == "x\\u202ey"
    assert printable("back\\slash\x07") == "back\\\\slash\\x07"
    assert printable_repr("a\x85\u2066") == "'a\\x85\\u2066'"


def test_tables_escape_every_cell() -> None:
    out = io.StringIO()
    print_table([["vol\x1b]0;owned\x07", "\u202eevil"]], ["NAME", "LABELS"], out)
    text = out.getvalue()
    assert is_safe(text.replace("\n", "")) and "\x1b" not in text
    assert text.splitlines()[1].startswith("vol\\x1b]0;owned\\x07")


def test_safe_text_is_one_pattern_for_python_and_json_schema() -> None:
    assert SAFE_TEXT.startswith("^[^") and SAFE_TEXT.endswith("]*$")
    assert "\\ud800" not in SAFE_TEXT  # Rust-based OpenAPI tools cannot read a surrogate
