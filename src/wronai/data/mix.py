"""Mixing several datasets with weights (``data.weights``): seeded sampling in proportion.

A source asked for ``target`` rows gives a seeded sample without replacement when it has that many rows;
otherwise every row is used ``target // n`` times plus a seeded sample of the remainder (the stats say so).
"""

from __future__ import annotations

import logging
import random
from typing import Any

logger = logging.getLogger(__name__)


def targets(sizes: list[int], weights: list[float], total: int) -> list[int]:
    """Rows asked of each source: ``total`` split in proportion to ``weights`` (largest remainders)."""
    scale = sum(weights)
    exact = [total * w / scale for w in weights]
    counts = [int(x) for x in exact]
    leftovers = sorted(range(len(exact)), key=lambda i: (counts[i] - exact[i], i))
    for i in leftovers[: total - sum(counts)]:
        counts[i] += 1
    return [c if sizes[i] or not c else 0 for i, c in enumerate(counts)]


def sample(rows: list[Any], target: int, rng: random.Random) -> list[Any]:
    """``target`` rows: a sample without replacement, or all rows repeated plus a sample of the remainder."""
    if not rows or target <= 0:
        return []
    repeats, rest = divmod(target, len(rows))
    return rows * repeats + rng.sample(rows, rest)


def mix_rows(
    sources: list[list[dict[str, Any]]],
    weights: list[float],
    names: list[str],
    seed: int,
    total: int | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Training rows of all sources mixed by weight and shuffled (seeded), plus one report entry per source."""
    sizes = [len(rows) for rows in sources]
    total = sum(sizes) if total is None else total
    asked = targets(sizes, weights, total)
    rng = random.Random(seed)
    mixed: list[dict[str, Any]] = []
    report = []
    for name, rows, weight, target in zip(names, sources, weights, asked, strict=True):
        picked = sample(rows, target, rng)
        mixed.extend(picked)
        repeated = len(picked) > len(rows)
        report.append(
            {
                "source": name,
                "rows": len(rows),
                "weight": weight,
                "sampled": len(picked),
                "share": round(len(picked) / max(total, 1), 4),
                "with_replacement": repeated,
            }
        )
        if repeated:
            logger.info(
                "data: %s has %d rows; weight %g asks for %d — rows are repeated",
                name,
                len(rows),
                weight,
                target,
            )
    rng.shuffle(mixed)
    return mixed, report
