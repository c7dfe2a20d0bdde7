"""Polish text hygiene (``polish.normalize``): normalization, duplicate removal, length and language filters.

Everything here is a pure function or a small stateful filter over rows (dicts). ``clean_rows`` applies the
configured steps to the rows of one or more sources in order and returns the kept rows plus a count per step.

- normalization (each string field of a row, messages' contents included): Unicode NFC; typographic quotes
  to straight or Polish „…” quotes; dash and minus variants unified; odd spaces (no-break, thin, zero-width,
  soft hyphen) replaced or removed, repeated spaces collapsed (indentation at line starts is kept);
- ``min_chars``: rows whose text (all fields of the format together) is shorter are dropped;
- ``language: pl``: rows that are clearly not Polish are dropped (Polish diacritics and stop words vs English
  stop words and other languages' diacritics; rows too short to tell are kept);
- ``dedupe: exact`` drops rows whose normalized text was seen before; ``near`` additionally drops rows whose
  character-shingle Jaccard similarity to a kept row is at least ``near_threshold`` (MinHash + LSH, numpy).
"""

from __future__ import annotations

import hashlib
import logging
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

# --- normalization -------------------------------------------------------------------------------------------

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


# --- the text a row is judged by -----------------------------------------------------------------------------

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


# --- language ------------------------------------------------------------------------------------------------

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


# --- duplicates ----------------------------------------------------------------------------------------------

NUM_BUCKETS = 64  # MinHash values per text (one-permutation hashing into 64 buckets)
_PAD = b"\0" * 16
_M1, _M2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9)
_EMPTY = np.uint32(0xFFFFFFFF)
_SLACK = 0.2  # estimated similarity this far below the threshold still gets the exact check


def exact_key(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def lsh_bands(threshold: float, num_perm: int = NUM_BUCKETS) -> tuple[int, int]:
    """(bands, rows per band): the most selective split that still finds ≥ 98% of pairs at the threshold."""
    best = (num_perm, 1)
    for rows in (1, 2, 4, 8, 16, 32, 64):
        bands = num_perm // rows
        if bands * rows == num_perm and 1 - (1 - threshold**rows) ** bands >= 0.98:
            best = (bands, rows)
    return best


def _mix(h: np.ndarray) -> np.ndarray:
    h = h * _M1
    h ^= h >> np.uint64(29)
    h *= _M2
    h ^= h >> np.uint64(32)
    return h


def shingle_hashes(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """64-bit hashes of each text's word-anchored shingles (16 UTF-8 bytes from each word start; lowercased, spacing ignored).

    Returns (hashes, owner): ``owner[i]`` is the index of the text that shingle i belongs to. Fully vectorized:
    the texts are joined into one byte buffer, word starts found with numpy, the 16 bytes read as two uint64.
    """
    encoded = [" ".join(t.lower().split()).encode("utf-8") for t in texts]
    lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)) + len(_PAD)
    data = _PAD + _PAD.join(encoded) + _PAD * 2
    buf = np.frombuffer(data, dtype=np.uint8)
    starts = (
        np.flatnonzero((buf[1:] > 32) & (buf[:-1] <= 32)) + 1
    )  # a byte ≤ 32 is a separator (space, \n, \0)
    starts = starts[starts < len(data) - 16]
    n = len(data) - 7
    words = np.ndarray((n,), dtype="<u8", buffer=data, offset=0, strides=(1,))
    hashes = _mix(words[starts] ^ _mix(words[starts + 8]))
    row_ends = np.cumsum(lengths) + len(_PAD)
    owner = np.searchsorted(row_ends, starts, side="right")
    return hashes, owner


def minhash_signatures(texts: list[str], num_buckets: int = NUM_BUCKETS) -> np.ndarray:
    """(len(texts), num_buckets) uint32 one-permutation MinHash signatures, densified (no empty buckets).

    Each shingle hash picks a bucket (top 6 bits) and a value (low 32 bits); a text's signature is the minimum
    value per bucket. Empty buckets copy the next non-empty bucket (circularly), so similar texts still agree.
    """
    return signatures(*shingle_hashes(texts), len(texts), num_buckets)


