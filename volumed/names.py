"""Rules for volume names, volume ids and labels: pure, no I/O.

Must not import anything heavier than ``re`` (and ``volumed.text``): the CLI checks names
before it talks to boxvold.
"""

from __future__ import annotations

import re

from volumed.errors import HostPathRefused, InvalidArgument
from volumed.text import SAFE_TEXT_RULE, UNSAFE_CHARS, TextRule, printable_repr, safe_text_rule

MAX_NAME_CHARS = 64
#: A volume name as the API and the registry take it (ASCII: characters are bytes).
NAME = TextRule(
    "volume name",
    r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
    MAX_NAME_CHARS,
    rule=(
        "a volume name starts with a letter or digit, continues with letters, digits, '_', "
        f"'.' or '-', is at most {MAX_NAME_CHARS} characters long, and is not shaped like a "
        "volume id (a 26-character ULID)"
    ),
)
NAME_RULE = NAME.rule
# Crockford base32 as ULIDs use it; the first character is at most 7 (48-bit timestamp).
_ULID = re.compile(r"[0-7][0-9A-HJKMNP-TV-Za-hjkmnp-tv-z]{25}\Z")
_ID_PREFIX = re.compile(r"[0-9A-HJKMNP-TV-Za-hjkmnp-tv-z]{1,26}\Z")
#: An id prefix shorter than this is not looked up, so a short typo never picks a volume.
MIN_ID_PREFIX = 4
#: A reference to a volume: a name, an id or an id prefix; never anything shaped like a
#: path (no '/', no leading '.' or '~'), which ``check_reference`` refuses as such.
REFERENCE = TextRule(
    "volume reference",
    f"^[^./~{UNSAFE_CHARS}][^/{UNSAFE_CHARS}]*$",
    MAX_NAME_CHARS,
    rule=(
        f"a volume name, id or id prefix: 1 to {MAX_NAME_CHARS} characters, no '/', not "
        f"starting with '.' or '~', {SAFE_TEXT_RULE}"
    ),
)
#: A listing's name filter: a substring of names (or of ids, for anonymous volumes).
NAME_FILTER = safe_text_rule("name filter", MAX_NAME_CHARS)

MAX_LABEL_KEY_CHARS = 128
MAX_LABEL_VALUE_CHARS = 4096
MAX_LABELS = 64
LABEL_KEY = TextRule(
    "label key",
    r"^[A-Za-z0-9][A-Za-z0-9_./-]*$",
    MAX_LABEL_KEY_CHARS,
    rule=(
        "a label key starts with a letter or digit and continues with letters, digits, "
        f"'_', '.', '-' or '/' (at most {MAX_LABEL_KEY_CHARS} characters)"
    ),
)
LABEL_VALUE = safe_text_rule("label value", MAX_LABEL_VALUE_CHARS, min_chars=0)
LABEL_RULE = f"{LABEL_KEY.rule}; a value is {LABEL_VALUE.rule}"
#: A listing's label filter: ``KEY`` or ``KEY=VALUE`` (each part then follows its rule).
LABEL_FILTER = safe_text_rule("label filter", MAX_LABEL_KEY_CHARS + 1 + MAX_LABEL_VALUE_CHARS)
#: Label filters one listing takes (each is one more condition for SQLite to evaluate).
MAX_LABEL_FILTERS = 16
#: Who an anonymous volume (or a FUSE export) belongs to: free text for people and tools.
CONSUMER = safe_text_rule("consumer", 256)


def is_volume_id(text: str) -> bool:
    """True if ``text`` is shaped like a volume id (a ULID, any case)."""
    return _ULID.match(text) is not None


def is_id_prefix(text: str) -> bool:
    """True if ``text`` could be the start of a volume id and is long enough to look up."""
    return len(text) >= MIN_ID_PREFIX and _ID_PREFIX.match(text) is not None


def check_reference(ref: str) -> str:
    """Return ``ref`` if it can name a volume; one shaped like a path is refused as one."""
    if isinstance(ref, str) and ("/" in ref or ref.startswith((".", "~"))):
        raise HostPathRefused(
            f"{printable_repr(ref)} looks like a path: volumes are referenced by name or id, "
            "never by path; list them with 'boxvol ls'"
        )
    return REFERENCE.check(ref)


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid volume name, else raise InvalidArgument."""
    NAME.check(name)
    if is_volume_id(name):
        raise InvalidArgument(f"invalid volume name {name!r}: {NAME_RULE}")
    return name


def is_valid_name(name: str) -> bool:
    """True if ``name`` passes ``check_name``."""
    return NAME.matches(name) and not is_volume_id(name)


def check_labels(labels: dict[str, str]) -> dict[str, str]:
    """Return ``labels`` if every key and value follows LABEL_RULE, else raise."""
    if not isinstance(labels, dict):
        raise InvalidArgument(f"labels must map keys to values: {LABEL_RULE}")
    if len(labels) > MAX_LABELS:
        raise InvalidArgument(f"too many labels ({len(labels)}): at most {MAX_LABELS}")
    for key, value in labels.items():
        LABEL_KEY.check(key)
        if not LABEL_VALUE.matches(value):
            raise InvalidArgument(
                f"invalid value for label {printable_repr(key)}: {LABEL_VALUE.rule}"
            )
    return labels


def parse_label(text: str) -> tuple[str, str]:
    """Split a ``KEY=VALUE`` (or bare ``KEY``, meaning an empty value) label argument."""
    key, _, value = text.partition("=")
    check_labels({key: value})
    return key, value
