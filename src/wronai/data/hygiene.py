"""Polish text hygiene (``polish.normalize``): the steps applied in order to the rows of one or more sources.

``clean_rows`` normalizes each row (:mod:`wronai.data.normalize`), drops rows too short or not Polish
(:mod:`wronai.data.filters`), then drops exact or near duplicates across all groups (:mod:`wronai.data.dedupe`),
and returns the kept rows plus a count per step.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from wronai.data.dedupe import duplicate_flags
from wronai.data.filters import drop_reason, row_text
from wronai.data.normalize import TextNormalizer, normalize_row

logger = logging.getLogger(__name__)


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
            reason = drop_reason(text, spec)
            if reason is not None:
                counts[reason] += 1
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