def signatures(hashes: np.ndarray, owner: np.ndarray, n: int, num_buckets: int = NUM_BUCKETS) -> np.ndarray:
    """The signatures of :func:`minhash_signatures` from precomputed shingle hashes."""
    sig = np.full((n, num_buckets), _EMPTY, dtype=np.uint32)
    if len(hashes):
        bits = np.uint64(64 - int(np.log2(num_buckets)))
        flat = owner.astype(np.intp) * num_buckets + (hashes >> bits).astype(np.intp)
        np.minimum.at(sig.reshape(-1), flat, (hashes & np.uint64(0xFFFFFFFE)).astype(np.uint32))
    doubled = np.concatenate([sig, sig], axis=1)
    reverse = np.where(
        doubled[:, ::-1] != _EMPTY, np.arange(2 * num_buckets - 1, -1, -1), 2 * num_buckets - 1
    )
    nearest = np.minimum.accumulate(reverse, axis=1)[:, : num_buckets - 1 : -1]
    distance = (nearest - np.arange(num_buckets)).astype(np.uint32)
    # a borrowed value is shifted by its distance, so two texts agree there only when their empty buckets agree too
    return np.take_along_axis(doubled, nearest, axis=1) + distance * np.uint32(0x9E3779B1)


def duplicate_flags(texts: list[str], mode: str, threshold: float = 0.9) -> list[str | None]:
    """For each text: None to keep it, or ``exact``/``near`` when it duplicates an earlier text.

    ``exact``: same normalized text (blake2b of it). ``near``: texts whose MinHash-estimated Jaccard similarity
    of shingles is ≥ ``threshold`` are linked (candidates from LSH bands); of each group of linked texts the
    first is kept. Whitespace-only texts are never flagged (the format check reports them).
    """
    flags: list[str | None] = [None] * len(texts)
    if mode == "none":
        return flags
    seen: set[bytes] = set()
    fresh: list[int] = []
    for i, text in enumerate(texts):
        if not text.strip():
            continue
        key = exact_key(text)
        if key in seen:
            flags[i] = "exact"
        else:
            seen.add(key)
            fresh.append(i)
    if mode == "near" and len(fresh) > 1:
        hashes, owner = shingle_hashes([texts[i] for i in fresh])
        sigs = signatures(hashes, owner, len(fresh))
        bounds = np.searchsorted(owner, np.arange(len(fresh) + 1)).tolist()
        shingle_sets: dict[int, set[int]] = {}

        def shingles(j: int) -> set[int]:
            if j not in shingle_sets:
                shingle_sets[j] = set(hashes[bounds[j] : bounds[j + 1]].tolist())
            return shingle_sets[j]

        def jaccard(a: int, b: int) -> float:
            x, y = shingles(a), shingles(b)
            return len(x & y) / len(x | y)

        for j in np.flatnonzero(near_groups(sigs, threshold, jaccard) != np.arange(len(fresh))).tolist():
            flags[fresh[j]] = "near"
    return flags


