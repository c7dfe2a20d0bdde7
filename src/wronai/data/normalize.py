"""Text normalization of ``polish.normalize``: Unicode NFC, quotes, dashes and spaces, over every string of a row.

Typographic quotes become straight or Polish „…” quotes; dash and minus variants are unified; odd spaces
(no-break, thin, zero-width, soft hyphen) are replaced or removed and repeated spaces collapsed (indentation at
line starts is kept). Each string field of a row is normalized, messages' contents included.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping
from typing import Any

DOUBLE_QUOTES = "\u201e\u201c\u201d\u201f\u00ab\u00bb\u2033\u301d\u301e\uff02"  # „ “ ” ‟ « » ″ 〝 〞 ＂
SINGLE_QUOTES = "\u201a\u2018\u2019\u201b\u2039\u203a\u2032"  # ‚ ‘ ’ ‛ ‹ › ′
DASHES = "\u2012\u2013\u2014\u2015\u2e3a\u2e3b\ufe58"  # ‒ – — ― ⸺ ⸻ ﹘
HYPHENS = "\u2010\u2011\u2212\ufe63\uff0d"  # ‐ ‑ − ﹣ －
ODD_SPACES = (
    "\u00a0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u202f\u205f\u3000\t\v\f"
)
INVISIBLE = "\u200b\u2060\ufeff\u00ad"  # zero-width space, word joiner, BOM, soft hyphen
_OPENING_CONTEXT = " \n([{\u2013\u2014-/"

_MULTI_SPACE = re.compile(r"(?<=\S) {2,}")
_TRAILING_SPACE = re.compile(r" +\n")
_MANY_NEWLINES = re.compile(r"\n{3,}")
_STRAIGHT_DOUBLE = re.compile('"')


def translation_table(
    quotes: bool, quote_style: str, dashes: bool, dash_style: str, spaces: bool
) -> dict[int, str | None]:
    """One ``str.translate`` table for the character-level steps."""
    table: dict[int, str | None] = {}
    if quotes:
        if quote_style == "straight":
            table.update({ord(c): '"' for c in DOUBLE_QUOTES})
            table.update({ord(c): "'" for c in SINGLE_QUOTES})
        else:  # polish: every double quote becomes '"' first, then „ / ” by position (see polish_quotes)
            table.update({ord(c): '"' for c in DOUBLE_QUOTES})
    if dashes:
        table.update({ord(c): "-" for c in HYPHENS})
        table.update({ord(c): ("-" if dash_style == "hyphen" else "\u2013") for c in DASHES})
    if spaces:
        table.update({ord(c): " " for c in ODD_SPACES if c != "\t"})
        table.update({ord(c): None for c in INVISIBLE})
    return table


def polish_quotes(text: str) -> str:
    """Straight double quotes as Polish „…”: opening after a space, line start or bracket, closing elsewhere."""
    if '"' not in text:
        return text

    def pick(match: re.Match) -> str:
        i = match.start()
        return "\u201e" if i == 0 or text[i - 1] in _OPENING_CONTEXT else "\u201d"

    return _STRAIGHT_DOUBLE.sub(pick, text)


def collapse_spaces(text: str) -> str:
    """Windows/Mac newlines to \\n, repeated spaces inside a line to one, trailing spaces and 3+ newlines removed."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if "  " in text:
        text = _MULTI_SPACE.sub(" ", text)
    if " \n" in text:
        text = _TRAILING_SPACE.sub("\n", text)
    if "\n\n\n" in text:
        text = _MANY_NEWLINES.sub("\n\n", text)
    return text.strip()


class TextNormalizer:
    """``polish.normalize`` as a callable str -> str (built once; the translate table is reused)."""

    def __init__(self, spec: Any) -> None:
        self.nfc = spec.nfc
        self.polish_quotes = spec.quotes and spec.quote_style == "polish"
        self.spaces = spec.spaces
        self.table = translation_table(
            spec.quotes, spec.quote_style, spec.dashes, spec.dash_style, spec.spaces
        )

    def __call__(self, text: str) -> str:
        if self.nfc and not unicodedata.is_normalized("NFC", text):
            text = unicodedata.normalize("NFC", text)
        if self.table:
            text = text.translate(self.table)
        if self.polish_quotes:
            text = polish_quotes(text)
        if self.spaces:
            text = collapse_spaces(text)
        return text


def normalize_value(value: Any, fn: TextNormalizer) -> Any:
    """Strings normalized; lists and dicts (e.g. chat messages) walked; other values unchanged."""
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, list):
        return [normalize_value(v, fn) for v in value]
    if isinstance(value, dict):
        return {k: (v if k in ("role", "from") else normalize_value(v, fn)) for k, v in value.items()}
    return value


def normalize_row(row: Mapping[str, Any], fn: TextNormalizer) -> dict[str, Any]:
    """Every field of a row normalized, except bookkeeping fields (``_file``, ``_row``)."""
    return {k: (v if k.startswith("_") else normalize_value(v, fn)) for k, v in row.items()}
