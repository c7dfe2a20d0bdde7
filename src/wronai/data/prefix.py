"""A prompt start that every example of a packed batch repeats, computed once (``hardware.shared_prefix``).

Instruction data repeats its template's opening in every example (``### Instrukcja:\\n``, a chat template's
system turn with the same system prompt). In a causal model the hidden states of those tokens depend on
those tokens alone, so every example computes the same numbers for them in every layer. ``share_prefix``
takes the packed rows of a batch, finds the longest token prefix all their examples start with (only prompt
tokens: no label in it, nor on the token after it), and lays the batch out as one row: the first example
whole, every other one without the prefix — its position ids keep counting from the prefix's length, and it
attends to the row's first tokens as to its own start (``wronai.model.attention``). Each example's loss and
every gradient are the same (to float rounding: the prefix's gradient is summed over the examples instead
of computed per example); the layers run on ``prefix × (examples - 1)`` fewer positions.

The batches themselves do not change (packing and batch size are decided on whole examples), so a run with
it and without it trains on the same steps. Only ``wronai_packed_sdpa`` (per-example attention) reads the
layout; the collator shares only where it is that attention.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from wronai.data.tokenize import IGNORE_INDEX

# a batch shares its prefix from this many tokens (below it the extra concatenations cost more than it saves)
MIN_SHARED_TOKENS = 4


def example_spans(positions: Sequence[int]) -> list[tuple[int, int]]:
    """(start, end) of each example in a packed row: its position ids restart at 0 per example."""
    starts = [i for i, p in enumerate(positions) if p == 0 or i == 0]
    return list(zip(starts, [*starts[1:], len(positions)], strict=True))


def _first_trained(labels: Sequence[int]) -> int:
    """Index of an example's first trained label after its first token (its length when none is)."""
    return next((i for i in range(1, len(labels)) if labels[i] != IGNORE_INDEX), len(labels))


def shared_prefix_length(examples: Sequence[tuple[Sequence[int], Sequence[int]]]) -> int:
    """Tokens every example (``(input_ids, labels)``) starts with that may be computed once: their longest
    common prefix, ending before each example's first trained label and its predecessor (the token after the
    prefix is predicted from the prefix's last token, which other examples no longer follow), so that every
    example keeps at least one token of its own."""
    if len(examples) < 2:
        return 0
    first = examples[0][0]
    n = min(_first_trained(labels) - 1 for _, labels in examples)
    for ids, _ in examples[1:]:
        n = min(n, len(ids) - 1)
        k = 0
        while k < n and ids[k] == first[k]:
            k += 1
        n = k
        if n == 0:
            break
    return n


def share_prefix(
    features: Sequence[dict[str, Any]], min_tokens: int = MIN_SHARED_TOKENS
) -> tuple[dict[str, list[int]], int] | None:
    """The packed rows as one row sharing their examples' common prefix, and the prefix's length; None when
    they share fewer than ``min_tokens`` tokens. Each example after the first starts
    at its position id ``prefix`` (its first label, a prompt token, stays unmasked only if it already was
    -100: ``shared_prefix_length`` stops before a trained one)."""
    examples = []
    for f in features:
        positions = f.get("position_ids") or list(range(len(f["input_ids"])))
        for start, end in example_spans(positions):
            examples.append((f["input_ids"][start:end], f["labels"][start:end], positions[start:end]))
    prefix = shared_prefix_length([(ids, labels) for ids, labels, _ in examples])
    if prefix < min_tokens:
        return None
    row: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
    for i, (ids, labels, positions) in enumerate(examples):
        cut = 0 if i == 0 else prefix
        row["input_ids"] += ids[cut:]
        row["labels"] += [IGNORE_INDEX, *labels[cut + 1 :]]
        row["position_ids"] += positions[cut:]
    return row, prefix