def candidate_pairs(sigs: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(earlier, later) index pairs sharing an LSH band: each row is paired with its band group's first row
    and with the row before it in that group; pairs are unique."""
    bands, rows = lsh_bands(threshold, sigs.shape[1])
    n = len(sigs)
    codes = []
    for band in range(bands):
        key = _band_hash(sigs[:, band * rows : (band + 1) * rows])
        order = np.argsort(key, kind="stable")  # stable: rows of a group stay in index order
        sorted_key = key[order]
        same = np.flatnonzero(sorted_key[1:] == sorted_key[:-1]) + 1  # positions whose row continues a group
        if not len(same):
            continue
        group_start = np.flatnonzero(np.concatenate(([True], sorted_key[1:] != sorted_key[:-1])))
        first = order[group_start[np.searchsorted(group_start, same, side="right") - 1]]
        later = order[same]
        codes.append(first.astype(np.int64) * n + later)
        codes.append(order[same - 1].astype(np.int64) * n + later)
    if not codes:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty
    unique = np.unique(np.concatenate(codes))
    return unique // n, unique % n


def near_groups(
    sigs: np.ndarray, threshold: float, jaccard: Callable[[int, int], float] | None = None
) -> np.ndarray:
    """For each row, the smallest row index of its group of near-duplicates (itself when it has none).

    Candidate pairs whose estimated similarity is within ``_SLACK`` of the threshold are confirmed with
    ``jaccard(a, b)`` (the exact shingle Jaccard) when given, else by the estimate alone.
    """
    earlier, later = candidate_pairs(sigs, threshold)
    slack = _SLACK if jaccard is not None else 0.0
    need = int(np.ceil((threshold - slack) * sigs.shape[1] - 1e-9))
    similar = np.empty(len(earlier), dtype=bool)
    for lo in range(0, len(earlier), 1 << 16):  # bounded memory
        hi = lo + (1 << 16)
        similar[lo:hi] = np.count_nonzero(sigs[earlier[lo:hi]] == sigs[later[lo:hi]], axis=1) >= need
    a, b = earlier[similar], later[similar]
    if jaccard is not None and len(a):
        confirmed = np.fromiter(
            (jaccard(x, y) >= threshold for x, y in zip(a.tolist(), b.tolist(), strict=True)), bool, len(a)
        )
        a, b = a[confirmed], b[confirmed]
    label = np.arange(len(sigs))
    while len(a):  # propagate the smallest index along links until nothing changes
        before = label.copy()
        np.minimum.at(label, b, label[a])
        np.minimum.at(label, a, label[b])
        label = label[label]
        if np.array_equal(label, before):
            break
    return label


def _band_hash(block: np.ndarray) -> np.ndarray:
    h = np.zeros(len(block), dtype=np.uint64)
    for col in range(block.shape[1]):
        h = _mix(h ^ block[:, col].astype(np.uint64))
    return h


# --- all steps -----------------------------------------------------------------------------------------------


def clean_rows(
    groups: Iterable[list[dict[str, Any]]],
    spec: Any,
    fmt: str,
    columns: Mapping[str, str] | None = None,
    text_column: str = "text",
) -> tuple[list[list[dict[str, Any]]], dict[str, int]]:
    """Apply ``polish.normalize`` to groups of rows (e.g. train then eval, or one group per source).

    Duplicates are found across all groups (a row repeated in a later group is dropped there), so eval rows
    never repeat training rows. Returns the kept rows per group and the count of each step.
    """
    counts: Counter = Counter()
    normalizer = TextNormalizer(spec)
    staged: list[list[tuple[dict[str, Any], str]]] = []
    for rows in groups:
        counts["rows_in"] += len(rows)
        group = []
        for row in rows:
            clean = normalize_row(row, normalizer)
            if clean != row:
                counts["normalized"] += 1
            text = row_text(clean, fmt, columns, text_column)
            if spec.min_chars and len(text.strip()) < spec.min_chars:
                counts["too_short"] += 1
                continue
            if spec.language == "pl" and is_polish(text) is False:
                counts["not_polish"] += 1
                continue
            group.append((clean, text))
        staged.append(group)
    flags = iter(
        duplicate_flags([text for group in staged for _, text in group], spec.dedupe, spec.near_threshold)
    )
    out = []
    for group in staged:
        kept = []
        for row, _ in group:
            flag = next(flags)
            if flag is None:
                kept.append(row)
            else:
                counts[f"{flag}_duplicates"] += 1
        out.append(kept)
    counts["rows_out"] = sum(len(kept) for kept in out)
    logger.info("data: hygiene %s", ", ".join(f"{k} {v}" for k, v in counts.items()))
    return out, dict(counts)
