"""The row filters of ``polish.normalize``: the text a row is judged by, ``min_chars`` and ``language: pl``.

- ``min_chars``: rows whose text (all fields of the format together) is shorter are dropped;
- ``language: pl``: rows that are clearly not Polish are dropped (Polish diacritics and stop words vs English
  stop words and other languages' diacritics; rows too short to tell are kept).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

FORMAT_FIELDS = {
    "alpaca": ("system", "instruction", "input", "output"),
    "completion": ("prompt", "completion"),
}


def row_text(
    row: Mapping[str, Any], fmt: str, columns: Mapping[str, str] | None = None, text_column: str = "text"
) -> str:
    """All text of a row that the model will see, fields joined by newlines (template text excluded)."""
    mapping = columns or {}

    def get(name: str) -> Any:
        return row.get(mapping.get(name, name), row.get(name))

    if fmt == "text":
        value = get(text_column)
        return value if isinstance(value, str) else ""
    if fmt == "chat":
        turns = get("messages")
        if turns is None:
            turns = get("conversations")
        if not isinstance(turns, list):
            return ""
        parts = [t.get("content", t.get("value")) for t in turns if isinstance(t, Mapping)]
        return "\n".join(p for p in parts if isinstance(p, str))
    parts = [get(name) for name in FORMAT_FIELDS.get(fmt, ())]
    return "\n".join(p for p in parts if isinstance(p, str) and p)


POLISH_LETTERS = frozenset("ąćęłńóśźż")
# diacritics of other Latin-script languages (Czech, Slovak, German, French, Spanish, ...), not used in Polish
OTHER_DIACRITICS = frozenset("áàâäãåčďéèêëěíìîïňñôöõřšťúùûüůýÿžçßœæøđğış")
_POLISH_STOP_TEXT = (
    "w z na się nie że jest od po za dla czy jak ale co tak już oraz przez gdy może tylko który która które "
    "było była był są być jako jego jej ich tym tego tej ten ta te także również bardzo więc bo gdzie kiedy "
    "jestem sobie ze we ku dlaczego proszę jaki jaka jakie lub albo aby żeby ponieważ można trzeba tutaj tu "
    "jeśli jeżeli nawet mnie mi ci nam wam im pod nad przed między bez przy u też jeszcze np ma mają wiele"
)
POLISH_STOPWORDS = frozenset(_POLISH_STOP_TEXT.split())
_ENGLISH_STOP_TEXT = (
    "the and of is in that it for you was with as are be this have from or by not but what all were when "
    "there can an your which their if will each about how up out them then she many some so these would "
    "has her two like him into time could did my than been who its now people over"
)
ENGLISH_STOPWORDS = frozenset(_ENGLISH_STOP_TEXT.split())
_WORD = re.compile(r"[^\W\d_]+")
MIN_LETTERS_TO_JUDGE = 20


_POLISH_RE = re.compile("[ąćęłńóśźż]")
_OTHER_RE = re.compile("[" + "".join(sorted(OTHER_DIACRITICS)) + "]")
_LATIN_RE = re.compile("[a-z\u00c0-\u024f]")


def language_signals(text: str) -> dict[str, float]:
    """Shares used by the Polish check: Latin letters, Polish/other diacritics (of letters), stop words (of words)."""
    low = text.lower()
    words = _WORD.findall(low)
    letters = sum(map(len, words))
    if not letters:
        return {
            "letters": 0,
            "words": 0,
            "latin": 0.0,
            "pl_diacritics": 0.0,
            "other_diacritics": 0.0,
            "pl_stop": 0.0,
            "en_stop": 0.0,
        }
    return {
        "letters": letters,
        "words": len(words),
        "latin": len(_LATIN_RE.findall(low)) / letters,
        "pl_diacritics": len(_POLISH_RE.findall(low)) / letters,
        "other_diacritics": len(_OTHER_RE.findall(low)) / letters,
        "pl_stop": sum(w in POLISH_STOPWORDS for w in words) / len(words),
        "en_stop": sum(w in ENGLISH_STOPWORDS for w in words) / len(words),
    }


def is_polish(text: str) -> bool | None:
    """True/False for text long enough to judge (≥ 20 letters), None otherwise (such rows are kept).

    Polish: Polish letters (ą ć ę ł ń ś ź ż ó) or Polish stop words. Not Polish: another script, or no Polish
    signal and English stop words or other languages' diacritics. Text with no signal either way is kept.
    """
    s = language_signals(text)
    if s["letters"] < MIN_LETTERS_TO_JUDGE:
        return None
    if s["latin"] < 0.6:
        return False  # mostly another script (Cyrillic, Greek, CJK, ...)
    if s["pl_diacritics"] >= 0.01 and s["other_diacritics"] <= s["pl_diacritics"]:
        return True
    if s["pl_stop"] >= 0.1 and s["pl_stop"] > s["en_stop"] and s["other_diacritics"] < 0.01:
        return True
    # no Polish signal: drop only on evidence of another language (English stop words, other diacritics)
    english = s["en_stop"] >= 0.1 and s["en_stop"] > s["pl_stop"]
    other = s["other_diacritics"] >= 0.01 and s["other_diacritics"] > s["pl_diacritics"]
    return not (english or other)


def drop_reason(text: str, spec: Any) -> str | None:
    """Why a row with this text is dropped (``too_short``, ``not_polish``), or None to keep it."""
    if spec.min_chars and len(text.strip()) < spec.min_chars:
        return "too_short"
    if spec.language == "pl" and is_polish(text) is False:
        return "not_polish"
    return None
