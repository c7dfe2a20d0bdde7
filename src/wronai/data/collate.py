"""Batching: dynamic padding, and packing several examples per row without attention cross-talk.

Packed rows carry ``position_ids`` that restart at 0 for every example and no ``attention_mask``; with the
KV cache off, transformers then builds a block-diagonal causal mask from the position ids (sdpa and eager),
so no example attends to another. The first token of each packed example gets label -100: its prediction
would come from the previous example's last token, a prediction the unpacked example never makes. With
that, the summed token loss of a packed batch equals that of the same examples run one by one.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from wronai.data.prefix import share_prefix
from wronai.data.tokenize import IGNORE_INDEX
from wronai.model.attention import LENGTHS_KWARG, PREFIX_KWARG, example_lengths, sequence_boundaries

logger = logging.getLogger(__name__)


def _pad(rows: Sequence[Sequence[int]], value: int, length: int) -> torch.Tensor:
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out


def _target_length(lengths: list[int], multiple: int | None) -> int:
    n = max(lengths)
    if multiple:
        n = ((n + multiple - 1) // multiple) * multiple
    return n


@dataclass
class PaddingCollator:
    """Pads ``input_ids`` with the pad id and ``labels`` with -100 by position (never by token id)."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [f["input_ids"] for f in features]
        length = _target_length([len(x) for x in ids], self.pad_to_multiple_of)
        batch = {
            "input_ids": _pad(ids, self.pad_token_id, length),
            "labels": _pad([f["labels"] for f in features], IGNORE_INDEX, length),
            "attention_mask": _pad([[1] * len(x) for x in ids], 0, length),
        }
        return batch


@dataclass
class PackedCollator:
    """Batches packed rows: ``position_ids`` restart per example; padding becomes its own masked block.

    ``with_boundaries`` adds ``wronai_example_lengths`` (per row, the lengths of its examples, as Python
    lists: ``wronai_packed_sdpa`` attends per example without reading a GPU tensor back), and
    ``cu_seq_lens_q``/``cu_seq_lens_k`` (example start offsets over the flattened batch) with
    ``max_length_q``/``max_length_k``, transformers' names for the same boundaries. ``share_prefix`` lays
    the batch out as one row computing its examples' common prompt start once (``wronai.data.prefix``; only
    with the boundaries, which per-example attention reads) and adds ``wronai_example_prefixes`` (per row,
    each example's first position id: above 0 where it continues the row's first tokens).
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    with_boundaries: bool = False
    share_prefix: bool = False  # with boundaries: a prefix all examples repeat computed once (data.prefix)
    _told: bool = field(default=False, init=False, repr=False, compare=False)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        # packed training rows only (evaluation rows, one example each, keep a row per example)
        sharing = self.with_boundaries and self.share_prefix and all("position_ids" in f for f in features)
        shared = share_prefix(features) if sharing else None
        if shared is not None:
            if not self._told:
                logger.info(
                    "packed batches: the first %d tokens of every example (the same prompt start) computed once "
                    "per batch (hardware.shared_prefix)",
                    shared[1],
                )
                self._told = True
            features = [shared[0]]
        ids = [f["input_ids"] for f in features]
        length = _target_length([len(x) for x in ids], self.pad_to_multiple_of)
        positions = []
        for f in features:
            # a row without position ids is one unpacked example (the eval split is never packed)
            pos = list(f["position_ids"]) if "position_ids" in f else list(range(len(f["input_ids"])))
            positions.append(pos + list(range(length - len(pos))))
        batch: dict[str, Any] = {
            "input_ids": _pad(ids, self.pad_token_id, length),
            "labels": _pad([f["labels"] for f in features], IGNORE_INDEX, length),
            "position_ids": torch.as_tensor(positions, dtype=torch.long),
        }
        if self.with_boundaries:
            bounds = sequence_boundaries(batch["position_ids"])  # on the CPU: reading it back is free
            per_row = example_lengths(bounds, len(features), length)
            longest = max(n for row in per_row for n in row)
            batch.update(
                cu_seq_lens_q=bounds, cu_seq_lens_k=bounds, max_length_q=longest, max_length_k=longest
            )
            batch[LENGTHS_KWARG] = per_row
        if shared is not None:  # an example whose positions start above 0 continues the row's first tokens
            firsts = iter(batch["position_ids"].view(-1)[bounds[:-1].long()].tolist())
            batch[PREFIX_KWARG] = [[next(firsts) for _ in row] for row in per_row]
        return batch


def pack_examples(examples: list[dict[str, list[int]]], max_len: int) -> list[dict[str, list[int]]]:
    """Best-fit-decreasing bin packing of whole examples into rows of at most ``max_len`` tokens.

    Examples are never split; each keeps its own position ids and its first label is masked.
    """
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]), reverse=True)
    bins: list[list[int]] = []
    free: list[
        tuple[int, int]
    ] = []  # (free space, bin index), kept sorted: best fit = smallest space that fits
    for i in order:
        n = len(examples[i]["input_ids"])
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            space, b = free.pop(k)
            bins[b].append(i)
            bisect.insort(free, (space - n, b))
        else:
            bins.append([i])
            bisect.insort(free, (max_len - n, len(bins) - 1))
    rows = []
    for members in sorted(bins, key=lambda m: min(m)):
        ids: list[int] = []
        labels: list[int] = []
        pos: list[int] = []
        for i in sorted(members):
            ex = examples[i]
            ids.extend(ex["input_ids"])
            labels.extend([IGNORE_INDEX, *ex["labels"][1:]])
            pos.extend(range(len(ex["input_ids"])))
        rows.append({"input_ids": ids, "labels": labels, "position_ids": pos})
    return rows


def padding_fraction(lengths: list[int], batch_size: int) -> float:
    """Share of pad tokens when rows of these lengths are batched in order with dynamic padding."""
    total = padded = 0
    for i in range(0, len(lengths), batch_size):
        chunk = lengths[i : i + batch_size]
        total += sum(chunk)
        padded += max(chunk) * len(chunk)
    return 1 - total / padded if padded else 0.0
