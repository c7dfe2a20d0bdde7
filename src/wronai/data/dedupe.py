"""Duplicate removal of ``polish.normalize``: exact (hash of the normalized text) and near (MinHash + LSH, numpy).

``dedupe: exact`` drops rows whose normalized text was seen before; ``near`` additionally drops rows whose
character-shingle Jaccard similarity to a kept row is at least ``near_threshold``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np

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
