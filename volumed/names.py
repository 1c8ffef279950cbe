"""Rules for volume names, volume ids and labels: pure, no I/O.

Must not import anything heavier than ``re``: the CLI checks names before it talks to
boxvold.
"""

from __future__ import annotations

import re

from volumed.errors import InvalidArgument

MAX_NAME_BYTES = 64
NAME_RULE = (
    "a volume name starts with a letter or digit, continues with letters, digits, '_', '.' "
    f"or '-', is at most {MAX_NAME_BYTES} bytes long, and is not shaped like a volume id "
    "(a 26-character ULID)"
)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")
# Crockford base32 as ULIDs use it; the first character is at most 7 (48-bit timestamp).
_ULID = re.compile(r"[0-7][0-9A-HJKMNP-TV-Za-hjkmnp-tv-z]{25}\Z")
_ID_PREFIX = re.compile(r"[0-9A-HJKMNP-TV-Za-hjkmnp-tv-z]{1,26}\Z")
#: An id prefix shorter than this is not looked up, so a short typo never picks a volume.
MIN_ID_PREFIX = 4

MAX_LABEL_KEY_BYTES = 128
MAX_LABEL_VALUE_BYTES = 4096
MAX_LABELS = 64
LABEL_RULE = (
    "a label key starts with a letter or digit and continues with letters, digits, "
    f"'_', '.', '-' or '/' (at most {MAX_LABEL_KEY_BYTES} bytes); a value is at most "
    f"{MAX_LABEL_VALUE_BYTES} bytes without control characters"
)
_LABEL_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_./-]*\Z")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def is_volume_id(text: str) -> bool:
    """True if ``text`` is shaped like a volume id (a ULID, any case)."""
    return _ULID.match(text) is not None


def is_id_prefix(text: str) -> bool:
    """True if ``text`` could be the start of a volume id and is long enough to look up."""
    return len(text) >= MIN_ID_PREFIX and _ID_PREFIX.match(text) is not None


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid volume name, else raise InvalidArgument."""
    if (
        not isinstance(name, str)
        or not _NAME.match(name)
        or len(name.encode()) > MAX_NAME_BYTES
        or is_volume_id(name)
    ):
        raise InvalidArgument(f"invalid volume name {name!r}: {NAME_RULE}")
    return name


def is_valid_name(name: str) -> bool:
    """True if ``name`` passes ``check_name``."""
    try:
        check_name(name)
    except InvalidArgument:
        return False
    return True


def check_labels(labels: dict[str, str]) -> dict[str, str]:
    """Return ``labels`` if every key and value follows LABEL_RULE, else raise."""
    if len(labels) > MAX_LABELS:
        raise InvalidArgument(f"too many labels ({len(labels)}): at most {MAX_LABELS}")
    for key, value in labels.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidArgument(f"label {key!r} is not a string pair: {LABEL_RULE}")
        if not _LABEL_KEY.match(key) or len(key.encode()) > MAX_LABEL_KEY_BYTES:
            raise InvalidArgument(f"invalid label key {key!r}: {LABEL_RULE}")
        if _CONTROL.search(value) or len(value.encode()) > MAX_LABEL_VALUE_BYTES:
            raise InvalidArgument(f"invalid value for label {key!r}: {LABEL_RULE}")
    return labels


def parse_label(text: str) -> tuple[str, str]:
    """Split a ``KEY=VALUE`` (or bare ``KEY``, meaning an empty value) label argument."""
    key, _, value = text.partition("=")
    check_labels({key: value})
    return key, value
